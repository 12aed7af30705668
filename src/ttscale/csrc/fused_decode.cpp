// A decode step's decoder layers in one call: the small ops between the matmuls fused into
// plain loops, the paged attention read straight from the block pool (no gather copies).
//
// Why: at batch 1 a Llama layer is ~80 small eager ops from Python (norms, RoPE, SiLU-mul,
// residuals, casts, index work), each paying Python and dispatcher time; over 30 layers that
// was most of a decode step (models/fused.py; docs/BENCHMARKS.md, "Session 6"). Here the
// per-layer work is four matmul kernel calls (torch's int4 / int8 weight-only CPU kernels,
// the same the eager path uses) and six fused loops.
//
// The KV pool may be float (fp32 / bf16) or int8 with a scale per (token, KV head)
// (kvcache/quant.py's Int8KVCache), and layers may read block top-k (attention/sparse.py's
// selection: sink block, local window, current block, the best-scoring blocks by their mean
// key), so the Kinetics memory path runs fused too.
//
// Numerics follow the eager path (models/llama.py, models/layers.py) op by op: the residual
// stream, norms, RoPE and SiLU-mul are rounded to the model's dtype T where eager rounds
// them, the matmuls take bf16 activations, attention accumulates in fp32. Sums run in
// another order, so results agree with eager to float rounding, not bit for bit
// (tests/test_fused_decode.py states the tolerances).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::BFloat16;

inline float to_f(float x) { return x; }
inline float to_f(BFloat16 x) { return static_cast<float>(x); }

// Rounds a float to T and back: what storing an intermediate in the model's dtype does.
template <typename T>
inline float round_to(float x) {
  return to_f(static_cast<T>(x));
}

// y = x W^T through oneDNN with a pre-packed bf16 weight (mkldnn::_linear_pointwise, what
// models/quant.py's onednn_linear calls), found once through the dispatcher.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  return op.call(x, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(),
                 std::nullopt);
}

// A Linear's kernel operands as models/quant.py and models/layers.py pack them. int4:
// (packed codes, scales_zeros, group); int8: (codes, per-row scales); `dense`: a oneDNN-packed
// bf16 copy, used for steps of more than `gemv_rows` rows (the quantized kernels are
// GEMV-style, quant.GEMV_ROWS) or always (kind 2: a bf16 model's own weight). Outputs are
// bf16 (T, N'), N' >= the layer's width (int4 pads N to 16); readers use the row stride.
struct QLinear {
  int64_t kind = 0;  // 0 int4, 1 int8, 2 oneDNN only
  at::Tensor a, b, dense;
  int64_t group = 0;
  at::Tensor bias;  // model dtype, or undefined

  at::Tensor mm(const at::Tensor& x, int64_t gemv_rows) const {
    if (dense.defined() && (kind == 2 || x.size(0) > gemv_rows)) return onednn_linear(x, dense);
    return kind == 0 ? at::_weight_int4pack_mm_for_cpu(x, a, group, b)
                     : at::_weight_int8pack_mm(x, a, b);
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;  // model dtype
  QLinear qkv, o, gate_up, down;
};

template <typename T>
float sum_squares(const T* x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f(x[i]);
    s += v * v;
  }
  return s;
}

// out = bf16(w * T(x / rms(x))), as RMSNorm.forward then the matmul's bf16 cast.
template <typename T>
void rms_norm_bf16(const T* x, const T* w, BFloat16* out, int64_t n, float eps) {
  const float r = 1.f / std::sqrt(sum_squares(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    const float y = round_to<T>(to_f(x[i]) * r);
    out[i] = static_cast<BFloat16>(round_to<T>(to_f(w[i]) * y));
  }
}

// x += T(delta): the residual add of a bf16 matmul output, rounded as eager rounds it.
template <typename T>
void add_residual(T* x, const BFloat16* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<T>(to_f(x[i]) + to_f(delta[i]));
  }
}

// 16 floats: GCC/Clang vector extensions, lowered to AVX-512 (or split to AVX2/SSE) by the
// compiler; head_dim must be a multiple of 16 (checked in Python).
typedef float v16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int kMaxGroup = 8;   // query heads per KV head the fast loop keeps in registers
constexpr int kMaxChunks = 8;  // head_dim / 16 (head_dim <= 128)
constexpr int kMaxBlock = 64;  // largest block_size (a block's scores fill whole 16-lane rows)

