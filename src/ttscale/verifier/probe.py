"""A trained probe on disk: head weights in safetensors plus a JSON card.

Layout of a probe folder::

    probe.safetensors   the head's tensors (standardization buffers included)
    card.json           model id and weights hash, tokenizer, task, features (pooling x layer),
                        head, data sizes and seeds, metrics, the exact command

A probe reads one model's hidden states; on another model its scores mean nothing, so loading
refuses a card whose model hash differs from the engine's. Only safetensors and JSON are read
(never pickle), and a damaged file is an error that names it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ttscale.errors import ProbeError
from ttscale.verifier.answers import RESTATE_TEMPLATE, answer_row
from ttscale.verifier.features import POOLINGS, answer_start, pool
from ttscale.verifier.likelihood import likelihood_row
from ttscale.verifier.train import ProbeHead

if TYPE_CHECKING:
    from ttscale.llm import LLM

WEIGHTS_FILE = "probe.safetensors"
CARD_FILE = "card.json"
CARD_VERSION = 1
# Files that define a model folder's weights and tokenizer, hashed in name order.
_MODEL_FILES = ("*.safetensors", "*.gguf", "config.json", "tokenizer.json", "tokenizer_config.json")
_HASHES: dict[tuple[str, int, int], str] = {}


def model_hash(source: str | Path) -> str:
    """sha256 of a model's files: the GGUF file itself, or a folder's weights, config and
    tokenizer files. Cached per (path, size, mtime): ~0.3 s for the embedded 98 MB GGUF."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(f for p in _MODEL_FILES for f in path.glob(p))
    if not files:
        raise ProbeError(f"no model files to hash at {path}")
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
            _HASHES[key] = h.hexdigest()
        digest.update(f.name.encode() + b"\0" + _HASHES[key].encode())
    return digest.hexdigest()


INPUTS = ("text", "answer", "likelihood")


@dataclass(frozen=True)
class FeatureSpec:
    """Which pooled rows feed the head, concatenated in this order. ``input``: ``text`` reads
    the candidate's own tokens (any partial path too); ``answer`` reads the restatement
    ``template`` of its extracted answer, mean pooled, plus the answer's log vote count
    (:mod:`ttscale.verifier.answers`): finished candidates only; ``likelihood`` reads the
    policy's log-likelihood of each distinct answer after the bare question, ``template`` being
    what follows the question (:mod:`ttscale.scorers.likelihood`): one number, through a
    logistic head that calibrates it into P(correct)."""

    pooling: str
    layers: tuple[int, ...]
    input: str = "text"
    template: str = RESTATE_TEMPLATE

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ProbeError(f"pooling must be one of {POOLINGS}, not {self.pooling!r}")
        if not self.layers:
            raise ProbeError("a probe needs at least one layer")
        if self.input not in INPUTS:
            raise ProbeError(f"probe input must be one of {INPUTS}, not {self.input!r}")
        if self.input != "text" and (self.pooling != "mean" or "{answer}" not in self.template):
            raise ProbeError(f"an {self.input} probe reads a template that contains {{answer}}")


class Probe:
    """A head plus the card that says what it reads: score candidates of one model."""

    def __init__(self, head: ProbeHead, features: FeatureSpec, card: dict[str, Any]) -> None:
        self.head = head.eval()
        self.features = features
        self.card = card

    # ---- scoring --------------------------------------------------------------------------

    def score_hidden(
        self, hidden: Sequence[torch.Tensor], prompt_len: int, span_starts: Sequence[int]
    ) -> list[float]:
        """Logits for candidates given their hidden states ``(T, len(layers), H)`` at the
        card's layers (prompt rows first)."""
        rows = [
            pool(h.float(), prompt_len, s, (self.features.pooling,))[0].reshape(-1)
            for h, s in zip(hidden, span_starts, strict=True)
        ]
        with torch.no_grad():
            return self.head(torch.stack(rows)).tolist()

    def score_answers(self, hidden: Sequence[torch.Tensor], counts: Sequence[int]) -> list[float]:
        """Logits of distinct answers given the hidden states over their restatements
        ``(T, len(layers), H)`` and their vote counts (an answer probe)."""
        rows = [answer_row(h, c) for h, c in zip(hidden, counts, strict=True)]
        with torch.no_grad():
            return self.head(torch.stack(rows)).tolist()

    def score_likelihoods(self, logliks: Sequence[float]) -> list[float]:
        """Logits of distinct answers given their log-likelihoods after the bare question (a
        likelihood probe)."""
        if not logliks:  # every branch scored together lacked an answer
            return []
        rows = [likelihood_row(ll) for ll in logliks]
        with torch.no_grad():
            return self.head(torch.stack(rows)).tolist()

    def score(
        self, llm: LLM, prompt_token_ids: Sequence[int], candidates: Sequence[Sequence[int]]
    ) -> list[float]:
        """One logit per candidate (higher = more likely correct); one engine call, the
        prompt's KV shared by all candidates."""
        seqs = [list(prompt_token_ids) + list(c) for c in candidates]
        n = len(prompt_token_ids)
        hidden = llm.hidden_states(seqs, list(self.features.layers), start=n)

        def decode_one(t: int) -> str:
            return llm.tokenizer.decode([t])

        starts = [answer_start(decode_one, c) for c in candidates]
        return self.score_hidden(hidden, 0, starts)

    # ---- files ----------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file(tensors, str(out / WEIGHTS_FILE))
        (out / CARD_FILE).write_text(json.dumps(self.card, indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, path: str | Path, model_source: str | Path | None = None) -> Probe:
        """Reads a probe folder. With ``model_source`` (``llm.source``), refuses a probe made
        for a model whose hash differs."""
        folder = Path(path)
        card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
        for p in (card_path, weights_path):
            if not p.is_file():
                raise ProbeError(
                    f"{p} not found: a probe folder holds {CARD_FILE} and {WEIGHTS_FILE}"
                )
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            head_cfg, feat_cfg = card["head"], card["features"]
            features = FeatureSpec(
                str(feat_cfg["pooling"]),
                tuple(int(x) for x in feat_cfg["layers"]),
                str(feat_cfg.get("input", "text")),
                str(feat_cfg.get("template", RESTATE_TEMPLATE)),
            )
            kind, dim, hidden = str(head_cfg["type"]), int(head_cfg["dim"]), int(head_cfg["hidden"])
            want_hash = str(card["model"]["hash"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ProbeError(f"{card_path} is not a valid probe card ({e})") from None
        if model_source is not None:
            have = model_hash(model_source)
            if have != want_hash:
                raise ProbeError(
                    f"probe {folder} was trained for model {card['model'].get('id')!r} "
                    f"(hash {want_hash[:12]}), but the engine runs {model_source} "
                    f"(hash {have[:12]}): its scores would mean nothing; train one for this "
                    "model with `ttscale train-verifier`"
                )
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ProbeError(f"{weights_path} is not a readable safetensors file ({e})") from None
        try:
            head = ProbeHead(dim, kind, hidden)
            head.load_state_dict(tensors, strict=True)
        except (RuntimeError, ValueError) as e:
            raise ProbeError(f"{weights_path} does not match its card's head ({e})") from None
        return cls(head, features, card)
