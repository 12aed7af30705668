"""Structured outputs: the request fields that name a grammar -> a compiled `Grammar`.

Accepted, one per request (two are a 400 naming the second):

* OpenAI's ``response_format``: ``{"type": "text"}`` (no grammar), ``{"type": "json_object"}``
  (any JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
  (what ``client.chat.completions.parse`` sends for a pydantic model);
* vLLM's ``structured_outputs``: ``{"json": schema}``, ``{"regex": str}``, ``{"choice": [str]}``,
  ``{"grammar": ebnf}`` or ``{"json_object": true}``;
* vLLM's older ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``.

Schemas are compiled strict (no properties beyond the schema's) and compact (no whitespace
between JSON tokens). Compilation runs on the app's grammar thread (a slow schema never delays
another request's tokenization), and xgrammar caches compiled grammars by source, so a schema
repeated by every request of a client is compiled once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ttscale.llm import LLM
from ttscale.sampling.constraints import ConstraintError, Grammar, GrammarCompiler
from ttscale.server.errors import APIError

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_VLLM_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# Keys of vLLM's structured_outputs that only tune the backend: accepted and ignored.
_VLLM_NEUTRAL = ("backend", "disable_fallback", "disable_any_whitespace", "whitespace_pattern")


class Grammars:
    """The app's grammar compiler, built on first use (0.2 s for a 49k vocabulary)."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(
                    self._llm.tokenizer, self._llm.engine.model_config.vocab_size
                )
            return self._compiler


@dataclass(frozen=True)
class Structured:
    grammar: Grammar
    field: str  # the request field that asked for it (errors name it)


def requested_grammar(body: Any, grammars: Grammars) -> Structured | None:
    """The grammar the body asks for, or None; APIError 400 for a malformed or uncompilable
    one (`param` names the field)."""
    found: list[tuple[str, Any]] = []
    fmt = body.response_format
    if fmt is not None:
        kind = fmt.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(
                400,
                f"response_format type {kind!r} is not one of text, json_object, json_schema",
                param="response_format",
            )
        if kind != "text":
            found.append(("response_format", fmt))
    if body.structured_outputs not in (None, {}):
        found.append(("structured_outputs", body.structured_outputs))
    for name in _GUIDED:
        if getattr(body, name, None) is not None:
            found.append((name, getattr(body, name)))
    if not found:
        return None
    if len(found) > 1:
        raise APIError(
            400,
            f"give one structured-output field; got {found[0][0]} and {found[1][0]}",
            param=found[1][0],
        )
    ((field, value),) = found
    compiler = grammars.compiler
    try:
        return Structured(_compile(field, value, compiler), field)
    except ConstraintError as e:
        raise APIError(400, f"{field}: {e}", param=field) from None


def _compile(field: str, value: Any, c: GrammarCompiler) -> Grammar:
    if field == "response_format":
        if value["type"] == "json_object":
            return c.json_object()
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ConstraintError('json_schema must be {"name": ..., "schema": {...}}')
        return c.json_schema(spec["schema"])
    if field == "structured_outputs":
        if not isinstance(value, dict):
            raise ConstraintError("must be an object such as {'json': schema} or {'regex': ...}")
        unknown = set(value) - set(_VLLM_KEYS) - set(_VLLM_NEUTRAL)
        if unknown:
            raise ConstraintError(
                f"unsupported key {sorted(unknown)[0]!r}; one of {', '.join(_VLLM_KEYS)}"
            )
        given = [k for k in _VLLM_KEYS if value.get(k) not in (None, False)]
        if len(given) != 1:
            raise ConstraintError(f"give exactly one of {', '.join(_VLLM_KEYS)}")
        (key,) = given
        if key == "json_object":
            return c.json_object()
        return _compile(f"guided_{key}", value[key], c)
    if field == "guided_json":
        if not isinstance(value, dict | str):
            raise ConstraintError("must be a JSON schema (an object or its text)")
        return c.json_schema(value)
    if field == "guided_choice":
        if not isinstance(value, list):
            raise ConstraintError("must be a list of strings")
        return c.choice(value)
    if not isinstance(value, str):
        raise ConstraintError("must be a string")
    return c.regex(value) if field == "guided_regex" else c.ebnf(value)


__all__ = ["Grammars", "Structured", "requested_grammar"]
