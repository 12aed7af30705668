"""Every error type ttscale raises on purpose, in the lowest layer so any package can raise one.

Each message names what is wrong and what to change, in one sentence, so callers (the CLI,
the server) can show it as-is instead of a stack trace.
"""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model file is missing, malformed or uses something ttscale does not support."""


class SamplingParamsError(ValueError):
    """An impossible sampling parameter; `field` names it (the server maps it to the API's
    `param`)."""

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"invalid sampling parameter {field}={value!r}: {why}")
        self.field = field


class PromptTooLongError(ValueError):
    """The prompt leaves no room for a generated token in the context."""


class StepError(RuntimeError):
    """A step failed; `request_ids` are the requests it was computing (their state may be
    partial: abort them). Requests outside the step are untouched. The cause is chained."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(
            f"engine step over requests {request_ids} failed: {type(cause).__name__}: {cause}"
        )
        self.request_ids = request_ids


class NoFreeBlocksError(RuntimeError):
    """Not enough allocatable blocks (free + evictable) for the request; nothing was changed."""


class StrategySpecError(ValueError):
    """A strategy spec string (`majority@16`, `beam@16/4`) that does not parse or names an
    unknown strategy."""


class ProbeError(ValueError):
    """A probe verifier folder is missing, damaged, or made for another model."""
