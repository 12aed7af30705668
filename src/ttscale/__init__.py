"""ttscale: efficient test-time scaling of language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ttscale.engine.outputs import CompletionOutput, RequestOutput, Usage
from ttscale.errors import ModelLoadError
from ttscale.sampling.params import GREEDY, SamplingParams

if TYPE_CHECKING:
    from ttscale.llm import LLM

__all__ = [
    "GREEDY",
    "LLM",
    "CompletionOutput",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
    "Usage",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `LLM` alone is loaded on first use (PEP 562), not to dodge a cycle but for speed: every
    # `import ttscale.<anything>` runs this file, and the engine behind `LLM` pulls in torch
    # and transformers' tokenizer stack (seconds: docs/BENCHMARKS.md), which `ttscale --help`,
    # the cost model and the light modules must not pay for.
    if name == "LLM":
        from ttscale.llm import LLM

        return LLM
    raise AttributeError(f"module 'ttscale' has no attribute {name!r}")