inline v16 splat(float x) { return v16{} + x; }

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v16 load16(const BFloat16* p) {
  typedef uint16_t u16x16 __attribute__((vector_size(32)));
  typedef uint32_t u32x16 __attribute__((vector_size(64)));
  u16x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  const u32x16 wide = __builtin_convertvector(raw, u32x16) << 16;  // bf16 is fp32's top half
  v16 v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

inline v16 load16(const int8_t* p) {
  typedef int8_t i8x16 __attribute__((vector_size(16)));
  i8x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  return __builtin_convertvector(raw, v16);
}

inline float hsum(v16 v) {  // a shuffle tree: 4 adds, not 15 scalar ones
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// exp of 16 floats <= 0 (softmax arguments): 2^(x log2 e) split into 2^n (exponent bits)
// times 2^f, f in [-0.5, 0.5], by its Taylor polynomial of degree 6 (relative error < 2e-7,
// about float rounding); at or below -87 it returns 0 (exp there is below float's normals).
inline v16 vexp(v16 x) {
  typedef int32_t i16 __attribute__((vector_size(64)));
  const i16 tiny = x <= -87.f;  // lanes: -1 where true
  x = tiny ? splat(-87.f) : x;
  const v16 t = x * 1.44269504088896341f;
  const i16 n = __builtin_convertvector(t - 0.5f, i16);  // round to nearest for t <= 0
  const v16 f = t - __builtin_convertvector(n, v16);
  v16 p = splat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const i16 bits = (n + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? splat(0.f) : p * scale;
}

// One layer of a float KV pool (P = float or bf16): rows (slot, KV head, d).
template <typename P>
struct FloatPool {
  P* k;
  P* v;
  int64_t kvh, d;

  const P* key_row(int64_t slot, int64_t head) const { return k + (slot * kvh + head) * d; }
  const P* value_row(int64_t slot, int64_t head) const { return v + (slot * kvh + head) * d; }
  void key(int64_t slot, int64_t head, v16* out) const {
    for (int64_t c = 0; c < d / kLanes; ++c) out[c] = load16(key_row(slot, head) + c * kLanes);
  }
  void value(int64_t slot, int64_t head, v16* out) const {
    for (int64_t c = 0; c < d / kLanes; ++c) out[c] = load16(value_row(slot, head) + c * kLanes);
  }
  // Stores one token's (kvh, d) keys and values, given as floats.
  void store(int64_t slot, const float* keys, const float* values) {
    for (int64_t i = 0; i < kvh * d; ++i) {
      k[slot * kvh * d + i] = static_cast<P>(keys[i]);
      v[slot * kvh * d + i] = static_cast<P>(values[i]);
    }
  }
};

// One layer of an int8 KV pool: codes (slot, KV head, d), one fp32 scale per (slot, KV head);
// x = code * scale, code = round(x / scale), scale = max|x| / 127 (kvcache/quant.py).
struct Int8Pool {
  int8_t* k;
  int8_t* v;
  float* k_scale;
  float* v_scale;
  int64_t kvh, d;

  static void read(const int8_t* codes, float scale, int64_t d, v16* out) {
    for (int64_t c = 0; c < d / kLanes; ++c) out[c] = load16(codes + c * kLanes) * scale;
  }
  void key(int64_t slot, int64_t head, v16* out) const {
    read(k + (slot * kvh + head) * d, k_scale[slot * kvh + head], d, out);
  }
  void value(int64_t slot, int64_t head, v16* out) const {
    read(v + (slot * kvh + head) * d, v_scale[slot * kvh + head], d, out);
  }
  static void quantize(const float* x, int64_t d, int8_t* codes, float* scale) {
    float amax = 0.f;
    for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = std::max(amax, 1e-12f) / 127.f;
    for (int64_t i = 0; i < d; ++i) {
      // x / s rounded half to even (torch.round), as eager quantize_int8.
      const float q = std::nearbyint(x[i] / s);
      codes[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
    }
    *scale = s;
  }
  void store(int64_t slot, const float* keys, const float* values) {
    for (int64_t h = 0; h < kvh; ++h) {
      quantize(keys + h * d, d, k + (slot * kvh + h) * d, k_scale + slot * kvh + h);
      quantize(values + h * d, d, v + (slot * kvh + h) * d, v_scale + slot * kvh + h);
    }
  }
};

// One token's q (into q_out, fp32 holding T-rounded values) and k, v (into kv_out, fp32:
// n_kv_heads heads each) with RoPE applied to q and k. qkv: the bf16 matmul row (+ bias in
// T); cos/sin: the rotary table's row at this token's position; buf: scratch.
template <typename T>
void rope(
    const BFloat16* qkv, const T* bias, const float* cos, const float* sin, int64_t n_heads,
    int64_t n_kv_heads, int64_t d, float* q_out, float* kv_out, std::vector<float>& buf) {
  const int64_t heads = n_heads + 2 * n_kv_heads, half = d / 2;
  buf.resize(static_cast<size_t>(heads * d + 2 * d));
  float* x = buf.data();
  for (int64_t i = 0; i < heads * d; ++i) {
    const float v = to_f(qkv[i]);  // bf16 -> T is exact for T in {fp32, bf16}
    x[i] = bias != nullptr ? round_to<T>(v + to_f(bias[i])) : v;
  }
  float* c = x + heads * d;  // cos/sin in T, as eager casts the table rows
  float* sn = c + d;
  for (int64_t i = 0; i < d; ++i) {
    c[i] = round_to<T>(cos[i]);
    sn[i] = round_to<T>(sin[i]);
  }
  // rotate_half(x) = cat(-x[half:], x[:half]); y = T(T(x * cos) + T(rotate_half(x) * sin)).
  auto rotate = [&](const float* a, float* out) {
    for (int64_t i = 0; i < half; ++i) {
      const float lo = round_to<T>(round_to<T>(a[i] * c[i]) + round_to<T>(-a[i + half] * sn[i]));
      const float hi = round_to<T>(
          round_to<T>(a[i + half] * c[i + half]) + round_to<T>(a[i] * sn[i + half]));
      out[i] = lo;
      out[i + half] = hi;
    }
  };
  for (int64_t h = 0; h < n_heads; ++h) rotate(x + h * d, q_out + h * d);
  for (int64_t h = 0; h < n_kv_heads; ++h) rotate(x + (n_heads + h) * d, kv_out + h * d);
  std::memcpy(kv_out + n_kv_heads * d, x + (n_heads + n_kv_heads) * d,
              sizeof(float) * n_kv_heads * d);
}

// The mean (dequantized) key of each KV head of a block whose last slot was just written:
// block top-k's block score reads it (KVCache.key_means, fp32 (blocks, kvh, d)).
template <typename Pool>
void update_key_mean(const Pool& pool, int64_t block, int64_t block_size, float* means) {
  const int64_t chunks = pool.d / kLanes;
  for (int64_t h = 0; h < pool.kvh; ++h) {
    v16 sum[kMaxChunks], key[kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) sum[c] = splat(0.f);
    for (int64_t j = 0; j < block_size; ++j) {
      pool.key(block * block_size + j, h, key);
      for (int64_t c = 0; c < chunks; ++c) sum[c] += key[c];
    }
    for (int64_t c = 0; c < chunks; ++c) {
      const v16 mean = sum[c] / static_cast<float>(block_size);
      std::memcpy(means + (block * pool.kvh + h) * pool.d + c * kLanes, &mean, sizeof(mean));
    }
  }
}

// The logical blocks one row and KV head reads under block top-k (attention/sparse.py's
// select_blocks): the first block, the last window_blocks + 1 (local window and current
// block) always; of the rest, the best by (mean of the head's g queries) . (block mean key),
// up to `keep` blocks in all. q: (g, d); means: the layer's (blocks, kvh, d) mean keys.
inline void select_blocks(
    const float* q, int64_t g, int64_t d, const float* means, int64_t kvh, int64_t head,
    const int64_t* table, int64_t n_blocks, int64_t keep, int64_t window_blocks,
    std::vector<std::pair<float, int64_t>>& scored, std::vector<int64_t>& out) {
  out.clear();
  scored.clear();
  const int64_t chunks = d / kLanes;
  v16 qm[kMaxChunks];
  for (int64_t c = 0; c < chunks; ++c) {
    qm[c] = splat(0.f);
    for (int64_t h = 0; h < g; ++h) qm[c] += load16(q + h * d + c * kLanes);
    qm[c] /= static_cast<float>(g);
  }
  for (int64_t n = 0; n < n_blocks; ++n) {
    if (n == 0 || n >= n_blocks - 1 - window_blocks) {
      out.push_back(n);
      continue;
    }
    const float* mk = means + (table[n] * kvh + head) * d;
    v16 dot = qm[0] * load16(mk);
    for (int64_t c = 1; c < chunks; ++c) dot += qm[c] * load16(mk + c * kLanes);
    scored.emplace_back(hsum(dot), n);
  }
  const int64_t extra = std::max<int64_t>(0, std::min<int64_t>(keep - out.size(), scored.size()));
  std::partial_sort(scored.begin(), scored.begin() + extra, scored.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first; });
  for (int64_t i = 0; i < extra; ++i) out.push_back(scored[i].second);
}

// Softmax attention of one token's g query heads of one KV head over the listed logical
// blocks of its context, read from the pool through the block table, one pass with an
// online softmax (flash-decoding's recurrence): keys and values of a block are read
// together, once. q: (g, d) fp32; out: (g, d) holding T-rounded values.
template <typename T, typename Pool, typename O>
void attend(
    const float* q, const Pool& pool, const int64_t* table, int64_t ctx, const int64_t* blocks,
    int64_t n_blocks, int64_t block_size, int64_t kv_head, int64_t g, float scale, O* out) {
  const int64_t d = pool.d, chunks = d / kLanes;
  v16 qv[kMaxGroup][kMaxChunks], acc[kMaxGroup][kMaxChunks];
  float m[kMaxGroup], total[kMaxGroup];
  alignas(64) float s[kMaxGroup][kMaxBlock] = {};
  for (int64_t h = 0; h < g; ++h) {
    for (int64_t c = 0; c < chunks; ++c) {
      qv[h][c] = load16(q + h * d + c * kLanes) * scale;
      acc[h][c] = splat(0.f);
    }
    m[h] = -INFINITY;
    total[h] = 0.f;
  }
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t start = blocks[b] * block_size;
    const int64_t n = std::min(block_size, ctx - start);
    const int64_t base = table[blocks[b]] * block_size;
    for (int64_t j = 0; j < n; ++j) {
      v16 kc[kMaxChunks];
      pool.key(base + j, kv_head, kc);
      for (int64_t h = 0; h < g; ++h) {
        v16 dot = qv[h][0] * kc[0];
        for (int64_t c = 1; c < chunks; ++c) dot += qv[h][c] * kc[c];
        s[h][j] = hsum(dot);
      }
    }
    for (int64_t h = 0; h < g; ++h) {
      float block_max = m[h];
      for (int64_t j = 0; j < n; ++j) block_max = std::max(block_max, s[h][j]);
      const float rescale = std::exp(m[h] - block_max);  // 0 on the first block
      m[h] = block_max;
      total[h] *= rescale;
      for (int64_t c = 0; c < chunks; ++c) acc[h][c] *= rescale;
      for (int64_t j = 0; j < n; j += kLanes) {  // s has room for whole lanes (kMaxBlock)
        const v16 e = vexp(load16(&s[h][j]) - block_max);
        std::memcpy(&s[h][j], &e, sizeof(e));
        const int64_t valid = std::min<int64_t>(kLanes, n - j);
        for (int64_t i = 0; i < valid; ++i) total[h] += e[i];
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      v16 vc[kMaxChunks];
      pool.value(base + j, kv_head, vc);
      for (int64_t h = 0; h < g; ++h) {
        for (int64_t c = 0; c < chunks; ++c) acc[h][c] += s[h][j] * vc[c];
      }
    }
  }
  for (int64_t h = 0; h < g; ++h) {
    const float inv = 1.f / total[h];
    for (int64_t c = 0; c < chunks; ++c) {
      for (int i = 0; i < kLanes; ++i) {
        out[h * d + c * kLanes + i] = static_cast<O>(round_to<T>(acc[h][c][i] * inv));
      }
    }
  }
}

// Block top-k settings of one layer's step: `budgets` (T,) tokens per row, 0 = dense; the
// layer's mean keys; the local window in blocks.
struct Sparse {
  const int64_t* budgets = nullptr;
  const float* means = nullptr;
  int64_t window_blocks = 0;
};

// Attention of every token's query heads, each over its own context (its sequence's block
// table, its position + 1 keys), all of it or its block top-k picks. q: (T, h, d) fp32;
// out: (T, h, d).
template <typename T, typename Pool, typename O>
void attention(
    const float* q, const Pool& pool, const int64_t* tables, int64_t max_blocks,
    const int64_t* ctx, int64_t n_tokens, int64_t h, int64_t block_size, float scale,
    const Sparse& sparse, O* out) {
  const int64_t kvh = pool.kvh, d = pool.d, g = h / kvh;
  int64_t keys = 0;
  for (int64_t t = 0; t < n_tokens; ++t) keys += ctx[t];
  // Split over threads only when there is enough of it (~100 us at ~5 ns a key and query
  // head) to pay the fork and the barrier: tiny parallel regions cost more than they save,
  // and on a machine whose cores are busy a barrier waits for a descheduled thread (a 30 us
  // region then takes ms).
  const int64_t grain = keys * h >= 16 * 1024 ? 1 : n_tokens * kvh;
  // KV-head-major: the rows of one head run back to back, so a prefix they share (forked
  // samples) is still in cache when the next row reads it.
  at::parallel_for(0, n_tokens * kvh, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> blocks;
    std::vector<std::pair<float, int64_t>> scored;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t hk = i / n_tokens, t = i % n_tokens;
      const float* qt = q + (t * h + hk * g) * d;
      const int64_t* table = tables + t * max_blocks;
      const int64_t n_blocks = (ctx[t] + block_size - 1) / block_size;
      const int64_t budget = sparse.budgets != nullptr ? sparse.budgets[t] : 0;
      if (budget > 0 && ctx[t] > budget) {
        select_blocks(qt, g, d, sparse.means, kvh, hk, table, n_blocks, budget / block_size,
                      sparse.window_blocks, scored, blocks);
      } else {
        blocks.resize(static_cast<size_t>(n_blocks));
        for (int64_t b = 0; b < n_blocks; ++b) blocks[b] = b;
      }
      attend<T>(qt, pool, table, ctx[t], blocks.data(), static_cast<int64_t>(blocks.size()),
                block_size, hk, g, scale, out + (t * h + hk * g) * d);
    }
  });
}

// out = bf16(T(T(silu(gate)) * up)) from the gate_up matmul's bf16 row, as MLP.forward.
// silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) (an argument <= 0, what vexp takes):
// 1 / (1 + e) for g >= 0, e / (1 + e) below.
template <typename T>
void silu_mul(const BFloat16* gate_up, BFloat16* out, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const v16 g = load16(gate_up + i), up = load16(gate_up + n + i);
    const v16 e = vexp(g < 0.f ? g : -g);
    const v16 sig = (g < 0.f ? e : splat(1.f)) / (1.f + e);
    const v16 y = g * sig;
    for (int64_t j = 0; j < kLanes; ++j) {
      out[i + j] = static_cast<BFloat16>(round_to<T>(round_to<T>(y[j]) * up[j]));
    }
  }
  for (; i < n; ++i) {
    const float gv = to_f(gate_up[i]);
    const float sv = round_to<T>(gv / (1.f + std::exp(-gv)));
    out[i] = static_cast<BFloat16>(round_to<T>(sv * to_f(gate_up[n + i])));
  }
}

