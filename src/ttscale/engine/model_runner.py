"""The in-process executor: flatten a scheduled step, apply copy-on-write, run the model,
return the logits (and hidden states) of the rows the scheduler asked for."""

from __future__ import annotations

import torch

from ttscale.attention.metadata import AttentionMetadata
from ttscale.attention.registry import get_backend
from ttscale.attention.sparse import with_block_topk
from ttscale.cost.shapes import StepShape
from ttscale.engine.executor import StepResult
from ttscale.engine.scheduler import SchedulerOutput
from ttscale.kvcache import CacheConfig, make_kv_cache, slot_mapping
from ttscale.models.compiled import CompileConfig, CompiledForward
from ttscale.models.fused import make_fused
from ttscale.models.llama import HiddenCapture
from ttscale.models.quant import kv_dtype


class ModelRunner:
    """Owns the model and the KV tensors. Stateless between steps apart from the cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: CacheConfig,
        device: torch.device,
        compile_config: CompileConfig | None = None,
    ) -> None:
        self.model, self.config, self.device = model, config, device
        mc = model.config
        self.kv_cache = make_kv_cache(
            config,
            mc.num_hidden_layers,
            mc.num_key_value_heads,
            mc.head_dim,
            config.pool_dtype(kv_dtype(model)),
            device,
        )
        self.num_blocks = self.kv_cache.num_blocks
        self.attention_cls = get_backend(config.attention)
        self.specs = with_block_topk(model.attention_specs, config)
        # Small steps through the compiled graph when enabled (models/compiled.py).
        context = min(mc.max_position_embeddings, self.num_blocks * config.block_size)
        compile_config = compile_config or CompileConfig()
        self.forward = CompiledForward(model, compile_config, context)
        # Small steps of a quantized or bf16 model as one C++ call (models/fused.py), when
        # it can; `fused_off` says why not.
        self.fused, self.fused_off = make_fused(
            model, self.kv_cache, self.specs, compile_config.fused
        )

    def execute(self, batch: SchedulerOutput) -> StepResult:
        # Inference mode like the forward: caches may create buffers inside a forward
        # (inference tensors, e.g. kivi's staging rows) that copy-on-write then updates here.
        with torch.inference_mode():
            self.kv_cache.copy_blocks(batch.block_copies)
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        hidden_rows: list[int] = []
        for s in batch.seqs:
            n = len(s.token_ids)
            first = len(input_ids)
            input_ids += s.token_ids
            positions += range(s.start_pos, s.start_pos + n)
            slots += slot_mapping(s.block_table, s.start_pos, n, bs)
            logit_rows += range(first + n - s.num_logits, first + n)
            if s.return_hidden:
                hidden_rows += range(first, first + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device),
            query_lens=[len(s.token_ids) for s in batch.seqs],
            context_lens=[s.start_pos + len(s.token_ids) for s in batch.seqs],
            block_tables=[s.block_table for s in batch.seqs],
            block_size=bs,
            kv_budgets=(
                [s.kv_budget for s in batch.seqs] if self.config.tracks_block_keys else None
            ),
        )
        capture = None
        if hidden_rows:
            rows = torch.tensor(hidden_rows, device=self.device)
            capture = HiddenCapture(rows, tuple(batch.hidden_layers))
        ids_t = torch.tensor(input_ids, device=self.device)
        positions_t = torch.tensor(positions, device=self.device)
        if self.fused is not None and self.fused.accepts(meta, capture):
            hidden = self.fused(ids_t, positions_t, meta)
            reads = self.fused.kv_reads(meta)
        else:
            attn = self.attention_cls(self.kv_cache, meta, self.specs)
            hidden = self.forward(ids_t, positions_t, attn, capture)
            reads = attn.kv_reads()
        shape = StepShape(
            query_lens=tuple(meta.query_lens),
            context_lens=tuple(meta.context_lens),
            num_logits=len(logit_rows),
            **reads,
        )
        if logit_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=self.device)])
        else:
            logits = hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        return StepResult(logits, capture.states if capture is not None else None, shape)

    def shutdown(self) -> None:
        """Frees the cache's memory; the runner is unusable afterwards."""
        self.kv_cache = None  # type: ignore[assignment]
