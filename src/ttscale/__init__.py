"""ttscale: efficient test-time scaling of language models."""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports (PEP 562): `import ttscale.models...` must not pull in the engine, torch
# threads or transformers' tokenizer stack until they are used.
_EXPORTS = {
    "LLM": "ttscale.llm",
    "SamplingParams": "ttscale.sampling.params",
    "GREEDY": "ttscale.sampling.params",
    "RequestOutput": "ttscale.engine.outputs",
    "CompletionOutput": "ttscale.engine.outputs",
    "Usage": "ttscale.engine.outputs",
    "ModelLoadError": "ttscale.loader.errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ttscale' has no attribute {name!r}")
