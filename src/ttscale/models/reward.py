"""Reward models: a score head on the Llama-family decoder, run by our engine.

The decoder, its parameter names and its weight loading are `LlamaForCausalLM`'s; only the
head differs, and it replaces the LM head. The engine computes the decoder over the paged KV
(`LLMEngine.add_embed_request`, shared prefixes cached) and returns the final-norm hidden
states of the positions a reward is read at; `rewards()` applies the head to those rows only.

Heads and where they read, after each reference implementation:
- `LlamaForSequenceClassification` / `Qwen2ForSequenceClassification` (transformers'
  `*ForSequenceClassification`): `score = Linear(hidden, num_labels, bias=False)`, the logits
  of the last non-pad token.
- `Qwen2ForRewardModel` (Qwen2.5-Math-RM-72B's remote code, `modeling_qwen2_rm.py`; vLLM's
  `model_executor/models/qwen2_rm.py` mirrors it): `score = Sequential(Linear(h, h), ReLU,
  Linear(h, 1))` with biases, read at the token before the first pad (the last token of an
  unpadded input); num_labels is 1 whatever config.json says.
- `Qwen2ForProcessRewardModel` (Qwen2.5-Math-PRM-7B/72B, same remote code): the same head with
  2 labels, read at every step separator `<extra_0>`; a step's reward is softmax(logits)[1]
  there (the model card's `make_step_rewards`).
Rewards lie in [0, 1]: sigmoid of a single logit, else the softmax probability of the last
class (the "good" class by convention, label 1 of the PRM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ttscale.errors import ModelLoadError
from ttscale.models.config import ModelConfig
from ttscale.models.llama import LlamaForCausalLM

# Qwen2.5-Math-PRM: "After each step, we insert a special token <extra_0>" (model card).
PRM_STEP_TOKEN = "<extra_0>"


@dataclass(frozen=True)
class RewardModelConfig(ModelConfig):
    """A decoder's shape plus its head: `num_labels` logits per position read, and the pad
    id that sequence classifiers skip when they look for the last token."""

    num_labels: int = 1
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ModelLoadError(f"num_labels must be a positive integer, got {self.num_labels!r}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RewardModelConfig:
        """From a reward model's config.json; a causal LM or unknown architecture is refused.
        The decoder's fields are read exactly as its causal family's are."""
        from ttscale.models.registry import REWARD_ARCHITECTURES, resolve_reward_architecture

        architecture = resolve_reward_architecture(hf)
        decoder = REWARD_ARCHITECTURES[architecture][1]
        base = ModelConfig.from_hf({**hf, "architectures": [decoder]})
        fixed = _FIXED_LABELS.get(architecture)
        num_labels = fixed if fixed is not None else _num_labels(hf)
        pad = hf.get("pad_token_id")
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ModelConfig)}
        # No LM head: nothing to tie (a checkpoint's lm_head.weight is ignored on load).
        fields.update(architecture=architecture, tie_word_embeddings=False)
        try:
            return cls(
                **fields, num_labels=num_labels, pad_token_id=None if pad is None else int(pad)
            )
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config has a malformed field: {e}") from None


# The remote code of Qwen's reward models sets num_labels itself (vLLM does the same).
_FIXED_LABELS = {"Qwen2ForRewardModel": 1, "Qwen2ForProcessRewardModel": 2}


def _num_labels(hf: dict[str, Any]) -> int:
    """transformers' rule: the size of id2label when saved, else num_labels, else 2."""
    id2label = hf.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    value = hf.get("num_labels", 2)
    if not isinstance(value, int):
        raise ModelLoadError(f"config field num_labels must be an integer, got {value!r}")
    return value