class DecodeStack {
 public:
  DecodeStack(
      int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t hidden, int64_t intermediate,
      double eps, double scale, int64_t gemv_rows)
      : n_heads_(n_heads),
        n_kv_heads_(n_kv_heads),
        head_dim_(head_dim),
        hidden_(hidden),
        intermediate_(intermediate),
        eps_(static_cast<float>(eps)),
        scale_(static_cast<float>(scale)),
        gemv_rows_(gemv_rows) {
    TORCH_CHECK(head_dim % kLanes == 0 && head_dim / kLanes <= kMaxChunks,
                "fused decode needs head_dim a multiple of 16, at most 128, not ", head_dim);
    TORCH_CHECK(n_heads % n_kv_heads == 0 && n_heads / n_kv_heads <= kMaxGroup,
                "fused decode needs at most 8 query heads per KV head");
  }

  void add_layer(
      at::Tensor input_norm, at::Tensor post_norm, std::vector<QLinear> linears, bool sparse) {
    TORCH_CHECK(linears.size() == 4, "a layer has 4 linears: qkv, o, gate_up, down");
    layers_.push_back({input_norm.contiguous(), post_norm.contiguous(), linears[0], linears[1],
                       linears[2], linears[3]});
    sparse_.push_back(sparse);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: (T, hidden) residual stream in the model's dtype, updated in place and returned.
  // tables: (T, max_blocks) int64, each token's sequence's block table; ctx: (T,) int64, the
  // context each token attends to (its position + 1); slots: (T,) its KV slot; cos/sin:
  // (T, head_dim) fp32 rows of the rotary table at its position; k/v (and, int8, k_scale /
  // v_scale): the KV cache's pools; key_means: its block mean keys (or undefined: none
  // tracked); budgets: (T,) block top-k tokens of each token on sparse layers, 0 = dense
  // (or undefined: every token dense); window_blocks: block top-k's local window in blocks.
  at::Tensor forward(
      at::Tensor x, const at::Tensor& tables, const at::Tensor& ctx, const at::Tensor& slots,
      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k, const at::Tensor& v,
      c10::optional<at::Tensor> k_scale, c10::optional<at::Tensor> v_scale,
      c10::optional<at::Tensor> key_means, c10::optional<at::Tensor> budgets,
      int64_t window_blocks, int64_t block_size) {
    TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.size(1) == hidden_, "x: (T, hidden)");
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "pools must be contiguous");
    TORCH_CHECK(k.size(0) == num_layers(), "pool layers != model layers");
    TORCH_CHECK(tables.scalar_type() == at::kLong && ctx.scalar_type() == at::kLong &&
                    slots.scalar_type() == at::kLong, "tables, ctx, slots: int64");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "cos/sin fp32");
    TORCH_CHECK(block_size <= kMaxBlock, "block_size <= ", kMaxBlock);
    const bool has_budgets = budgets.has_value() && budgets->defined();
    TORCH_CHECK(!has_budgets || (key_means.has_value() && key_means->is_contiguous()),
                "block top-k needs the pool's mean keys");
    c10::InferenceMode guard;
    Step step{tables, ctx, slots, cos, sin, window_blocks, block_size};
    step.budgets = has_budgets ? budgets->contiguous() : at::Tensor();
    step.key_means = key_means.has_value() ? *key_means : at::Tensor();
    const auto x_type = x.scalar_type();
    const auto p_type = k.scalar_type();
    auto with_pool = [&](auto t_tag) {
      using T = decltype(t_tag);
      const int64_t per_layer = k.size(1) * n_kv_heads_;  // (slot, head) rows per layer
      if (p_type == at::kChar) {
        TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "an int8 pool needs its scales");
        run<T>(x, step, [&](int64_t layer) {
          return Int8Pool{k.data_ptr<int8_t>() + layer * per_layer * head_dim_,
                          v.data_ptr<int8_t>() + layer * per_layer * head_dim_,
                          k_scale->data_ptr<float>() + layer * per_layer,
                          v_scale->data_ptr<float>() + layer * per_layer, n_kv_heads_, head_dim_};
        });
      } else if (p_type == at::kFloat) {
        run<T>(x, step, [&](int64_t layer) {
          return FloatPool<float>{k.data_ptr<float>() + layer * per_layer * head_dim_,
                                  v.data_ptr<float>() + layer * per_layer * head_dim_,
                                  n_kv_heads_, head_dim_};
        });
      } else {
        TORCH_CHECK(p_type == at::kBFloat16, "KV pool: fp32, bf16 or int8, not ", p_type);
        run<T>(x, step, [&](int64_t layer) {
          return FloatPool<BFloat16>{k.data_ptr<BFloat16>() + layer * per_layer * head_dim_,
                                     v.data_ptr<BFloat16>() + layer * per_layer * head_dim_,
                                     n_kv_heads_, head_dim_};
        });
      }
    };
    if (x_type == at::kFloat) {
      with_pool(float{});
    } else {
      TORCH_CHECK(x_type == at::kBFloat16, "fused decode takes fp32/bf16 activations, not ",
                  x_type);
      with_pool(BFloat16{});
    }
    return x;
  }

 private:
  struct Step {
    const at::Tensor& tables;
    const at::Tensor& ctx;
    const at::Tensor& slots;
    const at::Tensor& cos;
    const at::Tensor& sin;
    int64_t window_blocks;
    int64_t block_size;
    at::Tensor budgets;
    at::Tensor key_means;
  };

  template <typename T, typename PoolOf>
  void run(at::Tensor& x, const Step& step, PoolOf pool_of) {
    const int64_t n_tokens = x.size(0);
    const int64_t d = head_dim_, h = n_heads_, kvh = n_kv_heads_;
    const int64_t bs = step.block_size;
    const auto bf16 = x.options().dtype(at::kBFloat16);
    at::Tensor normed = at::empty({n_tokens, hidden_}, bf16);
    at::Tensor attn_out = at::empty({n_tokens, h * d}, bf16);
    at::Tensor act = at::empty({n_tokens, intermediate_}, bf16);
    at::Tensor q = at::empty({n_tokens, h * d}, x.options().dtype(at::kFloat));
    std::vector<float> kv(static_cast<size_t>(2 * kvh * d)), buf;
    T* xp = x.data_ptr<T>();
    BFloat16* np = normed.data_ptr<BFloat16>();
    const int64_t* tab = step.tables.data_ptr<int64_t>();
    const int64_t max_blocks = step.tables.size(1);
    const int64_t* ctx = step.ctx.data_ptr<int64_t>();
    const int64_t* slots = step.slots.data_ptr<int64_t>();
    const bool means = step.key_means.defined();
    // Per-token loops go parallel only for steps of many tokens (see attention's grain).
    const int64_t row_grain = 32;
    const int64_t means_per_layer =
        means ? step.key_means.size(1) * step.key_means.size(2) * step.key_means.size(3) : 0;

    for (int64_t t = 0; t < n_tokens; ++t) {
      rms_norm_bf16<T>(xp + t * hidden_, layers_[0].input_norm.data_ptr<T>(), np + t * hidden_,
                       hidden_, eps_);
    }
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      auto pool = pool_of(static_cast<int64_t>(li));
      float* layer_means =
          means ? step.key_means.data_ptr<float>() + static_cast<int64_t>(li) * means_per_layer
                : nullptr;
      // q/k/v, RoPE, KV write (and the mean key of every block this write completes).
      at::Tensor qkv = L.qkv.mm(normed, gemv_rows_);
      const BFloat16* qkvp = qkv.data_ptr<BFloat16>();
      const T* bias = L.qkv.bias.defined() ? L.qkv.bias.data_ptr<T>() : nullptr;
      for (int64_t t = 0; t < n_tokens; ++t) {
        rope<T>(qkvp + t * qkv.stride(0), bias, step.cos.data_ptr<float>() + t * d,
                step.sin.data_ptr<float>() + t * d, h, kvh, d, q.data_ptr<float>() + t * h * d,
                kv.data(), buf);
        pool.store(slots[t], kv.data(), kv.data() + kvh * d);
      }
      if (means) {
        for (int64_t t = 0; t < n_tokens; ++t) {
          if (slots[t] % bs == bs - 1) update_key_mean(pool, slots[t] / bs, bs, layer_means);
        }
      }
      Sparse sparse;
      if (sparse_[li] && step.budgets.defined()) {
        sparse = {step.budgets.data_ptr<int64_t>(), layer_means, step.window_blocks};
      }
      attention<T>(q.data_ptr<float>(), pool, tab, max_blocks, ctx, n_tokens, h, bs, scale_,
                   sparse, attn_out.data_ptr<BFloat16>());
      // Output projection, residual, post-attention norm.
      at::Tensor o = L.o.mm(attn_out, gemv_rows_);
      for (int64_t t = 0; t < n_tokens; ++t) {
        add_residual<T>(xp + t * hidden_, o.data_ptr<BFloat16>() + t * o.stride(0), hidden_);
        rms_norm_bf16<T>(xp + t * hidden_, L.post_norm.data_ptr<T>(), np + t * hidden_, hidden_,
                         eps_);
      }
      // MLP, residual, the next layer's input norm.
      at::Tensor gu = L.gate_up.mm(normed, gemv_rows_);
      at::parallel_for(0, n_tokens, row_grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          silu_mul<T>(gu.data_ptr<BFloat16>() + t * gu.stride(0),
                      act.data_ptr<BFloat16>() + t * intermediate_, intermediate_);
        }
      });
      at::Tensor down = L.down.mm(act, gemv_rows_);
      for (int64_t t = 0; t < n_tokens; ++t) {
        add_residual<T>(xp + t * hidden_, down.data_ptr<BFloat16>() + t * down.stride(0),
                        hidden_);
        if (li + 1 < layers_.size()) {
          rms_norm_bf16<T>(xp + t * hidden_, layers_[li + 1].input_norm.data_ptr<T>(),
                           np + t * hidden_, hidden_, eps_);
        }
      }
    }
  }

  int64_t n_heads_, n_kv_heads_, head_dim_, hidden_, intermediate_;
  float eps_, scale_;
  int64_t gemv_rows_;
  std::vector<Layer> layers_;
  std::vector<bool> sparse_;
};

