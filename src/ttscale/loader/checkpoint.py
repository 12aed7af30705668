"""What every loader returns: an HF-style config, HF-named tensors and the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ttscale.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: dict[str, Any]  # the content of a config.json
    tensors: dict[str, torch.Tensor]  # Hugging Face parameter names
    tokenizer: Tokenizer
    source: str  # path it came from, for messages
