"""A reward model (outcome or process) run on its own ttscale engine.

The RM is our decoder with a score head (models/reward.py), loaded from a safetensors folder
by our loader. Its engine computes each candidate as an embedding request over the paged KV:
no sampling, and the prefix cache serves what branches share (the question, a common path),
so scoring N branches of one problem computes the shared prefix once, and scoring a path
again after one more step computes only the new tokens. The head reads only the rows it
needs (the last token, or the step separators).
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Sequence
from pathlib import Path

import torch

from ttscale.engine.llm_engine import LLMEngine
from ttscale.engine.scheduler import SchedulerConfig
from ttscale.engine.sequence import Request
from ttscale.errors import ModelLoadError
from ttscale.kvcache import CacheConfig
from ttscale.loader import load_checkpoint, read_model_config
from ttscale.models.registry import build_model
from ttscale.models.reward import (
    PRM_STEP_TOKEN,
    Qwen2ForRewardModel,
    RewardModel,
    RewardModelConfig,
)
from ttscale.scorers.base import AGGREGATIONS, ScoreContext, aggregate
from ttscale.tts.session import Branch, Wait

# The system turn of Qwen2.5-Math-RM and -PRM's model cards.
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class RewardModelScorer:
    """Scores candidates with a reward model from a local folder (safetensors only).

    Text given to the RM:
    - sequence classifiers (`*ForSequenceClassification`): `question + "\\n\\n" + solution`;
    - `Qwen2ForRewardModel`: its chat format (system, user = question, assistant = solution);
    - `Qwen2ForProcessRewardModel`: the same chat format with `<extra_0>` after each step. The
      steps are the branch's path (root to leaf), each split at blank lines (the model card's
      step convention); the branch's score aggregates its step rewards (`aggregation`,
      default "last": the reward of its latest step, as the Scorer protocol asks).
    Scores lie in [0, 1] (sigmoid of one logit, else the last class's probability), so they
    can weight votes. An outcome RM scores a partial path as it is, so it serves step-level
    search too. Inputs past the RM's context keep their first tokens (as transformers'
    truncation does); a path cut before its first separator scores 0.
    """

    name = "reward_model"

    def __init__(
        self,
        path: str | Path,
        *,
        aggregation: str = "last",
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        max_model_len: int | None = None,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
        self.aggregation = aggregation
        path = Path(path).expanduser()
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise ModelLoadError(f"reward model folder {path} {what}")
        # Checked before any weight is read: the architecture, then the weights' format.
        config = RewardModelConfig.from_hf(read_model_config(path)[0])
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"reward model {path} has no safetensors weights (ttscale never unpickles "
                "model files, since that can run arbitrary code)"
            )
        checkpoint = load_checkpoint(path, dtype)
        self.model: RewardModel = build_model(config, checkpoint.tensors, dtype, device)
        self.tokenizer = checkpoint.tokenizer
        self.step_token_id = self._step_token_id() if self.model.is_process else None
        self.engine = LLMEngine(
            self.model,
            self.tokenizer,
            cache_config or CacheConfig(),
            scheduler_config or SchedulerConfig(),
            device,
            max_model_len,
        )
        # Qwen's math RMs were trained on chat transcripts; sequence classifiers on plain text.
        self.uses_chat = self.model.is_process or (
            isinstance(self.model, Qwen2ForRewardModel) and self.tokenizer.has_chat_template
        )
        # Per token list of the last call: leading tokens served by the prefix cache.
        self.last_cached_tokens: list[int] = []
        self._ids = itertools.count()

    # ---- public scoring -------------------------------------------------------------------

    def score(
        self, ctx: ScoreContext, branches: Sequence[Branch]
    ) -> Generator[Wait, None, list[float]]:
        """One score per branch. The RM runs on its own engine, here and now: nothing for the
        policy's engine to wait for."""
        yield from ()
        if self.model.is_process:
            steps = [path_steps(b) for b in branches]
            last_only = self.aggregation == "last"
            rewards = self.step_rewards(ctx.question, steps, last_only=last_only)
            return [aggregate(r, self.aggregation) for r in rewards]
        return self.score_ids([self.encode(ctx.question, b.text) for b in branches])

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Outcome rewards of whole texts, tokenized as given (special tokens added)."""
        self._require_outcome()
        return self.score_ids([self.tokenizer.encode(t) for t in texts])

    def score_ids(self, token_lists: Sequence[Sequence[int]]) -> list[float]:
        """Outcome rewards of token lists: one per list, read where the model pools."""
        self._require_outcome()
        return [r[0] for r in self._rewards(token_lists, last_only=True)]

    def step_rewards(
        self, question: str, step_lists: Sequence[Sequence[str]], last_only: bool = False
    ) -> list[list[float]]:
        """A process RM's reward of every step, per list of steps (the model card's
        `make_step_rewards`); with `last_only`, of the last step only, which lets the prefix
        cache serve every earlier token."""
        if not self.model.is_process:
            raise ValueError(f"{self.model.config.architecture} is an outcome reward model")
        token_lists = [self.encode_steps(question, steps) for steps in step_lists]
        return self._rewards(token_lists, last_only)

    # ---- text formats ---------------------------------------------------------------------

    def encode(self, question: str, solution: str) -> list[int]:
        """An outcome RM's input for one candidate (see the class docstring)."""
        if not self.uses_chat:
            return self.tokenizer.encode(f"{question}\n\n{solution}")
        return self._encode_chat(question, solution)

    def encode_steps(self, question: str, steps: Sequence[str]) -> list[int]:
        """A process RM's input: the chat with `<extra_0>` after every step (model card:
        `"<extra_0>".join(steps) + "<extra_0>"` as the assistant turn)."""
        clean = [s.replace(PRM_STEP_TOKEN, "") for s in steps] or [""]
        return self._encode_chat(question, PRM_STEP_TOKEN.join(clean) + PRM_STEP_TOKEN)

    def _encode_chat(self, question: str, answer: str) -> list[int]:
        messages = [
            {"role": "system", "content": QWEN_MATH_SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        # The template writes its own special tokens; the model card encodes it as is.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _step_token_id(self) -> int:
        if not self.tokenizer.has_chat_template:
            raise ModelLoadError("a process reward model needs its tokenizer's chat template")
        ids = self.tokenizer.encode(PRM_STEP_TOKEN, add_special_tokens=False)
        if len(ids) != 1 or self.tokenizer.convert_ids_to_tokens(ids) != [PRM_STEP_TOKEN]:
            raise ModelLoadError(
                f"the process reward model's tokenizer has no {PRM_STEP_TOKEN} token (its "
                "step separator)"
            )
        return ids[0]

    def _require_outcome(self) -> None:
        if self.model.is_process:
            raise ValueError("a process reward model scores steps: use step_rewards()")

    # ---- the engine -----------------------------------------------------------------------

    def _rewards(self, token_lists: Sequence[Sequence[int]], last_only: bool) -> list[list[float]]:
        """Rewards at each list's pooling positions (only the last one with `last_only`)."""
        limit = self.engine.max_model_len - 1  # the engine keeps room for one more token
        jobs: list[tuple[list[int], list[int]]] = []  # (ids up to the last read, positions)
        for ids in token_lists:
            ids = [int(t) for t in ids][:limit]
            positions = self.model.reward_positions(ids, self.step_token_id)
            if last_only:
                positions = positions[-1:]
            # Causal: nothing after the last position read changes what is read.
            jobs.append((ids[: positions[-1] + 1] if positions else [], positions))
        runnable = [(ids, pos) for ids, pos in jobs if pos]
        states = self._hidden_states([ids for ids, _ in runnable], [p[0] for _, p in runnable])
        rows = [s[[p - pos[0] for p in pos]] for s, (_, pos) in zip(states, runnable, strict=True)]
        flat = iter(self.model.rewards(torch.cat(rows)).tolist() if rows else [])
        return [[next(flat) for _ in positions] for _, positions in jobs]

    def _hidden_states(self, token_lists: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        """Final-norm hidden states (len - start, hidden) per list, from the engine.

        Branches of one problem share a prefix, but requests admitted in the same step cannot
        hit each other's blocks (a block is cached once computed). So the shared prefix's full
        blocks are computed first, alone, like a parent before a fork; every list then finds
        them in the prefix cache.
        """
        engine = self.engine
        layers = [self.model.config.num_hidden_layers]  # after the final norm: what heads read
        self.last_cached_tokens = []
        if not token_lists:
            return []
        shared = _common_prefix(token_lists)
        shared = shared[: len(shared) // engine.block_size * engine.block_size]
        if len(token_lists) > 1 and shared:
            self._run([shared], [len(shared) - 1], layers)
        requests = self._run(token_lists, starts, layers)
        self.last_cached_tokens = [r.num_cached_prompt_tokens for r in requests]
        return [r.sequences[0].hidden_states[:, 0] for r in requests]

    def _run(
        self, token_lists: list[list[int]], starts: list[int], layers: list[int]
    ) -> list[Request]:
        """Runs embedding requests to completion; they are released before returning."""
        engine = self.engine
        requests = []
        try:
            for ids, start in zip(token_lists, starts, strict=True):
                rid = f"rm-{next(self._ids)}"
                requests.append(engine.add_embed_request(rid, ids, layers, start))
            while not all(r.finished for r in requests):
                engine.step()
            return requests
        finally:
            for r in requests:
                engine.abort(r.request_id)


def path_steps(branch: Branch) -> list[str]:
    """The steps of a branch's path, root first: each step's text split at blank lines
    (Qwen's PRM card: steps are separated by "\\n\\n"), stripped, empty ones dropped."""
    texts: list[str] = []
    node: Branch | None = branch
    while node is not None:
        texts.append(node.step_text)
        node = node.parent
    steps = [part.strip() for text in reversed(texts) for part in text.split("\n\n")]
    return [s for s in steps if s] or [""]


def _common_prefix(token_lists: Sequence[Sequence[int]]) -> list[int]:
    first = token_lists[0]
    n = min(len(ids) for ids in token_lists)
    for ids in token_lists[1:]:
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    return list(first[:n])
