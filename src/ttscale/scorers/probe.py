"""The `probe` scorer: a small head on the policy's own hidden states (`ttscale.verifier`).

It costs almost nothing at inference. The strategies ask the engine to keep each branch's
hidden states at the probe's layers while it generates (`Branch.hidden`); the scorer adds the
one row decode never computes (the branch's last token, one token per branch over its
retained KV), pools the rows as the probe was trained (`verifier.features.pool`) and applies
the head. No second model, no second pass over the text. A branch that kept no states (a
strategy that did not ask) is embedded over the cached prefix instead: correct, just slower.

Scores are probabilities (sigmoid of the head's logit), so they can weight votes. On a partial
path (beam / tree search) the probe reads the path so far: a process score.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path

import torch

from ttscale.errors import ProbeError
from ttscale.scorers.base import ScoreContext
from ttscale.tts.session import Branch, Wait
from ttscale.verifier.features import answer_start
from ttscale.verifier.probe import Probe

# The probe shipped for the embedded model (see its card.json for the command that trained it).
SHIPPED_PROBE = (
    Path(__file__).resolve().parent.parent / "verifier" / "shipped" / "smollm2-arithmetic"
)


class ProbeScorer:
    name = "probe"
    # Strategies keep branches' KV while scoring so the last row is one token away.
    needs_retained = True

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.hidden_layers: tuple[int, ...] = tuple(probe.features.layers)

    @classmethod
    def load(cls, path: str | Path | None = None, model_source: str | Path | None = None):
        """The probe folder at `path` (default: the shipped one). With `model_source` (the
        model path `LLM.source` names), a probe trained for another model is refused."""
        folder = Path(path) if path is not None else SHIPPED_PROBE
        if path is None and not folder.is_dir():
            raise ProbeError(
                f"no shipped probe at {folder}; train one with `ttscale train-verifier` and "
                "pass --scorer probe:PATH"
            )
        return cls(Probe.load(folder, model_source))

    def score(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        session = ctx.session
        prompt_len = len(session.prompt_token_ids)
        layers = self.hidden_layers
        last = yield from session.embed_last(branches, layers)
        rows: list[torch.Tensor | None] = []
        for b, tail in zip(branches, last, strict=True):
            kept = b.hidden is not None and b.hidden.shape[0] == b.num_tokens - 1 - prompt_len
            rows.append(torch.cat([b.hidden, tail]) if kept and tail is not None else None)
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:  # no states kept: embed the generated tokens over the cached prompt
            fresh = yield from session.embed(
                [branches[i].token_ids for i in missing], layers, prompt_len
            )
            for i, h in zip(missing, fresh, strict=True):
                rows[i] = h
        starts = [0] * len(branches)
        if self.probe.features.pooling == "answer":  # only that pooling reads the answer line
            tokenizer = session.engine.tokenizer

            def decode_one(t: int) -> str:
                return tokenizer.decode([t])

            starts = [answer_start(decode_one, b.token_ids[prompt_len:]) for b in branches]
        logits = self.probe.score_hidden([r for r in rows if r is not None], 0, starts)
        return torch.tensor(logits).sigmoid().tolist()
