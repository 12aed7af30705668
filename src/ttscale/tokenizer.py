"""Tokenizer and chat template of a model, whatever file it came from.

Wraps a `transformers.PreTrainedTokenizerFast` (the Rust `tokenizers` BPE plus HF's sandboxed
Jinja chat-template renderer) so encoding and templating are byte-identical to transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# No code path may reach a model hub: transformers must only read local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import PreTrainedTokenizerFast

Message = dict[str, str]


class Tokenizer:
    """Text <-> token ids, plus the model's chat template.

    `eos_token_ids` is the set of ids that end generation (the tokenizer's EOS plus any
    `eos_token_id` list of the model's generation config).
    """

    def __init__(
        self,
        hf_tokenizer: PreTrainedTokenizerFast,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.hf = hf_tokenizer
        if chat_template:
            self.hf.chat_template = chat_template
        ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(ids)

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """Loads tokenizer.json, tokenizer_config.json and chat_template.jinja of an HF folder."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json; ttscale needs a fast (Rust) tokenizer file"
            )
        hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        template = None
        if not hf.chat_template and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(hf, eos_token_ids, template)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def all_special_ids(self) -> frozenset[int]:
        return frozenset(self.hf.all_special_ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(token_ids))

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> str:
        """Renders a conversation to the prompt text the model was trained on."""
        if not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use generate() with plain text")
        return self.hf.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        # The template already holds the special tokens (BOS, <|im_start|>...): don't add more.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)