class RewardModel(LlamaForCausalLM):
    """The decoder with `score` in place of `lm_head`. Subclasses build the head and say
    where it is read (`reward_positions`).

    The engine never asks it for logits (embedding requests sample nothing), so there is no
    vocab projection at all; `rewards()` runs the head on the few rows it needs.
    """

    config: RewardModelConfig
    is_process: ClassVar[bool] = False  # True: one reward per step separator

    def __init__(self, config: RewardModelConfig) -> None:
        super().__init__(config)
        del self.lm_head  # built by the decoder's __init__ (on the meta device): drop it
        self.score = self.build_head(config)

    def build_head(self, config: RewardModelConfig) -> nn.Module:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"{self.config.architecture} is a reward model: it has no LM head to sample from"
        )

    def load_weights(
        self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, *, stream: bool = False
    ) -> None:
        """HF names: `model.*` for the decoder, `score.*` for the head. A checkpoint that kept
        its policy's `lm_head.weight` loads too: it is unused (vLLM skips it as well)."""
        if stream:  # the caller gave the dict up: drop the head in place, stream the rest
            for name in [k for k in tensors if k.startswith("lm_head.")]:
                del tensors[name]
            super().load_weights(tensors, dtype, stream=True)
            return
        kept = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
        super().load_weights(kept, dtype)

    @torch.inference_mode()
    def score_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden_size) final-norm states -> fp32 logits (N, num_labels)."""
        return self.score(hidden).float()

    @torch.inference_mode()
    def rewards(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden_size) final-norm states -> fp32 rewards (N,) in [0, 1]:
        sigmoid of one logit, else the softmax probability of the last class."""
        logits = self.score_logits(hidden)
        if logits.shape[-1] == 1:
            return logits[:, 0].sigmoid()
        return logits.softmax(-1)[:, -1]

    def reward_positions(
        self, token_ids: Sequence[int], step_token_id: int | None = None
    ) -> list[int]:
        """Positions of `token_ids` whose hidden states the head reads (ascending)."""
        raise NotImplementedError


class _SequenceClassifier(RewardModel):
    """transformers' `*ForSequenceClassification`: `score` = Linear(hidden, num_labels,
    bias=False) at the last non-pad token (transformers >= 4.48 takes the rightmost token
    that is not `pad_token_id`, so a pad id inside the text is skipped, not cut at)."""

    def build_head(self, config: RewardModelConfig) -> nn.Module:
        return nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def reward_positions(
        self, token_ids: Sequence[int], step_token_id: int | None = None
    ) -> list[int]:
        pad = self.config.pad_token_id
        for i in range(len(token_ids) - 1, -1, -1):
            if token_ids[i] != pad:
                return [i]
        return [0]  # all pads: transformers' argmax over an all-zero mask


class LlamaForSequenceClassification(_SequenceClassifier):
    """Llama decoder + linear score head (transformers' LlamaForSequenceClassification)."""


class Qwen2ForSequenceClassification(_SequenceClassifier):
    """Qwen2 decoder + linear score head (transformers' Qwen2ForSequenceClassification)."""


class _QwenRewardHead(RewardModel):
    """Qwen's remote-code head: Sequential(Linear(h, h), ReLU, Linear(h, num_labels)), both
    linears with bias (parameter names `score.0.*`, `score.2.*`)."""

    def build_head(self, config: RewardModelConfig) -> nn.Module:
        return nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, config.num_labels),
        )


class Qwen2ForRewardModel(_QwenRewardHead):
    """Qwen2.5-Math-RM-72B (outcome RM, 1 label). The remote code pools at
    `eq(input_ids, pad_token_id).argmax(-1) - 1`: the token before the first pad, which for an
    unpadded input (no pad at all: argmax 0, then -1) is the last token."""

    def reward_positions(
        self, token_ids: Sequence[int], step_token_id: int | None = None
    ) -> list[int]:
        pad = self.config.pad_token_id
        first_pad = next((i for i, t in enumerate(token_ids) if t == pad), 0)
        return [first_pad - 1 if first_pad > 0 else len(token_ids) - 1]


class Qwen2ForProcessRewardModel(_QwenRewardHead):
    """Qwen2.5-Math-PRM (process RM, 2 labels): one reward per `<extra_0>` separator, the
    probability of label 1 (model card: `make_step_rewards` keeps softmax(logits)[:, 1] where
    `input_ids == step_sep_id`)."""

    is_process = True

    def reward_positions(
        self, token_ids: Sequence[int], step_token_id: int | None = None
    ) -> list[int]:
        if step_token_id is None:
            raise ValueError(f"a process reward model needs the {PRM_STEP_TOKEN} token id")
        return [i for i, t in enumerate(token_ids) if t == step_token_id]
