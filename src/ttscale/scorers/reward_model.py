"""A Hugging Face reward model (outcome RM, or a PRM used as a sequence classifier)."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path

import torch

from ttscale.errors import ModelLoadError
from ttscale.scorers.base import ScoreContext
from ttscale.tts.session import Branch, Wait


class RewardModelScorer:
    """Scores `question + solution so far` with an `AutoModelForSequenceClassification`
    checkpoint from a local folder (safetensors only). One label: sigmoid of its logit;
    several: the probability of the last label (the "good" class by convention). Either way
    scores lie in [0, 1], so they can weight votes. Scoring a partial path
    gives a process score, so any outcome RM also serves step-level search."""

    name = "reward_model"

    def __init__(self, path: str | Path, batch_size: int = 8) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"reward model folder {path} has no config.json")
        if not list(path.glob("*.safetensors")):
            raise ModelLoadError(f"reward model {path} has no safetensors weights (no pickles)")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(path), use_safetensors=True, local_files_only=True
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    @torch.inference_mode()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=getattr(self.model.config, "max_position_embeddings", 2048),
            )
            logits = self.model(**batch).logits.float()
            if logits.shape[-1] == 1:
                scores += logits[:, 0].sigmoid().tolist()
            else:
                scores += logits.softmax(-1)[:, -1].tolist()
        return scores

    def score(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        yield from ()  # no engine work; a generator like every scorer
        return self.score_texts([f"{ctx.question}\n\n{b.text}" for b in branches])
