"""Next-token sampling for a batch of sequences, each with its own parameters and RNG.

Pipeline per row (vLLM's order of steps; HF's order of the truncations):

1. penalties: repetition (CTRL-style, on prompt + output tokens: positive logits divided,
   negative ones multiplied), then frequency / presence (OpenAI-style, on output tokens:
   ``logit -= frequency * count + presence * (count > 0)``);
2. ``min_tokens``: EOS and ``stop_token_ids`` get ``-inf`` while fewer than ``min_tokens``
   tokens were generated (``ignore_eos`` does not change sampling; it is the engine's); a
   row with a grammar ``constraint`` gets ``-inf`` on every token the grammar forbids next;
3. greedy rows (``temperature < 1e-5``, or ``top_k == 1``) take the argmax, lowest id on ties;
4. other rows: temperature, then top-k, then top-p on the top-k-renormalised distribution,
   then min-p (``p >= min_p * p_max``), then one draw among the tokens left. Ties at a
   cut-off are all kept (the cut-offs are thresholds on the probability, as in vLLM / HF).

Batch invariance (the reason for most of the design): a row's token is a function of its own
logits row, its own parameters / tokens and its own generator only -- never of the other rows,
which change every step under continuous batching. Hence

* every random number is drawn from the row's own ``torch.Generator`` (one float64 uniform per
  draw, on CPU, then moved to the logits' device), and how many draws a row makes depends on
  the row alone;
* every kernel used computes each row on its own (softmax, top-k, sort, cumsum, sums / maxima
  over fixed blocks of token ids, elementwise ops; checked bit-exact for batch sizes 1..64 on
  CPU); no threshold or candidate count depends on the batch (top-k candidate counts come from
  fixed tiers chosen per row);
* draws use the inverse CDF over the kept tokens *in token-id order*, so the order in which a
  kernel returns tied values never matters.

Top-p without sorting the vocabulary: a full sort per row costs milliseconds on one CPU core,
and a small model at T=1 often has a nucleus of thousands of tokens, so candidate lists do not
help (measurements: docs/BENCHMARKS.md, "Measurements behind code choices"). A top-p row
instead draws from the (min-p-masked) full distribution and accepts the token iff the mass of
the tokens strictly more likely than it is < top_p, i.e. iff it is in the nucleus, else draws
again. That samples the renormalised nucleus exactly; a cheap bound from per-block maxima
settles most acceptances, the others cost one pass over their row; a row still rejected after
``_MAX_ATTEMPTS`` draws (nucleus mass likely below ~0.5) falls back to the exact threshold from
its top 1024 candidates (more, up to the full sort, when the nucleus is larger).

A step's cost is mostly the memory-bound (B, V) passes (temperature, softmax); the per-mode
times are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ttscale.sampling.constraints import (
    TokenConstraint,
    allow_only,
    apply_bitmask,
    bitmask_words,
)
from ttscale.sampling.params import SamplingParams

# Temperatures below this are greedy (as vLLM): dividing by them overflows float32.
_GREEDY_TEMPERATURE = 1e-5
# Token-id blocks for the two-level inverse CDF and the nucleus mass sums: a block sums in
# float32 to ~1e-7 of its mass, the block masses accumulate in float64, so draws have no
# float32 cumsum drift over a 50k-256k vocabulary. Rows are padded to a multiple of it.
_BLOCK = 256
# Smaller blocks whose maxima pre-select top-k candidates and speed up the argmax.
_SMALL_BLOCK = 64
# Top-p draws before the exact (candidate / sorting) fallback.
_MAX_ATTEMPTS = 4
# Candidate counts for top-k rows: the first tier strictly above k (so that ties with the
# k-th value can be seen), the next ones while such ties straddle the end, then the full sort.
_TOPK_TIERS = (64, 256, 1024, 4096, 16384)


@dataclass
class SamplingRow:
    """One sequence to sample a next token for.

    ``generator`` must be set for every non-greedy row (see `make_generator`); only this
    row's draws advance it. ``eos_token_ids`` and ``params.stop_token_ids`` are masked while
    fewer than ``params.min_tokens`` tokens were generated -- ``step_tokens`` when given (a
    forked step counts its limits from the fork), else ``len(output_token_ids)`` --
    whatever ``params.ignore_eos`` (vLLM would let EOS through then, as it ends nothing).
    Penalties use ``prompt_token_ids`` / ``output_token_ids``, lists or 1-D tensors.
    ``constraint`` is the sequence's grammar state (`constraints.TokenConstraint`): only the
    tokens it allows next can be drawn; the caller advances it with the token drawn.
    """

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: frozenset[int] = frozenset()
    step_tokens: int | None = None
    constraint: TokenConstraint | None = None

    @property
    def num_counted_tokens(self) -> int:
        """Tokens generated so far, as ``min_tokens`` counts them."""
        return len(self.output_token_ids) if self.step_tokens is None else self.step_tokens


@dataclass
class SampleResult:
    """The sampled token of every row, in row order.

    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the model's *raw*
    distribution (log_softmax of the logits before penalties, masking, temperature and
    truncation: vLLM v1's default); ``top_logprobs[i]`` lists the ``params.logprobs`` most
    likely ``(token_id, logprob)`` of that same distribution, most likely first. Both are None
    when no row asked for logprobs; rows that did not ask get ``nan`` and ``[]``.
    """

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def make_generator(seed: int | None, index: int = 0) -> torch.Generator:
    """A CPU generator seeded deterministically from ``(seed, index)``.

    ``index`` tells apart the ``n`` samples of one request (sample i uses index i), so they
    differ yet each is reproducible. The pair is hashed (splitmix64), so nearby seeds and
    indices give unrelated streams. ``seed=None`` seeds from OS entropy.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64))
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mixed)
    return generator


