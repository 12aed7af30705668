"""Structured outputs over HTTP: response_format (json_object, json_schema), vLLM's
structured_outputs and guided_* fields, with n > 1 and streaming, on a tiny random model (a
grammar makes even random weights produce valid output); the openai client's
`chat.completions.parse` with a pydantic model and json_object mode on the embedded model."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest
from pydantic import BaseModel

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

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "blue"]}},
    "required": ["ok", "colour"],
    "additionalProperties": False,
}
H = {"model": MODEL, "messages": HELLO, "max_tokens": 64, "temperature": 2.0, "seed": 0}
C = {"model": MODEL, "prompt": "Hello", "max_tokens": 64, "temperature": 2.0, "seed": 0}


@pytest.fixture(scope="module")
def api(model_dir) -> Iterator[LiveServer]:  # noqa: F811
    with serve_in_thread(tiny_llm(model_dir), max_n=8) as live:
        yield live


@pytest.fixture(autouse=True)
def _pool_full_after(request):
    yield
    if "api" in request.fixturenames:
        request.getfixturevalue("api").wait_pool_full()


def assert_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"ok", "colour"}
    assert isinstance(value["ok"], bool) and value["colour"] in ("red", "blue")


def test_json_schema_with_n_samples(api):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    r = post(api, CHAT, {**H, "n": 4, "response_format": fmt})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert_schema(choice["message"]["content"])
        assert choice["finish_reason"] == "stop"


def test_json_object_streamed(api):
    body = {**H, "n": 2, "max_tokens": 200, "stream": True}
    body["response_format"] = {"type": "json_object"}
    body["temperature"] = 0.0
    texts = {0: "", 1: ""}
    finish = {}
    with httpx.stream("POST", api.url + CHAT, json=body, timeout=60) as r:
        assert r.status_code == 200
        for event in sse_events(r.iter_lines()):
            if event == "[DONE]":
                break
            for c in event["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
                finish[c["index"]] = c["finish_reason"] or finish.get(c["index"])
    for i, text in texts.items():
        if finish[i] == "stop":  # a random model may fill 200 tokens with one long string
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")


@pytest.mark.parametrize(
    ("path", "extra", "pattern"),
    [
        (CHAT, {"guided_choice": ["yes", "no", 'a "quote"']}, r'yes|no|a "quote"'),
        (COMPLETIONS, {"guided_regex": r"Answer: [0-9]{1,4}"}, r"Answer: [0-9]{1,4}"),
        (COMPLETIONS, {"structured_outputs": {"regex": r"[a-c]{3}"}}, r"[a-c]{3}"),
        (CHAT, {"structured_outputs": {"choice": ["left", "right"]}}, r"left|right"),
        (CHAT, {"guided_grammar": 'root ::= "x" [0-9]'}, r"x[0-9]"),
    ],
)
def test_vllm_guided_fields(api, path, extra, pattern):
    base = H if path == CHAT else C
    r = post(api, path, {**base, "n": 3, **extra})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        text = choice["message"]["content"] if path == CHAT else choice["text"]
        assert re.fullmatch(pattern, text), text


def test_guided_json_streamed_completions_batch(api):
    body = {**C, "prompt": ["Hi", "Bye"], "n": 2, "guided_json": SCHEMA, "stream": True}
    texts: dict[int, str] = {}
    with httpx.stream("POST", api.url + COMPLETIONS, json=body, timeout=60) as r:
        assert r.status_code == 200
        for event in sse_events(r.iter_lines()):
            if event != "[DONE]":
                for c in event["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert sorted(texts) == [0, 1, 2, 3]
    for text in texts.values():
        assert_schema(text)


def test_echo_with_a_grammar_prepends_the_prompt(api):
    body = {**C, "n": 2, "echo": True, "logprobs": 1, "guided_choice": ["yes", "no"]}
    r = post(api, COMPLETIONS, body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["text"] in ("Helloyes", "Hellono")
        assert choice["logprobs"]["token_logprobs"][0] is None  # the echoed prompt's first


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (CHAT, {"response_format": {"type": "xml"}}, "response_format"),
        (CHAT, {"response_format": {"type": "json_schema"}}, "response_format"),
        (
            CHAT,
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format",
        ),
        (COMPLETIONS, {"guided_regex": "(unclosed"}, "guided_regex"),
        (COMPLETIONS, {"guided_regex": 5}, "guided_regex"),
        (CHAT, {"guided_choice": []}, "guided_choice"),
        (CHAT, {"guided_choice": "yes"}, "guided_choice"),
        (CHAT, {"guided_json": "{not json"}, "guided_json"),
        (CHAT, {"guided_grammar": "root ::= missing"}, "guided_grammar"),
        (CHAT, {"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs"),
        (CHAT, {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
        (CHAT, {"structured_outputs": "json"}, "structured_outputs"),
        (CHAT, {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        (CHAT, {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        (CHAT, {"guided_regex": "a", "min_tokens": 2}, "min_tokens"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_malformed_structured_requests_are_400_naming_the_field(api, path, extra, param):
    base = H if path == CHAT else C
    r = post(api, path, {**base, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# ---- strategies: every candidate follows the grammar, votes need no free-text parsing -------


def tts(strategy: str, **extra) -> dict:
    return {**H, "temperature": 3.0, "ttscale": {"strategy": strategy, "hygiene": False}, **extra}


def test_majority_votes_on_choices_and_canonical_json(api):
    r = post(api, CHAT, tts("majority@4", guided_choice=["yes", "no"]))
    assert r.status_code == 200, r.text
    reply = r.json()
    assert set(reply["ttscale"]["votes"]) <= {"yes", "no"}
    assert reply["choices"][0]["message"]["content"] == reply["ttscale"]["answer"]

    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    r = post(api, CHAT, tts("majority@3", response_format=fmt))
    assert r.status_code == 200, r.text
    reply = r.json()
    assert_schema(reply["choices"][0]["message"]["content"])
    for key in reply["ttscale"]["votes"]:  # canonical JSON: sorted keys, no spaces
        assert key == json.dumps(json.loads(key), sort_keys=True, separators=(",", ":"))


def test_step_search_continues_the_grammar_across_steps(api):
    # beam search forks each step's survivors with the step's params: the same grammar, so
    # the children continue their parent's parse (free text, a blank line, then the answer).
    pattern = r"[a-z]{1,6}\n\nAnswer: [0-9]"
    r = post(api, COMPLETIONS, {**tts("beam@4/2", guided_regex=pattern), "prompt": "Hi"})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["ttscale"]["extra"].get("no_finished") is None
    for c in reply["ttscale"]["candidates"]:
        if c["finish_reason"] == "stop":
            assert re.fullmatch(pattern, c["text"]), c["text"]
    assert re.fullmatch(pattern, reply["choices"][0]["text"])


# ---- the embedded model, through the openai client -------------------------------------------


class Place(BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def real() -> Iterator[LiveServer]:
    from ttscale import LLM

    with serve_in_thread(LLM(kv_cache_gb=0.1), model_names=("smol",)) as live:
        yield live


@pytest.mark.slow
def test_openai_parse_with_a_pydantic_model(real):
    client = real.client()
    reply = client.chat.completions.parse(
        model="smol",
        messages=[{"role": "user", "content": "Where is the Eiffel Tower? Answer in JSON."}],
        response_format=Place,
        temperature=0,
        max_tokens=64,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Place)
    assert choice.message.parsed.city == "Paris"  # greedy, from the model, not the grammar
    real.wait_pool_full()


@pytest.mark.slow
def test_openai_json_object_mode_returns_json(real):
    client = real.client()
    reply = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Give the name and age of a person as JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=128,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)
    real.wait_pool_full()
