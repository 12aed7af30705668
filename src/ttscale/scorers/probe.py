"""The `probe` scorer: a small head on the policy's own hidden states (`ttscale.verifier`).

It costs almost nothing at inference. The strategies ask the engine to keep each branch's
hidden states at the probe's layers while it generates (`Branch.hidden`); the scorer adds the
one row decode never computes (the branch's last token, one token per branch over its
retained KV), pools the rows as the probe was trained (`verifier.features.pool`) and applies
the head. No second model, no second pass over the text. A branch that kept no states (a
strategy that did not ask) is embedded over the cached prefix instead: correct, just slower.

Scores are probabilities (sigmoid of the head's logit), so they can weight votes. On a partial
path (beam / tree search) a text probe reads the path so far: a process score.

An answer-level probe judges finished candidates by their extracted answer, so branches with
the same answer get the same score: a likelihood probe (`train-verifier --input likelihood`)
reads the policy's log-likelihood of the answer after the bare question
(`scorers.likelihood`) through a logistic head; an answer probe
(`--input answer`) reads hidden states over a restatement of the answer after the prompt.
Partial paths have no answer yet: `ProbeScorer(answer_level, partial=text_probe)` hands them to
a text probe (a card's `partial_probe` names one in a sibling folder), and without one a search
over partial paths is refused before it samples.

The shipped probe is a likelihood probe paired with a text probe. On 133 held-out questions it
picks a right answer 31.6% of the time against the vote's 23.3% (11 wins, 0 losses); the
answer probe memorized questions and did worse than a vote on new ones (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path

import torch

from ttscale.errors import ProbeError
from ttscale.scorers.base import ScoreContext
from ttscale.scorers.likelihood import answer_likelihoods
from ttscale.tts.session import Branch, Wait
from ttscale.verifier.answers import restatement
from ttscale.verifier.features import answer_start
from ttscale.verifier.probe import Probe

# The probe shipped for the embedded model (see its card.json for the command that trained it):
# a likelihood probe for finished answers, whose card names the text probe for partial paths.
SHIPPED_PROBE = (
    Path(__file__).resolve().parent.parent
    / "verifier"
    / "shipped"
    / "smollm2-arithmetic-likelihood"
)


_NO_TEXT_PROBE = (
    "an answer probe scores finished candidates only; a search over partial paths needs a "
    "text probe: ProbeScorer(answer_probe, partial=text_probe)"
)


class ProbeScorer:
    name = "probe"

    def __init__(self, probe: Probe, partial: Probe | None = None) -> None:
        """`probe` scores finished candidates; `partial`, a text probe, scores unfinished
        paths when `probe` is an answer probe (which cannot)."""
        if partial is not None and partial.features.input != "text":
            raise ProbeError("the probe for partial paths must read text (an input=text card)")
        self.probe = probe
        self.text_probe = probe if probe.features.input == "text" else partial

    def needs(self, partial_paths: bool) -> tuple[bool, tuple[int, ...] | None]:
        """(retain, hidden_layers) for the branches: a text probe reads states kept while
        generating plus one row over the branch's retained KV; an answer probe needs neither
        (its restatements run over the prompt)."""
        if partial_paths and self.text_probe is None:  # said before any sampling starts
            raise ProbeError(_NO_TEXT_PROBE)
        text = self.text_probe if partial_paths or self.probe is self.text_probe else None
        if text is None:
            return False, None
        return True, tuple(text.features.layers)

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
        probe = Probe.load(folder, model_source)
        partial = probe.card.get("partial_probe")  # a sibling folder: the text probe
        if partial is None:
            return cls(probe)
        return cls(probe, Probe.load(folder.parent / str(partial), model_source))

    def score(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        if self.probe is self.text_probe:
            return (yield from self._score_text(self.probe, ctx, branches))
        finished = [i for i, b in enumerate(branches) if ctx.finished(b)]
        unfinished = [i for i, b in enumerate(branches) if not ctx.finished(b)]
        scores = [0.0] * len(branches)
        if unfinished:
            if self.text_probe is None:
                raise ProbeError(_NO_TEXT_PROBE)
            part = yield from self._score_text(
                self.text_probe, ctx, [branches[i] for i in unfinished]
            )
            for i, p in zip(unfinished, part, strict=True):
                scores[i] = p
        if finished:
            done = yield from self._score_answers(ctx, [branches[i] for i in finished])
            for i, p in zip(finished, done, strict=True):
                scores[i] = p
        return scores

    def _score_answers(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        """P(correct) of each branch's answer; 0 for a branch without one."""
        if self.probe.features.input == "likelihood":
            lik = yield from answer_likelihoods(ctx, branches, self.probe.features.template)
            distinct = list(lik.count)
            logits = self.probe.score_likelihoods([lik.loglik[a] for a in distinct])
            prob = dict(zip(distinct, torch.tensor(logits).sigmoid().tolist(), strict=True))
            return [0.0 if a is None else prob[a] for a in lik.answers]
        if ctx.extract is None:
            raise ProbeError("an answer probe needs the task's answer extractor")
        session = ctx.session
        prompt = list(session.prompt_token_ids)
        tokenizer = session.engine.tokenizer
        answers = [ctx.extract(b.text) for b in branches]
        members: dict[str, int] = {}
        for a in answers:
            if a is not None:
                members[a] = members.get(a, 0) + 1
        if not members:
            return [0.0] * len(branches)

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        spec = self.probe.features
        seqs = [prompt + restatement(encode, a, spec.template) for a in members]
        hidden = yield from session.embed(seqs, spec.layers, len(prompt))
        logits = self.probe.score_answers(hidden, list(members.values()))
        prob = dict(zip(members, torch.tensor(logits).sigmoid().tolist(), strict=True))
        return [0.0 if a is None else prob[a] for a in answers]

    def _score_text(
        self, probe: Probe, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        session = ctx.session
        prompt_len = len(session.prompt_token_ids)
        layers = tuple(probe.features.layers)
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
        if probe.features.pooling == "answer":  # only that pooling reads the answer line
            tokenizer = session.engine.tokenizer

            def decode_one(t: int) -> str:
                return tokenizer.decode([t])

            starts = [answer_start(decode_one, b.token_ids[prompt_len:]) for b in branches]
        logits = probe.score_hidden([r for r in rows if r is not None], 0, starts)
        return torch.tensor(logits).sigmoid().tolist()