class _Workspace:
    """Scratch (rows, cols) float32 buffers, kept across calls and grown as needed.

    Every decode step needs a few (B, V) temporaries (12.5 MB at 64 x 49152). Fresh ones are
    page-faulted in whenever glibc has just given the previous ones back to the OS, which
    multiplied the time of a temperature + softmax several times over (docs/BENCHMARKS.md);
    reusing them avoids it.
    """

    def __init__(self) -> None:
        self._storage: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        storage = self._storage.get(name)
        if storage is None or storage.device != device or storage.numel() < rows * cols:
            storage = torch.empty(rows * cols, dtype=torch.float32, device=device)
            self._storage[name] = storage
        return storage[: rows * cols].view(rows, cols)


class Sampler:
    """Samples one next token per row of a logits batch; see the module docstring.

    ``logits`` is (B, V) float (float32 expected; other dtypes are upcast) on any device and
    is never modified. At least one token of each row must remain finite after masking. The
    only state is reusable scratch memory: use one Sampler per thread.
    """

    def __init__(self) -> None:
        self._ws = _Workspace()

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be (len(rows), vocab); got {tuple(logits.shape)} for {len(rows)} rows"
            )
        if not rows:
            return SampleResult(token_ids=[])
        greedy = [i for i, r in enumerate(rows) if _is_greedy(r.params)]
        sampled = [i for i, r in enumerate(rows) if not _is_greedy(r.params)]
        for i in sampled:
            if rows[i].generator is None:
                raise ValueError(f"row {i} samples (temperature > 0) but has no generator")

        logits = logits.float().contiguous()
        processed = self.process_logits(logits, rows)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if greedy:
            tokens[greedy] = _argmax(_select_rows(processed, greedy))
        if sampled:
            tokens[sampled] = _sample(processed, sampled, [rows[i] for i in sampled], self._ws)

        result = SampleResult(token_ids=tokens.tolist())
        wants = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if wants:
            _add_logprobs(logits, rows, wants, tokens, result, self._ws)
        return result

    def process_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Steps 1-2 of the pipeline: penalties, then min_tokens and grammar masking, on
        (B, V) float32.

        Returns ``logits`` itself when no row needs either, else a modified copy; the input
        is never changed. Greedy rows are processed too (penalties move the argmax). Only the
        (row, token) entries concerned are touched, not whole rows.
        """
        device, vocab = logits.device, logits.shape[1]
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        occ = [
            i
            for i, r in enumerate(rows)
            if (r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0)
            and len(r.output_token_ids) > 0
        ]
        min_tok = [i for i, r in enumerate(rows) if r.num_counted_tokens < r.params.min_tokens]
        constrained = [i for i, r in enumerate(rows) if r.constraint is not None]
        if not (rep or occ or min_tok or constrained):
            return logits
        out = logits.clone()

        if rep:
            r, t = _token_pairs(rows, rep, vocab, device, with_prompt=True)
            penalty = torch.tensor([r_.params.repetition_penalty for r_ in rows], device=device)[r]
            values = out[r, t]
            # A repeated (row, token) pair writes the same value (computed from the gathered
            # original) each time, so each logit is penalised once without deduplicating.
            out[r, t] = torch.where(values > 0, values / penalty, values * penalty)

        if occ:
            r, t = _token_pairs(rows, occ, vocab, device, with_prompt=False)
            flat, counts = torch.unique(r * vocab + t, return_counts=True)
            r, t = flat // vocab, flat % vocab
            freq = torch.tensor([r_.params.frequency_penalty for r_ in rows], device=device)[r]
            pres = torch.tensor([r_.params.presence_penalty for r_ in rows], device=device)[r]
            out[r, t] -= freq * counts.to(out.dtype) + pres

        if min_tok:
            pairs = []
            for i in min_tok:
                stop_ids = set(rows[i].params.stop_token_ids) | rows[i].eos_token_ids
                pairs.extend((i, t) for t in sorted(stop_ids) if 0 <= t < vocab)
            if pairs:
                idx = torch.tensor(pairs, dtype=torch.long, device=device)
                out[idx[:, 0], idx[:, 1]] = float("-inf")

        if constrained:
            # Each grammar fills its row of a packed bitmask (B, ceil(V/32)) on the CPU; rows
            # without a grammar stay all ones and are skipped.
            bitmask = torch.full((len(rows), bitmask_words(vocab)), -1, dtype=torch.int32)
            for i in constrained:
                rows[i].constraint.fill_bitmask(bitmask, i)  # type: ignore[union-attr]
                if not bool(bitmask[i].any()):
                    # The grammar can go nowhere: end the sample (EOS) instead of failing the
                    # whole step, which would fail every request batched with it.
                    eos = [t for t in rows[i].eos_token_ids if 0 <= t < vocab]
                    if eos:
                        allow_only(bitmask, i, eos)
                    else:
                        bitmask[i] = -1
            apply_bitmask(out, bitmask, constrained)
        return out


def _is_greedy(p: SamplingParams) -> bool:
    # top_k == 1 keeps only the maximum: take it exactly (lowest id on ties), without a draw.
    return p.temperature < _GREEDY_TEMPERATURE or p.top_k == 1


def _token_pairs(
    rows: Sequence[SamplingRow],
    which: list[int],
    vocab: int,
    device: torch.device,
    with_prompt: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs of the output (and prompt) tokens of rows ``which``."""
    flat: list[int] = []
    lengths: list[int] = []
    for i in which:
        seqs = (rows[i].prompt_token_ids, rows[i].output_token_ids)
        n = len(flat)
        for seq in seqs if with_prompt else seqs[1:]:
            flat.extend(seq.tolist() if isinstance(seq, torch.Tensor) else seq)
        lengths.append(len(flat) - n)
    # numpy converts a long list of ints several times faster than torch.tensor
    # (docs/BENCHMARKS.md, "Measurements behind code choices").
    tokens = torch.from_numpy(np.array(flat, dtype=np.int64)).to(device)
    row_idx = torch.repeat_interleave(torch.tensor(which), torch.tensor(lengths)).to(device)
    valid = (tokens >= 0) & (tokens < vocab)
    return row_idx[valid], tokens[valid]


