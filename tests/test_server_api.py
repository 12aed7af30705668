"""The server's API surface after issue 14: body-size limit (413), refusals naming every
output-changing field it does not implement, seeds, 404 models, case-insensitive Bearer,
/tokenize and /detokenize, batched completions prompts, logprobs that always hold the sampled
token, and a hostile-input suite after which the server is still healthy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

from tests.test_server import (
    CHAT,
    COMPLETIONS,
    HELLO,
    MODEL,
    LiveServer,
    model_dir,  # noqa: F401  (the module's fixture)
    post,
    serve_in_thread,
    sse_events,
    tiny_llm,
)
from tests.test_server_load import rss_mb

BODY_LIMIT = 256 * 1024
C = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
H = {"model": MODEL, "messages": HELLO, "max_tokens": 2}


@pytest.fixture(scope="module")
def api(model_dir) -> Iterator[LiveServer]:  # noqa: F811
    with serve_in_thread(tiny_llm(model_dir), max_n=8, max_body_bytes=BODY_LIMIT) as live:
        yield live


@pytest.fixture(autouse=True)
def _pool_full_after(request):
    yield
    if "api" in request.fixturenames:
        request.getfixturevalue("api").wait_pool_full()


# ---- body size and the event loop --------------------------------------------------------------


def test_body_over_the_limit_is_413_before_it_is_read(api):
    big = json.dumps({**C, "prompt": "x" * (BODY_LIMIT + 10)})
    r = post(api, COMPLETIONS, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b"x" * 4096
        yield b'"}'

    r = httpx.post(
        api.url + COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert post(api, COMPLETIONS, C).status_code == 200


def test_health_stays_responsive_while_large_prompts_are_tokenized(api):
    """Tokenizing runs on its own thread: /health answers while 200 KB prompts arrive."""
    text = "The quick brown fox jumps over the lazy dog. " * 4500  # ~200 KB, ~45k tokens
    stop = threading.Event()
    codes: list[int] = []

    def hostile() -> None:
        while not stop.is_set():
            codes.append(post(api, COMPLETIONS, {**C, "prompt": text}).status_code)

    senders = [threading.Thread(target=hostile) for _ in range(2)]
    for t in senders:
        t.start()
    latencies = []
    try:
        time.sleep(0.2)
        for _ in range(40):
            t0 = time.monotonic()
            assert httpx.get(api.url + "/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.01)
    finally:
        stop.set()
        for t in senders:
            t.join(30)
    latencies.sort()
    p50, p99 = (latencies[int(q * (len(latencies) - 1))] for q in (0.5, 0.99))
    print(
        f"\n/health p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms while {len(codes)} "
        "200 KB prompts were refused"
    )
    assert codes and set(codes) == {400}  # longer than the context
    # Loose bounds: client, server, engine and both senders share this process (and its
    # GIL), and the suite may run on a busy 2-core machine, where /health alone had p50 70 ms
    # and, with the senders, p50 150-180 ms and p99 0.24-0.47 s (load average 9-17). A loop
    # that tokenized would stall for a whole prompt each time (0.1 s quiet, 0.56 s there).
    assert p50 < 0.25
    assert p99 < 1.0


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(api, monkeypatch):
    calls: list[int] = []
    encode = api.llm.tokenizer.encode
    monkeypatch.setattr(
        api.llm.tokenizer, "encode", lambda t, *a, **k: calls.append(1) or encode(t, *a, **k)
    )
    for path, body in [
        (COMPLETIONS, {**C, "prompt": ["Hi", "x" * (BODY_LIMIT // 2)]}),
        (CHAT, {**H, "messages": [{"role": "user", "content": "x" * (BODY_LIMIT // 2)}]}),
    ]:
        r = post(api, path, body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "characters" in r.json()["error"]["message"]
    assert len(calls) == 1  # only the batch's short "Hi" was tokenized


# ---- refusals ----------------------------------------------------------------------------------

REFUSED = [
    (CHAT, {**H, "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    (COMPLETIONS, {**C, "response_format": {"type": "xml"}}, "response_format"),
    (CHAT, {**H, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (CHAT, {**H, "function_call": "auto"}, "function_call"),
    (CHAT, {**H, "tool_choice": "auto"}, "tool_choice"),
    (CHAT, {**H, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    (COMPLETIONS, {**C, "best_of": 2}, "best_of"),
    (CHAT, {**H, "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {**C, "stream": False, "stream_options": {}}, "stream_options"),
    (CHAT, {**H, "guided_json": {"type": 5}}, "guided_json"),
    (COMPLETIONS, {**C, "guided_regex": "[0-9"}, "guided_regex"),
    (CHAT, {**H, "guided_choice": []}, "guided_choice"),
    (CHAT, {**H, "structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
    (CHAT, {**H, "seed": -1}, "seed"),
    (CHAT, {**H, "seed": 2**63}, "seed"),
    (COMPLETIONS, {**C, "seed": 2**64 + 5}, "seed"),
    (CHAT, {**H, "n": 2, "ttscale": {"strategy": "majority@2"}}, "n"),
    (COMPLETIONS, {**C, "prompt": ["a", "b"], "ttscale": {"strategy": "majority@2"}}, "prompt"),
    (COMPLETIONS, {**C, "stop": ["x" * 10] * 33}, "stop"),
]


@pytest.mark.parametrize(("path", "body", "param"), REFUSED, ids=lambda v: str(v)[:50])
def test_unsupported_fields_are_400_naming_the_field(api, path, body, param):
    r = post(api, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_accepted_neutral_values(api):
    for path, body in [
        (CHAT, {**H, "response_format": {"type": "text"}}),
        (COMPLETIONS, {**C, "best_of": 1}),
        (CHAT, {**H, "seed": 2**63 - 1}),
        (CHAT, {**H, "stream": True, "stream_options": {"include_usage": True}}),
        (CHAT, {**H, "tools": [], "functions": None}),
    ]:
        assert post(api, path, body).status_code == 200, body


# ---- models, auth, tokenize ----------------------------------------------------------------------


def test_unknown_model_is_404_and_models_retrieve(api):
    for path, body in [(CHAT, {**H, "model": "gpt-4"}), (COMPLETIONS, {**C, "model": "gpt-4"})]:
        r = post(api, path, body)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"
    client = api.client()
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)


def test_bearer_scheme_is_case_insensitive(model_dir):  # noqa: F811
    with serve_in_thread(tiny_llm(model_dir), api_key="s3cret") as live:
        for header in ("Bearer s3cret", "bearer s3cret", "BEARER  s3cret"):
            r = httpx.get(live.url + "/v1/models", headers={"Authorization": header})
            assert r.status_code == 200, header
        for header in ("bearer S3CRET", "Basic s3cret", "bearers3cret", "s3cret"):
            r = httpx.get(live.url + "/v1/models", headers={"Authorization": header})
            assert r.status_code == 401, header


def test_tokenize_and_detokenize(api):
    tok = api.llm.tokenizer
    r = post(api, "/tokenize", {"model": MODEL, "prompt": "Hello there", "return_token_strs": True})
    assert r.status_code == 200
    reply = r.json()
    assert reply["tokens"] == tok.encode("Hello there") and reply["count"] == len(reply["tokens"])
    assert reply["max_model_len"] == api.llm.engine.max_model_len
    assert reply["token_strs"] == tok.convert_ids_to_tokens(reply["tokens"])
    chat = post(api, "/tokenize", {"messages": HELLO}).json()
    usage = api.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    r = post(api, "/detokenize", {"model": MODEL, "tokens": reply["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"] == "Hello there"
    for path, body, status in [
        ("/tokenize", {"prompt": "a", "messages": HELLO}, 400),
        ("/tokenize", {}, 400),
        ("/tokenize", {"prompt": "a", "model": "gpt-4"}, 404),
        ("/detokenize", {"tokens": [10**9]}, 400),
        ("/detokenize", {"tokens": [-1]}, 400),
        ("/detokenize", {"tokens": "abc"}, 400),
    ]:
        assert post(api, path, body).status_code == status, body


# ---- completions: batched prompts, logprobs ------------------------------------------------------

GREEDY = {"temperature": 0, "ignore_eos": True}


def test_batched_prompts_each_get_their_choices(api):
    prompts = ["The quick brown", "Paged KV", "Votes"]
    singles = [
        post(api, COMPLETIONS, {**C, **GREEDY, "prompt": p, "max_tokens": 5}).json()
        for p in prompts
    ]
    body = {**C, **GREEDY, "prompt": prompts, "max_tokens": 5, "n": 2}
    reply = post(api, COMPLETIONS, body).json()
    assert [c["index"] for c in reply["choices"]] == list(range(6))
    for i, single in enumerate(singles):
        text = single["choices"][0]["text"]
        assert [reply["choices"][2 * i + j]["text"] for j in range(2)] == [text, text]
    assert reply["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert reply["usage"]["completion_tokens"] == 6 * 5
    # Token-id prompts, streaming: the same texts.
    ids = [api.llm.tokenizer.encode(p) for p in prompts]
    texts: dict[int, str] = {}
    with httpx.stream(
        "POST", api.url + COMPLETIONS, json={**body, "prompt": ids, "stream": True}, timeout=30
    ) as r:
        for event in sse_events(r.iter_lines()):
            if event != "[DONE]":
                (choice,) = event["choices"]
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert [texts[i] for i in range(6)] == [c["text"] for c in reply["choices"]]
    # The openai client's batch.
    batch = api.client().completions.create(
        model=MODEL,
        prompt=prompts,
        max_tokens=5,
        **{"temperature": 0, "extra_body": {"ignore_eos": True}},
    )
    assert [c.text for c in batch.choices] == [s["choices"][0]["text"] for s in singles]


def test_top_logprobs_always_hold_the_sampled_token(api):
    body = {**C, "prompt": "Hello", "max_tokens": 5, "n": 8, "temperature": 2.0, "seed": 3}
    for k in (0, 1):
        reply = post(api, COMPLETIONS, {**body, "logprobs": k}).json()
        for choice in reply["choices"]:
            lp = choice["logprobs"]
            for token, logprob, top in zip(
                lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
            ):
                assert token in top and len(top) <= k + 1
                if "\ufffd" in token:  # partial UTF-8: other tokens share this text
                    continue
                assert top[token] == pytest.approx(logprob)
                if k == 0:
                    assert top == {token: pytest.approx(logprob)}


def test_echo_with_prompt_logprobs_matches_transformers(api):
    """lm-eval's loglikelihood request: echo, logprobs=1, max_tokens=1, temperature 0."""
    from transformers import AutoModelForCausalLM

    prompt = "The quick brown fox jumps"
    reply = api.client().completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    (choice,) = reply.choices
    lp = choice.logprobs
    ids = api.llm.tokenizer.encode(prompt)
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[: len(ids)] == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    hf = AutoModelForCausalLM.from_pretrained(api.llm.source, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [logits[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    for i in range(1, len(ids)):
        top = lp.top_logprobs[i]
        assert lp.tokens[i] in top and 1 <= len(top) <= 2
        best = logits[i - 1].max().item()
        assert max(top.values()) == pytest.approx(best, abs=1e-4)
    # Batched prompts, n > 1, no logprobs: each choice starts with its prompt.
    body = {**C, "prompt": [prompt, "Votes"], "echo": True, "n": 2, "max_tokens": 3}
    reply = post(api, COMPLETIONS, body).json()
    texts = [c["text"] for c in reply["choices"]]
    assert all(t.startswith(prompt) for t in texts[:2])
    assert all(t.startswith("Votes") for t in texts[2:])
    assert all(c["logprobs"] is None for c in reply["choices"])


# ---- hostile inputs -------------------------------------------------------------------------


def _hostile() -> list[tuple[str, bytes | dict]]:
    raw: list[bytes] = [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"just a string"',
        b"\xff\xfe\x00garbage",
        b'{"prompt": "\xff\xfe", "max_tokens": 2}',
        b'{"prompt": "\\ud800", "max_tokens": 2}',
        b'{"prompt": "Hi", "temperature": NaN}',
        b'{"prompt": "Hi", "temperature": Infinity}',
        b'{"prompt": "Hi", "top_p": -Infinity}',
        b'{"prompt": "Hi", "presence_penalty": NaN}',
        b'{"prompt": "Hi", "max_tokens": 1e400}',
        b'{"prompt": "Hi", "n": 1' + b"0" * 400 + b"}",
        b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"prompt": "Hi", "stop": ' + b"[" * 100 + b"]" * 100 + b"}",
        b'{"prompt": "Hi"' + b', "x": {"y": ' * 2000 + b"1" + b"}" * 2000 + b"}",
        b'{"prompt": "Hi", "prompt": 5}',
        b'{"prompt": "Hi", "max_tokens": "2"}',
    ]
    bodies: list[dict] = [
        {"prompt": "Hi", "n": 10**30},
        {"prompt": "Hi", "n": -1},
        {"prompt": "Hi", "max_tokens": 10**9},
        {"prompt": "Hi", "max_tokens": 10**100},
        {"prompt": "Hi", "max_tokens": -(2**63)},
        {"prompt": "Hi", "seed": 2**64 + 5},
        {"prompt": "Hi", "seed": -(2**70)},
        {"prompt": "Hi", "top_k": 1.5},
        {"prompt": "Hi", "min_tokens": 10**12},
        {"prompt": "Hi", "logprobs": 10**6},
        {"prompt": "Hi", "temperature": 1e308},
        {"prompt": "Hi", "repetition_penalty": 1e-320},
        {"prompt": "Hi", "stop": ["y" * 1000] * 1000},
        {"prompt": "Hi", "stop": [""]},
        {"prompt": "Hi", "stop": [None]},
        {"prompt": [10**12]},
        {"prompt": [[]]},
        {"prompt": [[1], []]},
        {"prompt": ["Hi"] * 1000},
        {"prompt": [[1, 2]] * 100, "n": 2},
        {"prompt": [1] * 5000},
        {"prompt": "The fox. " * 3000},
        {"prompt": {"text": "Hi"}},
        {"prompt": True},
        {"prompt": None},
        {"prompt": "Hi", "echo": True, "stream": True},
        {"prompt": "Hi", "suffix": "x"},
        {"prompt": "Hi", "logit_bias": {"1": 100}},
        {"prompt": "Hi", "best_of": 10**6},
        {"prompt": "Hi", "ttscale": {"strategy": "majority@100000"}},
        {"prompt": "Hi", "ttscale": {"strategy": "beam@1000000/2"}},
        {"prompt": "Hi", "ttscale": {"strategy": "majority@8"}, "max_tokens": 10**6},
        {"prompt": "Hi", "ttscale": {"strategy": "x" * 10000}},
        {"prompt": "Hi", "ttscale": {"strategy": "bon@2", "scorer": "rm:/etc/passwd"}},
        {"prompt": "Hi", "ttscale": "majority@2"},
        {"prompt": "Hi", "ttscale": {"strategy": "majority@2"}, "stream": True},
        {"prompt": "Hi", "model": "../../etc/passwd"},
        {"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": []}},
        {"prompt": "Hi", "guided_json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}},
        {"prompt": "Hi", "guided_json": json.dumps({"a": 1}) * 10_000},
        {"prompt": "Hi", "guided_json": "[" * 3000 + "]" * 3000},
        {"prompt": "Hi", "guided_regex": "(" * 3000},
        {"prompt": "Hi", "guided_regex": "a" * 100_000},
        {"prompt": "Hi", "guided_choice": ["x"] * 100_000},
        {"prompt": "Hi", "guided_choice": [""]},
        {"prompt": "Hi", "guided_grammar": "root ::= root"},
        {"prompt": "Hi", "structured_outputs": {"json": True}},
        {"prompt": "Hi", "guided_regex": "[0-9]", "min_tokens": 1},
    ]
    chat: list[dict | bytes] = [
        {"messages": []},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
        {"messages": [{"role": "user", "content": "Hi"}] * 5000},
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        {"messages": HELLO, "max_completion_tokens": 10**9},
        {"messages": HELLO, "top_logprobs": 5},
        {"messages": HELLO, "logprobs": True, "top_logprobs": 10**6},
        {"messages": HELLO, "tools": [{"type": "function"}]},
        {"messages": HELLO, "n": 10**6, "max_tokens": 10**6},
        {"messages": HELLO, "ttscale": {"strategy": "majority@100000"}, "max_tokens": 2},
    ]
    out: list[tuple[str, bytes | dict]] = [(COMPLETIONS, b) for b in raw]
    out += [(CHAT, b) for b in raw[:6]]
    out += [(COMPLETIONS, {"model": MODEL, "max_tokens": 2, **b}) for b in bodies]
    out += [
        (CHAT, b if isinstance(b, bytes) else {"model": MODEL, "max_tokens": 2, **b}) for b in chat
    ]
    return out


HOSTILE = _hostile()


def test_hostile_inputs_are_4xx_and_the_server_stays_healthy(api):
    assert len(HOSTILE) >= 60
    statuses = []
    rss0 = rss_mb()
    for path, body in HOSTILE:
        t0 = time.monotonic()
        r = post(api, path, body, timeout=30)
        assert 400 <= r.status_code < 500, (str(body)[:200], r.status_code, r.text[:300])
        assert "error" in r.json()
        assert time.monotonic() - t0 < 10, str(body)[:200]
        statuses.append(r.status_code)
    assert set(statuses) <= {400, 404, 413, 422}
    # The OOM request (majority@100000) is among them: memory stays bounded.
    growth = rss_mb() - rss0
    print(f"\n{len(HOSTILE)} hostile bodies: RSS +{growth:.0f} MB")
    assert growth < 200
    assert httpx.get(api.url + "/health").status_code == 200
    api.wait_pool_full()
    r = post(api, COMPLETIONS, C)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"]
