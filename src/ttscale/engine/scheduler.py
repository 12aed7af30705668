"""Continuous batching by token budget, with chunked prefill and preemption by recomputation.

The scheduler schedules *tokens*, not phases (as vLLM v1): every running sequence wants
`num_tokens - num_computed_tokens` tokens computed (a prompt chunk, or the one token sampled
last step) and gets as many as the step's budget allows, oldest first. Its output is a plain
`SchedulerOutput` the model runner can execute without seeing any engine object.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ttscale.engine.block_manager import BlockManager
from ttscale.engine.sequence import Sequence, SequenceStatus
from ttscale.errors import NoFreeBlocksError


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # tokens computed per step, prefill and decode together
    max_num_seqs: int = 256  # sequences in one step
    enable_chunked_prefill: bool = True  # split long prompts across steps

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: compute `token_ids` at positions start_pos..."""

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    # Logits of the last num_logits rows: 0 mid-prefill, 1 when the chunk ends at the
    # sequence's last token, 1 + k when the chunk carries k speculative tokens to verify.
    num_logits: int = 1
    return_hidden: bool = False  # hidden states of every row (SchedulerOutput.hidden_layers)
    kv_budget: int | None = None  # block top-k token budget of decode rows; None: dense

    @property
    def sample(self) -> bool:
        return self.num_logits > 0


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write src->dst
    preempted: list[int] = field(default_factory=list)
    hidden_layers: tuple[int, ...] = ()  # union of the embedding sequences' layers

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


class Scheduler:
    """Owns the waiting queue and the running set; allocates KV through the block manager.

    Invariants: a RUNNING sequence holds blocks for exactly `num_computed_tokens` positions
    between steps; a WAITING one holds none. FCFS: a waiting request is admitted only when
    every older one has been.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked child: it shares its parent's blocks, so it is running at once."""
        self.running.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drops a finished or aborted sequence from the queues (blocks are freed by the engine)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []

        # 1. Running sequences, oldest first; preempt the newest when blocks run out.
        self.running.sort(key=lambda s: s.priority)
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            if seq.num_draft_tokens and seq.num_tokens - seq.num_computed_tokens > budget:
                seq.drop_drafts()  # drafts are verified whole or not at all
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            copies = self._reserve(seq, num_new, queue, out)
            if copies is None:
                continue  # seq itself was preempted
            out.block_copies += copies
            scheduled.append((seq, num_new))
            budget -= num_new

        # 2. Waiting sequences, FCFS, unless this step already had to preempt.
        num_seqs = len(self.running)
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            # A parent that will fork into n samples counts as n sequences.
            weight = seq.request.params.n if not seq.request.forked else 1
            if num_seqs + weight > self.config.max_num_seqs and num_seqs > 0:
                break
            remaining = seq.num_tokens - self._admit_prefix(seq)
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                self.block_manager.free(seq.seq_id)
                break
            try:
                out.block_copies += self.block_manager.append_slots(seq.seq_id, num_new)
            except NoFreeBlocksError:
                self.block_manager.free(seq.seq_id)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
            num_seqs += weight

        layers: set[int] = set()
        for seq, num_new in scheduled:
            start = seq.num_computed_tokens
            complete = start + num_new == seq.num_tokens
            capture = seq.hidden_layers is not None
            if capture:
                layers.update(seq.hidden_layers)
            out.seqs.append(
                ScheduledSeq(
                    seq_id=seq.seq_id,
                    token_ids=seq.token_ids[start : start + num_new],
                    start_pos=start,
                    block_table=self.block_manager.block_table(seq.seq_id),
                    num_logits=1 + seq.num_draft_tokens if complete and not seq.embed_only else 0,
                    return_hidden=capture,
                )
            )
        out.hidden_layers = tuple(sorted(layers))
        return out

    def _admit_prefix(self, seq: Sequence) -> int:
        """Registers the sequence with the block manager, reusing cached prefix blocks."""
        cached = self.block_manager.allocate_prefix(seq.seq_id, seq.token_ids[: seq.cacheable_len])
        seq.num_computed_tokens = cached
        if seq.num_preemptions == 0 and seq.num_output_tokens == 0:
            seq.request.num_cached_prompt_tokens = max(seq.request.num_cached_prompt_tokens, cached)
        return cached

    def _reserve(
        self, seq: Sequence, num_new: int, queue: list[Sequence], out: SchedulerOutput
    ) -> list[tuple[int, int]] | None:
        """append_slots for seq, preempting the newest other sequences until it fits."""
        while True:
            try:
                return self.block_manager.append_slots(seq.seq_id, num_new)
            except NoFreeBlocksError:
                victims = [s for s in queue if s is not seq]
                victim = max(victims, key=lambda s: s.priority) if victims else seq
                if victim in queue:
                    queue.remove(victim)
                self._preempt(victim, out)
                if victim is seq:
                    return None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Frees the sequence's blocks; it re-enters the waiting queue and will be recomputed
        (its tokens and RNG state are kept, so the continuation is unchanged)."""
        self.block_manager.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        out.preempted.append(seq.seq_id)
        # Back to the queue in age order, so it resumes before younger requests.
        waiting = sorted([*self.waiting, seq], key=lambda s: s.priority)
        self.waiting = deque(waiting)
