"""The engine loop: schedule -> run -> update, plus add_request / fork / abort.

This is the low-level API strategies and the server build on. One `step()` advances every
running sequence by the tokens the scheduler granted and returns the outputs that changed.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence as Seq
from typing import Protocol

import torch

from ttscale.cost.hardware import Hardware
from ttscale.cost.meter import CostMeter
from ttscale.cost.shapes import StepShape
from ttscale.engine.block_manager import BlockManager
from ttscale.engine.executor import Executor, StepResult
from ttscale.engine.model_runner import ModelRunner
from ttscale.engine.outputs import CompletionOutput, RequestOutput, Usage
from ttscale.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from ttscale.engine.sequence import Request, Sequence, SequenceStatus
from ttscale.errors import PromptTooLongError, StepError
from ttscale.kvcache import CacheConfig
from ttscale.kvcache.config import check_sparse
from ttscale.kvcache.quant import kv_bytes_per_value
from ttscale.models.compiled import CompileConfig
from ttscale.models.quant import kv_dtype
from ttscale.sampling.detokenizer import IncrementalDetokenizer
from ttscale.sampling.params import SamplingParams
from ttscale.sampling.sampler import Sampler, SamplingRow, make_generator
from ttscale.tokenizer import Tokenizer


class Proposer(Protocol):
    """Proposes speculative tokens for a decoding sequence (a draft model, n-gram lookup,
    ...). The engine verifies them all in the sequence's next step and keeps the longest
    prefix the model itself would have sampled. A proposer that also has
    `propose_batch([(seq_id, token_ids, max_tokens), ...]) -> [drafts, ...]` gets every
    decoding sequence of a step in one call (a draft model batches them)."""

    def propose(self, seq_id: int, token_ids: Seq[int]) -> list[int]:
        """Up to k tokens that may follow `token_ids` (prompt + generated so far)."""
        ...


class LLMEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        cache_config: CacheConfig = CacheConfig(),
        scheduler_config: SchedulerConfig = SchedulerConfig(),
        device: torch.device | str = "cpu",
        max_model_len: int | None = None,
        hardware: Hardware | None = None,
        executor: Executor | None = None,
        proposer: Proposer | None = None,
        compile_config: CompileConfig | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device)
        self.executor: Executor = executor or ModelRunner(
            model, cache_config, self.device, compile_config
        )
        self.proposer = proposer
        self.cache_config = cache_config
        self.block_manager = BlockManager(
            self.executor.num_blocks,
            cache_config.block_size,
            cache_config.enable_prefix_caching,
            evict_before_growing=cache_config.evict_before_growing,
        )
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.sampler = Sampler()
        dtype = next(model.parameters()).dtype
        kv_bytes = kv_bytes_per_value(
            cache_config.kv_cache_dtype,
            model.config.head_dim,
            cache_config.pool_dtype(kv_dtype(model)),
            cache_config.block_size,
        )
        self.cost_meter = CostMeter(model.config, dtype, hardware, kv_bytes=kv_bytes)
        # A sequence longer than the pool could never run, even alone: cap it.
        pool_tokens = self.executor.num_blocks * cache_config.block_size
        limit = min(max_model_len or model.config.max_position_embeddings, pool_tokens)
        self.max_model_len = limit
        self.requests: dict[str, Request] = {}
        self.sequences: dict[int, Sequence] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.stats = {
            "steps": 0,
            "prefill_tokens": 0,
            "decode_tokens": 0,
            "model_time": 0.0,
            "draft_tokens": 0,
            "accepted_draft_tokens": 0,
            "draft_steps": 0,  # sequence-steps that verified drafts: tokens/step = 1 + acc/this
        }
        # What the last step computed and read (the executor's StepShape), for the cost model.
        self.last_step: StepShape | None = None

    # ---- requests -----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        prompt: str | None = None,
        retain: bool = False,
        hidden_layers: Seq[int] | None = None,
        prefix_of: int | None = None,
    ) -> Request:
        """Queues a request. `retain=True` keeps finished sequences' KV until `release()` so a
        search strategy can fork them later. With `hidden_layers`, every sequence keeps the
        hidden states of its generated tokens at those layers as they are computed
        (`Sequence.hidden_states`: each row is the state after reading its token; the last
        sampled token is never computed, see `fork_embed`). `prefix_of`: a sequence holding
        KV whose tokens begin with this prompt (a retained sample of it): the request shares
        that KV for all of the prompt but its last token, which it computes for its logits,
        instead of prefilling again (the prefix cache alone would recompute the partial last
        block: new waves of samples of one prompt)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.validate_prompt(prompt_token_ids)
        self.validate_params(params)
        shared = 0 if prefix_of is None else self._shared_prefix(prefix_of, ids)
        request = Request(request_id, ids, params, next(self._arrivals), prompt, retain=retain)
        seq = self._new_sequence(request, index=0, token_ids=list(ids))
        if hidden_layers is not None:
            seq.hidden_layers, seq.hidden_start = self._check_layers(hidden_layers), len(ids)
        request.forked = params.n == 1
        self.requests[request_id] = request
        if shared:  # running at once on the shared blocks, like a fork
            self.block_manager.fork(prefix_of, [seq.seq_id])
            self.block_manager.truncate(seq.seq_id, shared)
            seq.num_computed_tokens = request.num_cached_prompt_tokens = shared
            seq.status = SequenceStatus.RUNNING
            self.scheduler.add_running(seq)
        else:
            self.scheduler.add(seq)
        return request

    def _shared_prefix(self, prefix_of: int, ids: list[int]) -> int:
        """How many prompt tokens a request can take from `prefix_of`'s KV: all but the last
        (computed again for its logits); ValueError if that sequence cannot give them."""
        shared = len(ids) - 1
        source = self.sequences.get(prefix_of)
        if source is None or not self.block_manager.has_seq(prefix_of):
            raise ValueError(f"prefix_of={prefix_of}: that sequence holds no KV (retain it)")
        if (
            self.block_manager.num_tokens(prefix_of) < shared
            or source.token_ids[:shared] != ids[:shared]
        ):
            raise ValueError(f"prefix_of={prefix_of}: that sequence does not start with the prompt")
        return shared

    def validate_prompt(self, prompt_token_ids: Seq[int]) -> list[int]:
        """The prompt as a list of ids, or ValueError (PromptTooLongError past the context)
        saying what is wrong; the server calls this too, to answer 400 before streaming."""
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; this model's context holds "
                f"{self.max_model_len} (prompt plus at least one generated token)"
            )
        return ids

    def validate_params(self, params: SamplingParams) -> None:
        """ValueError if this engine cannot run the request's attention settings (the server
        calls this too, to answer 400): block top-k needs an engine started with
        sparse_attention="block_topk" (its pool keeps the block mean keys), and a budget of
        at least the sink block + local window + current block."""
        cc = self.cache_config
        policy = params.sparse_attention or cc.sparse_attention
        if policy == "block_topk" and not cc.tracks_block_keys:
            raise ValueError(
                "sparse_attention='block_topk' needs an engine started with "
                "sparse_attention='block_topk' (its KV pool keeps the block mean keys it scores)"
            )
        budget = params.kv_budget if params.kv_budget is not None else cc.kv_budget
        check_sparse(policy, budget, cc.block_size, cc.sparse_window, "sparse_attention")

    def _kv_budget(self, params: SamplingParams) -> int | None:
        """A request's block top-k budget; None: dense."""
        cc = self.cache_config
        if (params.sparse_attention or cc.sparse_attention) == "dense":
            return None
        return params.kv_budget if params.kv_budget is not None else cc.kv_budget

    def add_embed_request(
        self,
        request_id: str,
        token_ids: Seq[int],
        layers: Seq[int],
        start: int = 0,
    ) -> Request:
        """Queues a request that computes `token_ids` without sampling and keeps the hidden
        states of positions >= `start` at `layers` (0 = embeddings ... num_layers = after the
        final norm); read `request.sequences[0].hidden_states` once it has finished.
        Positions before `start` may come from the prefix cache."""
        ids = self.validate_prompt(token_ids)
        seq_layers = self._check_layers(layers)
        if not 0 <= start < len(ids):
            raise ValueError(f"start must be in [0, {len(ids)}), not {start}")
        request = self.add_request(request_id, ids, SamplingParams(temperature=0, max_tokens=1))
        seq = request.sequences[0]
        seq.hidden_layers, seq.hidden_start, seq.embed_only = seq_layers, start, True
        return request

    def fork_embed(self, seq_id: int, layers: Seq[int], recompute: int = 1) -> Sequence:
        """A child of a finished, retained sequence that recomputes its last `recompute`
        tokens over the shared KV (the very last token was sampled, never computed) and keeps
        their hidden states at `layers`: scoring a candidate costs `recompute` tokens, not a
        second pass over it. Drop the child when done."""
        parent = self.sequences.get(seq_id)
        if parent is None or not self.block_manager.has_seq(seq_id):
            raise ValueError(f"cannot embed sequence {seq_id}: it holds no KV (retain it)")
        if parent.status is not SequenceStatus.FINISHED:
            raise ValueError(f"cannot embed sequence {seq_id}: it has not finished")
        # At least the last token (never computed); at most the whole sequence.
        lowest = max(1, parent.num_tokens - self.block_manager.num_tokens(seq_id))
        if not lowest <= recompute <= parent.num_tokens:
            raise ValueError(
                f"recompute must be in [{lowest}, {parent.num_tokens}] for sequence {seq_id}, "
                f"not {recompute}"
            )
        start = parent.num_tokens - recompute
        seq_layers = self._check_layers(layers)
        (child,) = self.fork(seq_id, 1)  # shares every block, runs at once
        child.hidden_layers, child.hidden_start, child.embed_only = seq_layers, start, True
        child.hidden_parts, child.num_hidden_rows = [], 0
        self.block_manager.truncate(child.seq_id, start)
        child.num_computed_tokens = start
        return child

    def _check_layers(self, layers: Seq[int]) -> tuple[int, ...]:
        top = self.model.config.num_hidden_layers
        out = tuple(int(x) for x in layers)
        if not out or any(not 0 <= x <= top for x in out):
            raise ValueError(f"hidden-state layers must be in [0, {top}], not {list(layers)}")
        return out

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        params = request.params
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request=request,
            index=index,
            token_ids=token_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params),
            generator=None if params.greedy else make_generator(params.seed, index),
            constraint=params.constraint.start() if params.constraint is not None else None,
        )
        request.sequences.append(seq)
        self.sequences[seq.seq_id] = seq
        return seq

    def fork(self, seq_id: int, n: int, params: SamplingParams | None = None) -> list[Sequence]:
        """n children of a sequence that share all its KV blocks; no recomputation.

        Works at any point: mid-prefill, mid-generation, or on a finished sequence of a
        retained request (the children then continue generating from its last token). With
        `params`, the children start a new step: fresh text, limits counted from here, and
        their own stop strings (how step-level search advances one reasoning step); their
        grammar (`params.constraint`) continues from the parent's state when it is the
        parent's own, and starts afresh when it is another. Each
        child's RNG is seeded by (seed, its index in the request), so runs are reproducible.
        """
        parent = self.sequences.get(seq_id)
        if parent is None:
            raise ValueError(f"cannot fork sequence {seq_id}: no such sequence (released?)")
        request = parent.request
        if params is not None and params.n != 1:
            raise ValueError("a fork's params must have n=1 (the fork count is the argument)")
        if params is not None:
            self.validate_params(params)
        step_params = params or parent.params
        children = []
        for _ in range(n):
            index = len(request.sequences)
            generator = None if step_params.greedy else make_generator(step_params.seed, index)
            child = parent.clone(next(self._seq_ids), index, generator)
            if params is not None:
                child.params, child.step_start = params, child.num_tokens
                child.detokenizer = IncrementalDetokenizer(self.tokenizer, child.token_ids, params)
                child.logprobs, child.top_logprobs = [], []
                if params.constraint is not parent.params.constraint:  # else: continue it
                    child.constraint = params.constraint.start() if params.constraint else None
            request.sequences.append(child)
            self.sequences[child.seq_id] = child
            children.append(child)
        if self.block_manager.has_seq(parent.seq_id):
            self.block_manager.fork(parent.seq_id, [c.seq_id for c in children])
        for child in children:
            child.finish_reason = child.stop_reason = None
            if self.block_manager.has_seq(child.seq_id):
                # Running, or finished and retained: continue on the shared blocks at once.
                child.status = SequenceStatus.RUNNING
                self.scheduler.add_running(child)
            else:  # the parent waits (preempted or not yet admitted): so do the children
                child.num_computed_tokens = 0
                self.scheduler.add(child)
        return children

    def drop(self, seq_id: int) -> None:
        """Frees one sequence (a pruned search branch) now; its request lives on."""
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            return
        self.scheduler.remove(seq)
        if self.block_manager.has_seq(seq_id):
            self.block_manager.free(seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
        seq.request.sequences.remove(seq)

    def abort(self, request_id: str) -> None:
        """Stops a request now and frees its blocks at once."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.sequences:
            if seq.status is not SequenceStatus.FINISHED:
                self._finish(seq, "abort")
        self.release(request_id)

    def release(self, request_id: str) -> None:
        """Forgets a finished request, freeing any KV it retained."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.sequences:
            self.scheduler.remove(seq)
            if self.block_manager.has_seq(seq.seq_id):
                self.block_manager.free(seq.seq_id)
            self.sequences.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> int:
        """Drops cached prompt blocks no request holds, so the next run starts cold."""
        return self.block_manager.evict_cached()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- read-only views (all that code outside engine/ may know of its internals) -------

    @property
    def block_size(self) -> int:
        return self.block_manager.block_size

    @property
    def model_config(self):
        return self.model.config

    def held_blocks(self, seq_id: int) -> frozenset[int]:
        """KV block ids the sequence holds now (shared ones included); empty if it holds none."""
        bm = self.block_manager
        return frozenset(bm.block_table(seq_id)) if bm.has_seq(seq_id) else frozenset()

    def running_request_ids(self) -> set[str]:
        return {s.request.request_id for s in self.scheduler.running}

    def holds_kv(self, request_id: str) -> bool:
        """Whether any sequence of the request holds KV blocks (a failed step may have
        written them)."""
        request = self.requests.get(request_id)
        return request is not None and any(
            self.block_manager.has_seq(s.seq_id) for s in request.sequences
        )

    def check_integrity(self) -> None:
        """Raises AssertionError if the KV bookkeeping is inconsistent."""
        self.block_manager.check_integrity()

    def kv_block_states(self) -> tuple[list[int], list[bool]]:
        """Each block's ref count and whether it holds a prefix-cache key, by block id: a
        picture of the pool (the dashboard's); O(num_blocks)."""
        bm = self.block_manager
        blocks = range(bm.num_blocks)
        return [bm.ref_count(b) for b in blocks], [bm.is_cached(b) for b in blocks]

    def speculation_stats(self) -> dict[str, float]:
        """Since start: drafts proposed and kept, the acceptance rate and the tokens a
        sequence gained per step that verified drafts (1 = speculation bought nothing)."""
        st = self.stats
        drafted, steps = st["draft_tokens"], st["draft_steps"]
        accepted = st["accepted_draft_tokens"]
        return {
            "draft_tokens": drafted,
            "accepted_draft_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_step": 1 + accepted / steps if steps else 1.0,
        }

    def kv_stats(self) -> dict[str, int | float]:
        bm = self.block_manager
        return {
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_used_blocks": bm.num_used_blocks,
            "block_size": bm.block_size,
            "prefix_hit_rate": bm.stats()["prefix_hit_rate"],
            "num_preemptions": self.scheduler.num_preemptions,
            # KV bytes one token takes in the pool (all layers, K and V, a quantized
            # format's scales included): what /metrics and the cost model report.
            "kv_bytes_per_token": self.cost_meter.shape.kv_bytes_per_token(
                self.cost_meter.kv_bytes_per_value
            ),
        }

    # ---- the step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """schedule -> execute -> update: advances every scheduled sequence."""
        batch = self.scheduler.schedule() if self.proposer is None else self._schedule_with_drafts()
        if not batch.seqs:
            return []
        if self.cache_config.tracks_block_keys:  # each request's sparse attention budget
            batch.seqs = [
                dataclasses.replace(s, kv_budget=self._kv_budget(self.sequences[s.seq_id].params))
                for s in batch.seqs
            ]
        try:
            t0 = time.perf_counter()
            result = self.executor.execute(batch)
            elapsed = time.perf_counter() - t0
            self.stats["model_time"] += elapsed
            self.last_step = result.shape
            self._charge(batch, result.shape, elapsed)
            return self._update(batch, result)
        except Exception as e:
            seqs = [self.sequences.get(s.seq_id) for s in batch.seqs]
            ids = dict.fromkeys(seq.request.request_id for seq in seqs if seq is not None)
            raise StepError(list(ids), e) from e

    def shutdown(self) -> None:
        self.executor.shutdown()

    # ---- speculative tokens ---------------------------------------------------------------

    def _propose(self) -> None:
        """Appends the proposer's tokens to every decoding sequence, within its limits; one
        `propose_batch` call for all of them when the proposer has it (a draft model)."""
        assert self.proposer is not None
        todo: list[tuple[Sequence, int]] = []
        for seq in self.scheduler.running:
            # A grammar's mask is known for the next token only: no drafts under one.
            if seq.embed_only or seq.constraint or seq.num_tokens - seq.num_computed_tokens != 1:
                continue
            if not seq.params.speculative:  # the request turned speculation off
                continue
            room = min(
                seq.params.max_tokens - seq.num_step_tokens,
                self.max_model_len - seq.num_tokens,
            )
            if room > 0:
                todo.append((seq, room))
        if not todo:
            return
        batch = getattr(self.proposer, "propose_batch", None)
        if batch is not None:
            proposed = batch([(seq.seq_id, seq.token_ids, room) for seq, room in todo])
        else:
            proposed = [self.proposer.propose(seq.seq_id, seq.token_ids) for seq, _ in todo]
        for (seq, room), drafts in zip(todo, proposed, strict=True):
            drafts = list(drafts)[:room]
            seq.token_ids += drafts
            seq.num_draft_tokens = len(drafts)
            seq.request.draft_tokens += len(drafts)
            self.stats["draft_tokens"] += len(drafts)

    def _schedule_with_drafts(self) -> SchedulerOutput:
        """Proposes drafts, schedules, and drops the drafts of sequences the step left out
        (drafts never outlive the step that verifies them)."""
        self._propose()
        batch = self.scheduler.schedule()
        scheduled = {s.seq_id for s in batch.seqs}
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.num_draft_tokens and seq.seq_id not in scheduled:
                seq.drop_drafts()
        return batch

    # ---- update ---------------------------------------------------------------------------

    def _charge(self, batch: SchedulerOutput, shape: StepShape, elapsed: float) -> None:
        """Prices the step and splits it over its requests by tokens computed."""
        _, run = self.cost_meter.price(shape, elapsed)
        total = batch.num_tokens
        for s in batch.seqs:
            request = self.sequences[s.seq_id].request
            request.cost.add(CostMeter.share(run, len(s.token_ids) / total))

    def _update(self, batch: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        self.stats["steps"] += 1
        logits = result.logits
        # (seq, index of its first logits row); drafts carry 1 + k rows, others one.
        to_sample: list[tuple[Sequence, int]] = []
        touched: dict[str, Request] = {}
        logit_row = hidden_row = 0
        for s in batch.seqs:
            seq = self.sequences[s.seq_id]
            n = len(s.token_ids)
            seq.num_computed_tokens += n
            if seq.num_computed_tokens <= seq.num_prompt_tokens:
                seq.request.num_computed_prompt_tokens += n
                self.stats["prefill_tokens"] += n
            else:
                self.stats["decode_tokens"] += n
            if s.return_hidden:
                assert result.hidden is not None
                rows = result.hidden[hidden_row : hidden_row + n]
                if seq.hidden_layers != batch.hidden_layers:
                    # The step computed the union of its sequences' layers: keep this one's.
                    assert seq.hidden_layers is not None
                    rows = rows[:, [batch.hidden_layers.index(x) for x in seq.hidden_layers]]
                seq.capture_hidden(rows, s.start_pos)
                hidden_row += n
            if not seq.num_draft_tokens:
                self.block_manager.commit_computed(
                    seq.seq_id, seq.token_ids, seq.num_computed_tokens
                )
            if seq.embed_only and seq.num_computed_tokens == seq.num_tokens:
                self._finish(seq, "embedded")
                touched[seq.request.request_id] = seq.request
            elif s.num_logits:
                to_sample.append((seq, logit_row))
            logit_row += s.num_logits

        # Parallel sampling: the prompt was prefilled once; now fork it into n samples that
        # share its blocks, and draw each sample's first token from the same logits row.
        # A sequence with k drafts gets k + 1 rows, each sampled with the context it verifies.
        rows: list[SamplingRow] = []
        owners: list[tuple[Sequence, int]] = []  # (sequence, its first row in `rows`)
        row_logits: list[int] = []
        for seq, first in to_sample:
            if seq.num_draft_tokens:
                owners.append((seq, len(rows)))
                base = seq.num_tokens - seq.num_draft_tokens
                for j in range(seq.num_draft_tokens + 1):
                    rows.append(self._sampling_row(seq, context_len=base + j))
                    row_logits.append(first + j)
                continue
            family = [seq]
            if not seq.request.forked:
                seq.request.forked = True
                family += self.fork(seq.seq_id, seq.request.params.n - 1)
            for member in family:
                owners.append((member, len(rows)))
                rows.append(self._sampling_row(member))
                row_logits.append(first)
        if len(row_logits) != logits.shape[0]:  # a fork family shares its parent's row
            logits = logits[torch.tensor(row_logits, device=logits.device)]

        if rows:
            sampled = self.sampler(logits, rows)
            for seq, i in owners:
                if seq.num_draft_tokens:
                    self._accept_drafts(seq, sampled, i)
                else:
                    self._append_token(seq, sampled, i)
                touched[seq.request.request_id] = seq.request
        for request in touched.values():
            # Distinct blocks: a prompt shared by n samples is held once.
            used: set[int] = set()
            for s in request.sequences:
                if self.block_manager.has_seq(s.seq_id):
                    used.update(self.block_manager.block_table(s.seq_id))
            request.peak_kv_blocks = max(request.peak_kv_blocks, len(used))
        outputs = [self._output(r) for r in touched.values()]
        for request in touched.values():
            if request.finished and not request.retain:
                self.release(request.request_id)
        return outputs

    def _accept_drafts(self, seq: Sequence, sampled, first: int) -> None:
        """Keeps the drafts the model itself sampled, then its own next token; rolls the KV
        back past the first mismatch. With a deterministic proposer this is exact
        speculative sampling: a draft x is kept with probability p(x), and on a mismatch the
        token drawn is distributed as p without x, renormalized."""
        k = seq.num_draft_tokens
        drafts = seq.token_ids[-k:]
        seq.drop_drafts()
        accepted = 0
        while accepted < k and sampled.token_ids[first + accepted] == drafts[accepted]:
            accepted += 1
        self.stats["accepted_draft_tokens"] += accepted
        self.stats["draft_steps"] += 1
        seq.request.accepted_draft_tokens += accepted
        seq.request.draft_steps += 1
        # KV is valid for the last accepted token's predecessors: keep exactly those.
        keep = seq.num_tokens + accepted
        seq.num_computed_tokens = keep
        self.block_manager.truncate(seq.seq_id, keep)
        if seq.hidden_layers is not None:
            seq.trim_hidden(keep)
        for j in range(accepted + 1):
            self._append_token(seq, sampled, first + j)
            if seq.status is SequenceStatus.FINISHED:
                break
        if self.block_manager.has_seq(seq.seq_id):
            # A stop inside the accepted run leaves fewer tokens than computed KV.
            computed = min(seq.num_computed_tokens, seq.num_tokens - 1)
            if computed < seq.num_computed_tokens:
                self.block_manager.truncate(seq.seq_id, computed)
                seq.num_computed_tokens = computed
                if seq.hidden_layers is not None:
                    seq.trim_hidden(computed)
            self.block_manager.commit_computed(seq.seq_id, seq.token_ids, computed)

    def _sampling_row(self, seq: Sequence, context_len: int | None = None) -> SamplingRow:
        """The row that samples the token after `token_ids[:context_len]` (default: all)."""
        end = seq.num_tokens if context_len is None else context_len
        return SamplingRow(
            params=seq.params,
            generator=seq.generator,
            prompt_token_ids=seq.request.prompt_token_ids,
            output_token_ids=seq.token_ids[seq.num_prompt_tokens : end],
            eos_token_ids=self.tokenizer.eos_token_ids,
            step_tokens=end - seq.step_start,
            constraint=seq.constraint,
        )

    def _append_token(self, seq: Sequence, result, i: int) -> None:
        params = seq.params
        token = result.token_ids[i]
        seq.token_ids.append(token)
        if result.logprobs is not None and params.logprobs is not None:
            seq.logprobs.append(result.logprobs[i])
            if result.top_logprobs is not None:
                seq.top_logprobs.append(result.top_logprobs[i])
        is_eos = token in self.tokenizer.eos_token_ids and not params.ignore_eos
        is_stop_id = token in params.stop_token_ids
        if seq.constraint is not None and seq.constraint.advance(token):
            is_stop_id = True  # the grammar is complete (its stop token), even with ignore_eos
        if not (is_eos or is_stop_id) or not params.skip_special_tokens:
            seq.pending_delta += seq.detokenizer.append(token) or ""
        if seq.num_step_tokens >= params.min_tokens and (is_eos or is_stop_id):
            self._finish(seq, "stop", stop_reason=None if is_eos else token)
        elif seq.detokenizer.stopped:
            self._finish(seq, "stop", stop_reason=seq.detokenizer.stop_reason)
        elif seq.num_step_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.pending_delta += seq.detokenizer.finish()
        self.scheduler.remove(seq)
        if not seq.request.retain and self.block_manager.has_seq(seq.seq_id):
            self.block_manager.free(seq.seq_id)

    def _output(self, request: Request) -> RequestOutput:
        outputs = []
        for seq in request.sequences:
            delta, seq.pending_delta = seq.pending_delta, ""
            want_lp = seq.params.logprobs is not None
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.detokenizer.text,
                    token_ids=seq.output_token_ids,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if want_lp else None,
                    top_logprobs=list(seq.top_logprobs) if want_lp else None,
                    text_delta=delta,
                )
            )
        generated = sum(s.num_output_tokens for s in request.sequences)
        usage = Usage(
            prompt_tokens=len(request.prompt_token_ids),
            cached_prompt_tokens=request.num_cached_prompt_tokens,
            computed_prompt_tokens=request.num_computed_prompt_tokens,
            generated_tokens=generated,
            peak_kv_blocks=request.peak_kv_blocks,
            **request.cost.to_dict(),
            **_speculation_usage(request),
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=request.finished,
            usage=usage,
        )


def _speculation_usage(request: Request) -> dict[str, int | float | None]:
    """A request's speculation figures for its Usage (rates None when nothing was drafted)."""
    drafted, accepted = request.draft_tokens, request.accepted_draft_tokens
    return {
        "draft_tokens": drafted,
        "accepted_draft_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "tokens_per_step": 1 + accepted / request.draft_steps if request.draft_steps else None,
    }
