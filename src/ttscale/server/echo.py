"""`echo` for completions: the prompt is returned before the completion, with the log-probability
of each prompt token when `logprobs` is set (what lm-evaluation-harness's loglikelihood and
multiple-choice tasks read).

Prompt logprobs come from the engine's embedding path, with no engine change: the prompt runs
as an embed-only request keeping the final-norm hidden state of every position
(`Session.embed`), and the model's own LM head turns each row into next-token logits. The
job runs on the engine thread like a strategy; its full blocks stay in the prefix cache, so
the generation that follows reuses them.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from ttscale.engine.llm_engine import LLMEngine
from ttscale.tts.session import Session

_ROWS_PER_CHUNK = 64  # logits are (rows, vocab) fp32: bound the memory of a long prompt


def prompt_logprobs_job(
    engine: LLMEngine, token_ids: list[int], top_k: int
) -> Generator[Any, None, tuple[list[float | None], list[list[tuple[int, float]] | None]]]:
    """A job (run on the engine thread): each prompt token's logprob given the tokens before
    it, and the `top_k` most likely tokens at that position. Token 0 has neither."""
    session = Session(engine, token_ids, tag="echo")
    try:
        layer = engine.model_config.num_hidden_layers  # after the final norm
        (hidden,) = yield from session.embed([token_ids], [layer], start=0)
    finally:
        session.close()
    rows = hidden[:-1, 0]  # (T - 1, hidden): row i predicts token i + 1
    targets = torch.tensor(token_ids[1:], device=rows.device)
    logprobs: list[float | None] = [None]
    tops: list[list[tuple[int, float]] | None] = [None]
    for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        chunk = rows[start : start + _ROWS_PER_CHUNK]
        logp = torch.log_softmax(engine.model.compute_logits(chunk), dim=-1)  # (rows, vocab)
        chosen = logp.gather(1, targets[start : start + len(chunk)].unsqueeze(1)).squeeze(1)
        logprobs += chosen.tolist()
        if top_k > 0:
            values, ids = logp.topk(min(top_k, logp.shape[1]), dim=-1)
            for v, i in zip(values.tolist(), ids.tolist(), strict=True):
                tops.append(list(zip(i, v, strict=True)))
        else:
            tops += [[] for _ in range(len(chunk))]
    return logprobs, tops


__all__ = ["prompt_logprobs_job"]