def _select_rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``x[idx]``, without a copy when idx is every row in order (the common case)."""
    if idx == list(range(x.shape[0])):
        return x
    return x[idx]


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax, first index on ties, as ``x.argmax(-1)``.

    torch's CPU argmax is several times slower than its max (docs/BENCHMARKS.md); the argmax
    of the block maxima (first block holding the maximum) then the argmax inside that block
    gives the same index.
    """
    n, vocab = x.shape
    if vocab % _SMALL_BLOCK or vocab < 4 * _SMALL_BLOCK:
        return x.argmax(dim=-1)
    blocks = x.view(n, -1, _SMALL_BLOCK)
    block = blocks.amax(dim=-1).argmax(dim=-1)
    inner = blocks[torch.arange(n, device=x.device), block].argmax(dim=-1)
    return block * _SMALL_BLOCK + inner


def _keep_above(
    p: torch.Tensor, rows: torch.Tensor, threshold: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out[j] = where(p[rows[j]] > threshold[j], p[rows[j]], 0)``; returns ``out``.

    On CPU a per-row ``torch.threshold`` is several times faster than the batched ``where``
    (same values: an elementwise comparison; docs/BENCHMARKS.md) and needs no copy of the
    selected rows, so the loop runs cheap kernels, not heavy work.
    """
    if p.device.type != "cpu":
        return torch.where(p[rows] > threshold.unsqueeze(1), p[rows], 0.0, out=out)
    for j, (i, t) in enumerate(zip(rows.tolist(), threshold.tolist(), strict=True)):
        torch.threshold(p[i], t, 0.0, out=out[j])
    return out


def _draw(rows: Sequence[SamplingRow], which: list[int], device: torch.device) -> torch.Tensor:
    """One float64 uniform in [0, 1) per listed row, each from that row's own generator."""
    u = [torch.rand(1, generator=rows[i].generator, dtype=torch.float64) for i in which]
    return torch.cat(u).to(device)


def _sample(
    processed: torch.Tensor, which: list[int], rows: Sequence[SamplingRow], ws: _Workspace
) -> torch.Tensor:
    """Samples one token for each row ``which`` of ``processed`` (B, V); all are non-greedy."""
    device = processed.device
    n, vocab = len(which), processed.shape[1]
    # Whole 256-token blocks everywhere below; padded ids get probability 0, never drawn.
    padded = vocab + (-vocab) % _BLOCK
    temps = torch.tensor([r.params.temperature for r in rows], device=device).unsqueeze(1)
    scale = bool((temps != 1.0).any())
    # These (n, V) passes are memory-bound: make as few as possible, into reused buffers.
    if padded == vocab and which == list(range(processed.shape[0])):
        x = torch.div(processed, temps, out=ws.get("x", n, padded, device)) if scale else processed
    else:
        x = ws.get("x", n, padded, device)
        x[:, vocab:] = float("-inf")
        idx = torch.tensor(which, device=device)
        torch.index_select(processed, 0, idx, out=x[:, :vocab])
        if scale:
            x.div_(temps)
    probs = torch.softmax(x, dim=-1, out=ws.get("probs", n, padded, device))
    tokens = torch.empty(n, dtype=torch.long, device=device)

    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
    with_k = [i for i in range(n) if top_k[i] > 0]
    without_k = [i for i in range(n) if top_k[i] == 0]
    if with_k:
        tokens[with_k] = _sample_candidates(
            _select_rows(probs, with_k), [rows[i] for i in with_k], [top_k[i] for i in with_k]
        )
    if without_k:
        tokens[without_k] = _sample_full(
            _select_rows(probs, without_k), [rows[i] for i in without_k], ws
        )
    return tokens


# ---------------------------------------------------------------------- full-vocabulary path
class _Blocks:
    """Per-row (unnormalised) probabilities ``q`` (R, V), V a multiple of 256, by blocks.

    ``mass`` is the float64 mass of each block (summed in float32 within the block, the same
    way for every row), ``cum`` its running sum. `draw` is the inverse CDF in two levels: the
    block from ``cum``, then the token from a float64 cumsum inside the block. It only returns
    tokens of positive mass and walks them in id order, so ties never matter.
    """

    def __init__(self, q: torch.Tensor) -> None:
        self.q = q
        self.blocks = q.view(q.shape[0], -1, _BLOCK)
        self.mass = self.blocks.sum(dim=-1).double()
        self.cum = self.mass.cumsum(dim=-1)
        self._max: torch.Tensor | None = None

    @property
    def max(self) -> torch.Tensor:
        """Largest probability of each block (R, V / 256), computed on first use."""
        if self._max is None:
            self._max = self.blocks.amax(dim=-1)
        return self._max

    def draw(self, which: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cum = self.cum[which]
        total = cum[:, -1:].contiguous()
        target = u.unsqueeze(1) * total
        # The last block of positive mass bounds the pick when u * total rounds up to total.
        block = torch.minimum(
            torch.searchsorted(cum, target, right=True), torch.searchsorted(cum, total)
        )
        before = torch.where(block > 0, cum.gather(1, (block - 1).clamp(min=0)), 0.0)
        frac = ((target - before) / self.mass[which].gather(1, block)).clamp(0.0, 1.0)
        inner = self.blocks[which.unsqueeze(1), block].squeeze(1).double().cumsum(dim=-1)
        inner_total = inner[:, -1:].contiguous()
        pos = torch.minimum(
            torch.searchsorted(inner, frac * inner_total, right=True),
            torch.searchsorted(inner, inner_total),
        )
        return (block * _BLOCK + pos).squeeze(1)


def _in_nucleus(
    probs: _Blocks, which: torch.Tensor, tokens: torch.Tensor, top_p: torch.Tensor, ws: _Workspace
) -> torch.Tensor:
    """Whether each token is in its row's nucleus: mass strictly more likely than it < top_p.

    Ties with the cut-off value are thus kept, as by the sorting path's threshold. A cheap
    upper bound first -- the mass of the blocks whose maximum exceeds the token's probability
    -- settles most rows from (R, V/256) statistics; only the others take an exact pass over
    their row. Both sum the same float32 block sums in the same order and float addition of
    non-negative terms is monotone, so the bound is never below the exact mass.
    """
    value = probs.q[which, tokens]
    bound = torch.where(probs.max[which] > value.unsqueeze(1), probs.mass[which], 0.0)
    ok = bound.cumsum(dim=-1)[:, -1] < top_p
    unsure = (~ok).nonzero().squeeze(1)
    if unsure.numel():
        q = probs.q
        above = ws.get("above", unsure.numel(), q.shape[1], q.device)
        _keep_above(q, which[unsure], value[unsure], above)
        exact = above.view(above.shape[0], -1, _BLOCK).sum(dim=-1).double().cumsum(dim=-1)[:, -1]
        ok[unsure] = exact < top_p[unsure]
    return ok


def _sample_full(probs: torch.Tensor, rows: Sequence[SamplingRow], ws: _Workspace) -> torch.Tensor:
    """Rows without top-k: min-p mask, draw, and for top-p rows accept or draw again."""
    device = probs.device
    n = probs.shape[0]
    stats = _Blocks(probs)
    proposal = stats
    min_p = torch.tensor([r.params.min_p for r in rows], device=device)
    if bool((min_p > 0).any()):
        # min-p keeps p >= min_p * p_max. That ratio is the same before or after the top-p
        # renormalisation, so it is a fixed mask on the proposal; the nucleus test keeps the
        # unmasked probabilities (top-p comes before min-p). p >= t  <=>  p > prev_float(t).
        cutoff = min_p * stats.max.amax(dim=-1)
        cutoff = torch.nextafter(cutoff, torch.full_like(cutoff, float("-inf")))
        masked = ws.get("proposal", *probs.shape, device)
        proposal = _Blocks(_keep_above(probs, torch.arange(n, device=device), cutoff, masked))
    tokens = proposal.draw(torch.arange(n, device=device), _draw(rows, list(range(n)), device))

    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float64, device=device)
    pending = [i for i in range(n) if rows[i].params.top_p < 1.0]
    for attempt in range(_MAX_ATTEMPTS):
        if not pending:
            return tokens
        which = torch.tensor(pending, device=device)
        ok = _in_nucleus(stats, which, tokens[which], top_p[which], ws)
        pending = [i for i, good in zip(pending, ok.tolist(), strict=True) if not good]
        if pending and attempt + 1 < _MAX_ATTEMPTS:
            which = torch.tensor(pending, device=device)
            tokens[which] = proposal.draw(which, _draw(rows, pending, device))
    if pending:
        # Exact threshold from the top candidates instead (their nucleus is seldom large).
        tokens[pending] = _sample_candidates(
            _select_rows(probs, pending), [rows[i] for i in pending], [0] * len(pending), 1024
        )
    return tokens


# ---------------------------------------------------------------------- candidate path
def _top_candidates(p: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` largest values of each row, decreasing, with their ids.

    When the vocabulary is large, only the ``size`` blocks with the largest maxima are
    searched: a block outside them has ``size`` blocks (so ``size`` distinct values) at
    least as large as anything in it, so it holds nothing the row's top ``size`` needs but
    ties. The values are those of ``p.topk(size)``; only which tied ids come back may differ.
    """
    n, vocab = p.shape
    if vocab % _SMALL_BLOCK or size * _SMALL_BLOCK * 4 > vocab:
        return p.topk(size, dim=-1)
    blocks = p.view(n, -1, _SMALL_BLOCK)
    chosen = blocks.amax(dim=-1).topk(size, dim=-1).indices
    pool = blocks.gather(1, chosen.unsqueeze(-1).expand(-1, -1, _SMALL_BLOCK)).reshape(n, -1)
    values, pos = pool.topk(size, dim=-1)
    ids = chosen.gather(1, pos // _SMALL_BLOCK) * _SMALL_BLOCK + pos % _SMALL_BLOCK
    return values, ids


def _sample_candidates(
    probs: torch.Tensor, rows: Sequence[SamplingRow], top_k: list[int], min_size: int = 0
) -> torch.Tensor:
    """Draws from the top candidates of each row, taking more candidates where needed.

    For top-k rows (1 < k < V) and for top-p rows the rejection path gave up on (k = 0).
    A row starts at the first tier holding more than k (and at least ``min_size``)
    candidates and moves to the next while its kept set may reach past them; the last tier
    is the whole sorted row. Tiers depend on the row only, never on the batch.
    """
    device = probs.device
    n, vocab = probs.shape
    tokens = torch.empty(n, dtype=torch.long, device=device)
    tiers = [t for t in _TOPK_TIERS if t < vocab] + [vocab]
    tier_of = [
        next(j for j, t in enumerate(tiers) if (t > k and t >= min_size) or t == vocab)
        for k in top_k
    ]
    for j, size in enumerate(tiers):
        group = [i for i in range(n) if tier_of[i] == j]
        if not group:
            continue
        sub = _select_rows(probs, group)
        if size < vocab:
            values, ids = _top_candidates(sub, size)
        else:
            values, ids = sub.sort(dim=-1, descending=True)
        sub_rows = [rows[i] for i in group]
        threshold, complete = _threshold(values, sub_rows, [top_k[i] for i in group])
        done = (complete | (size == vocab)).tolist()
        for i, d in zip(group, done, strict=True):
            if not d:
                tier_of[i] = j + 1
        keep = [g for g, d in enumerate(done) if d]
        if keep:
            idx = torch.tensor(keep, device=device)
            kept = values[idx] >= threshold[idx].unsqueeze(1)
            u = _draw(sub_rows, keep, device)
            tokens[[group[g] for g in keep]] = _draw_kept(values[idx], ids[idx], kept, u)
    return tokens


def _threshold(
    values: torch.Tensor, rows: Sequence[SamplingRow], top_k: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept set ``p >= threshold`` of each row from its top candidates (R, K), decreasing.

    Applies top-k (0: off; all ties with the k-th value kept), top-p on the renormalised
    top-k mass (the full mass, 1, without top-k), then min-p. ``complete`` is True where that
    threshold is exact and above the last candidate, i.e. the kept set is all among them.
    """
    device = values.device
    size = values.shape[1]
    ks = torch.tensor(top_k, device=device)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float64, device=device)
    min_p = torch.tensor([r.params.min_p for r in rows], device=device)
    last = values[:, -1]

    kth = torch.where(ks > 0, values.gather(1, (ks - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    cum = torch.where(values >= kth.unsqueeze(1), values, 0.0).double().cumsum(dim=-1)
    base = torch.where(ks > 0, cum[:, -1], 1.0)
    cut = torch.searchsorted(cum, (top_p * base).unsqueeze(1)).clamp(max=size - 1)
    # Cut not among the candidates (k = 0): the true nucleus threshold is <= last, which
    # this gives too, so a min-p threshold above last still settles the row.
    nucleus = torch.where(top_p < 1.0, values.gather(1, cut).squeeze(1), 0.0)
    threshold = torch.maximum(torch.maximum(kth, nucleus), min_p * values[:, 0])
    # The top-k mass (top-p's base) is only right when no tie of the k-th value is left out.
    k_complete = (ks == 0) | (last < kth)
    return threshold, k_complete & (threshold > last)


def _draw_kept(
    values: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Inverse CDF at ``u`` over the kept candidates, walked in token-id order."""
    n, size = values.shape
    if size > _TOPK_TIERS[-1]:
        # The whole sorted vocabulary: scatter the kept mass back to id order, draw by blocks.
        dense = torch.zeros_like(values).scatter_(1, ids, torch.where(kept, values, 0.0))
        return _Blocks(dense).draw(torch.arange(n, device=values.device), u)
    sentinel = torch.iinfo(torch.long).max
    order, perm = torch.where(kept, ids, sentinel).sort(dim=-1)
    cdf = torch.where(order != sentinel, values.gather(1, perm), 0.0).double().cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    pos = torch.minimum(
        torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True),
        torch.searchsorted(cdf, total),
    )
    return order.gather(1, pos).squeeze(1)


# ---------------------------------------------------------------------- logprobs
def _add_logprobs(
    logits: torch.Tensor,
    rows: Sequence[SamplingRow],
    wants: list[int],
    tokens: torch.Tensor,
    result: SampleResult,
    ws: _Workspace,
) -> None:
    rows_logits = _select_rows(logits, wants)
    logp = torch.log_softmax(
        rows_logits, dim=-1, out=ws.get("logp", *rows_logits.shape, logits.device)
    )
    chosen = logp.gather(1, tokens[wants].unsqueeze(1)).squeeze(1).tolist()
    logprobs = [float("nan")] * len(rows)
    top: list[list[tuple[int, float]]] = [[] for _ in rows]
    for j, i in enumerate(wants):
        logprobs[i] = chosen[j]
    kmax = max(rows[i].params.logprobs or 0 for i in wants)
    if kmax > 0:
        values, ids = _top_candidates(logp, min(kmax, logp.shape[1]))
        values_l, ids_l = values.tolist(), ids.tolist()
        for j, i in enumerate(wants):
            k = rows[i].params.logprobs or 0
            top[i] = list(zip(ids_l[j][:k], values_l[j][:k], strict=True))
    result.logprobs = logprobs
    result.top_logprobs = top


__all__ = ["SampleResult", "Sampler", "SamplingRow", "make_generator"]
