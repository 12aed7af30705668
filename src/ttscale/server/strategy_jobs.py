"""The `ttscale` extension of the completion endpoints: a test-time-scaling strategy run as a
job on the engine thread, answered as an ordinary completion plus a `ttscale` field."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ttscale.sampling.params import SamplingParams
from ttscale.server.admission import Pool, check_fits, largest_max_tokens, strategy_footprint
from ttscale.server.engine_loop import EngineFailure, JobCancelled, QueueFullError
from ttscale.server.errors import APIError, queue_full
from ttscale.server.protocol import TTScaleOptions
from ttscale.server.streaming import until_disconnected
from ttscale.server.validation import Job


async def run_strategy_request(
    app: FastAPI, job: Job, options: TTScaleOptions, request: Request
) -> Response:
    """TTS extension: `"ttscale": {"strategy": "majority@16", "scorer": "logprob"}`.

    The strategy runs as a job on the engine thread (its branches batch with other requests).
    The reply is an ordinary completion whose message is the chosen answer's text, plus a
    `ttscale` field with the candidates, votes / scores and the run's cost. Streaming is not
    offered: the answer is known only when the search ends.

    Admission: N and M are at most `max_n`; the job's worst-case KV must fit its share of
    the pool (`ServerConfig.strategy_kv_share`); it waits, counted in the waiting queue,
    until running jobs leave room. A client that leaves cancels the job and frees its KV.
    """
    from ttscale.scorers import load_scorer
    from ttscale.strategies import Query, make_strategy
    from ttscale.tasks.answers import extract_answer
    from ttscale.tts.hygiene import Hygiene
    from ttscale.tts.session import Session

    if job.stream:
        raise APIError(400, "stream is not supported with a ttscale strategy", param="stream")
    if job.params.n != 1:
        raise APIError(400, "n must be 1 with a ttscale strategy (it returns one answer)", "n")
    if len(job.prompts) != 1:
        raise APIError(400, "a ttscale strategy takes one prompt per request", param="prompt")
    (prompt,) = job.prompts
    config, engine_loop = app.state.config, app.state.engine_loop
    params = job.params
    max_model_len = app.state.llm.engine.max_model_len
    pool = Pool(engine_loop.pool_blocks, engine_loop.block_size)
    share = pool.share(config.strategy_kv_share)
    args = (options.strategy, len(prompt.token_ids))
    if job.default_max_tokens:  # the rest of the context, but what the branches can hold
        mt = largest_max_tokens(*args, params.max_tokens, max_model_len, config.max_n, pool, share)
        params = dataclasses.replace(params, max_tokens=mt)
    footprint = strategy_footprint(*args, params.max_tokens, max_model_len, config.max_n)
    blocks = check_fits(footprint, share, pool.block_size, "this strategy", "ttscale.strategy")
    extras = options.model_extra or {}
    try:
        strategy = make_strategy(options.strategy)
    except ValueError as e:
        raise APIError(400, str(e), param="ttscale.strategy") from None
    scorer = None
    if strategy.needs_scorer:
        spec = extras.get("scorer", "logprob")
        if spec not in ("logprob", "likelihood", "judge", "probe"):  # no files from requests
            raise APIError(400, "ttscale.scorer must be logprob, judge or probe", "ttscale.scorer")
        try:
            scorer = load_scorer(spec, app.state.llm.source)
        except ValueError as e:  # the shipped probe is for the embedded model only
            raise APIError(400, str(e), param="ttscale.scorer") from None
    llm = app.state.llm
    question = prompt.text or llm.tokenizer.decode(prompt.token_ids)
    query = Query(
        question=question,
        prompt_token_ids=prompt.token_ids,
        extract=answer_reader(params, extract_answer),
        params=params,
        scorer=scorer,
        hygiene=Hygiene(enabled=options.hygiene),
    )

    def solve():
        session = Session(llm.engine, prompt.token_ids, tag="tts")
        try:
            return (yield from strategy.solve(session, query))
        finally:
            session.close()  # frees every branch even if the strategy failed (or was closed)

    try:
        handle = engine_loop.run_job(solve(), blocks)
    except QueueFullError:
        raise queue_full(config.retry_after_s, app.state.metrics) from None
    except EngineFailure as e:
        raise APIError(e.status, str(e), type="server_error") from None
    # Watch the connection meanwhile: a client that gives up cancels the job.
    work = asyncio.wrap_future(handle.future)
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            handle.cancel()
            work.cancel()  # nobody will read its outcome
    if work.cancelled():
        return Response(status_code=499)  # the client left; nobody reads this
    try:
        result = work.result()
    except JobCancelled:
        return Response(status_code=499)
    except EngineFailure as e:
        raise APIError(e.status, str(e), type="server_error") from None
    return JSONResponse(_strategy_reply(job, prompt.token_ids, result))


def answer_reader(params: SamplingParams, default: Callable[[str], str | None]):
    """What a candidate's vote is read from. With a grammar (structured outputs), every
    candidate follows it, so votes need no free-text parsing: a JSON output votes with its
    canonical form (key order and spacing ignored), a choice with itself; a regex or EBNF
    grammar (which may allow free reasoning before a fixed answer line) keeps `default`."""
    grammar = params.constraint
    kind = getattr(grammar, "source", "").split(":", 1)[0]
    if kind == "json_schema":
        return _canonical_json
    if kind == "choice":
        return lambda text: text or None
    return default


def _canonical_json(text: str) -> str | None:
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except ValueError:  # cut off by max_tokens: no vote
        return None


def _strategy_reply(job: Job, prompt_ids: list[int], result) -> dict[str, Any]:
    stats = result.stats
    body: dict[str, Any] = {
        "id": f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-tts-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "usage": {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": stats.generated_tokens,
            "total_tokens": len(prompt_ids) + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
        },
        "ttscale": {
            "strategy": result.strategy,
            "answer": result.answer,
            "votes": result.votes,
            "candidates": [dataclasses.asdict(c) for c in result.candidates],
            "cost": dataclasses.asdict(stats),
            "extra": {
                k: v for k, v in result.extra.items() if isinstance(v, (int, float, list, dict))
            },
        },
    }
    # No candidate finished (all cut off or looping): nothing is selected; say it the way a
    # plain completion does, and the extension's `no_finished` says why.
    finish = "length" if result.extra.get("no_finished") else "stop"
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if job.kind == "chat":
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    body["choices"] = [choice]
    return body


__all__ = ["run_strategy_request"]