QLinear make_linear(
    int64_t kind, at::Tensor a, at::Tensor b, int64_t group, c10::optional<at::Tensor> bias,
    c10::optional<at::Tensor> dense) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "linear kind: 0 int4, 1 int8, 2 oneDNN");
  TORCH_CHECK(kind != 2 || dense.has_value(), "a oneDNN linear needs its packed weight");
  QLinear l;
  l.kind = kind;
  l.a = a;
  l.b = b;
  l.group = group;
  if (bias.has_value()) l.bias = bias->contiguous();
  if (dense.has_value()) l.dense = *dense;
  return l;
}

// The fused step's attention alone, fp32 activations (tests, benchmarks): q (T, h, d) fp32,
// one layer's pools (rows, kvh, d) fp32 or bf16, tables (T, max_blocks) and ctx (T,) int64
// -> (T, h, d) fp32.
at::Tensor paged_attention(
    const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
    const at::Tensor& tables, const at::Tensor& ctx, int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "q: (T, h, d) fp32");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.dim() == 3, "pools");
  TORCH_CHECK(tables.scalar_type() == at::kLong && ctx.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(q.size(2) % kLanes == 0 && q.size(2) / kLanes <= kMaxChunks, "head_dim");
  TORCH_CHECK(block_size <= kMaxBlock, "block_size");
  const int64_t kvh = k_pool.size(1), d = q.size(2);
  TORCH_CHECK(q.size(1) % kvh == 0 && q.size(1) / kvh <= kMaxGroup, "heads per KV head");
  at::Tensor out = at::empty_like(q);
  const at::Tensor t = tables.contiguous(), c = ctx.contiguous();
  auto run = [&](const auto& pool) {
    attention<float>(q.data_ptr<float>(), pool, t.data_ptr<int64_t>(), t.size(1),
                     c.data_ptr<int64_t>(), q.size(0), q.size(1), block_size,
                     static_cast<float>(scale), Sparse{}, out.data_ptr<float>());
  };
  if (k_pool.scalar_type() == at::kFloat) {
    run(FloatPool<float>{k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), kvh, d});
  } else {
    TORCH_CHECK(k_pool.scalar_type() == at::kBFloat16, "pools: fp32 or bf16");
    run(FloatPool<BFloat16>{k_pool.data_ptr<BFloat16>(), v_pool.data_ptr<BFloat16>(), kvh, d});
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<QLinear>(m, "QLinear");
  m.def("make_linear", &make_linear, "a Linear's kernel operands");
  m.def("paged_attention", &paged_attention, "the fused step's attention alone");
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, int64_t>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("num_layers", &DecodeStack::num_layers)
      .def("forward", &DecodeStack::forward);
}
