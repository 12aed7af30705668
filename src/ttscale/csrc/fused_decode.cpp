// A decode step's decoder layers in one call: the small ops between the matmuls fused into
// plain loops, the paged attention read straight from the block pool (no gather copies).
//
// Why: at batch 1 a Llama layer is ~80 small eager ops from Python (norms, RoPE, SiLU-mul,
// residuals, casts, index work), each paying Python and dispatcher time; over 30 layers that
// was most of a decode step (docs/BENCHMARKS.md, "A decode step in one C++ call"). Here the
// per-layer work is four matmul kernel calls (torch's int4 / int8 weight-only CPU kernels,
// the same the eager path uses) and six fused loops.
//
// Numerics follow the eager path (models/llama.py, models/layers.py) op by op: the residual
// stream, norms, RoPE and SiLU-mul are rounded to the model's dtype T where eager rounds
// them, the matmuls take bf16 activations, attention accumulates in fp32. Sums run in
// another order, so results agree with eager to float rounding, not bit for bit
// (tests/test_fused_decode.py states the tolerances).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
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
// bf16 (T, N'), N' >= out_features (int4 pads N to 16); readers use the row stride.
struct QLinear {
  int64_t kind = 0;  // 0 int4, 1 int8, 2 oneDNN only
  at::Tensor a, b, dense;
  int64_t group = 0;
  int64_t out_features = 0;
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

// x += T(delta) (the residual add of a bf16 matmul output), then out = norm(x) (or nothing).
template <typename T>
void add_residual(T* x, const BFloat16* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<T>(to_f(x[i]) + to_f(delta[i]));
  }
}

// One token's q (into q_out, fp32 holding T-rounded values) and k (into the pool) with RoPE
// applied, v copied into the pool. qkv: the bf16 matmul row (+ bias in T); cos/sin: the
// rotary table's row at this token's position; buf: n_heads + 2 * n_kv_heads heads of floats.
template <typename T, typename P>
void rope_and_store(
    const BFloat16* qkv, const T* bias, const float* cos, const float* sin, int64_t n_heads,
    int64_t n_kv_heads, int64_t d, float* q_out, P* k_slot, P* v_slot, std::vector<float>& buf) {
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
  auto rotate = [&](const float* a, auto* out) {
    using O = std::remove_pointer_t<decltype(out)>;
    for (int64_t i = 0; i < half; ++i) {
      const float lo = round_to<T>(round_to<T>(a[i] * c[i]) + round_to<T>(-a[i + half] * sn[i]));
      const float hi = round_to<T>(
          round_to<T>(a[i + half] * c[i + half]) + round_to<T>(a[i] * sn[i + half]));
      out[i] = static_cast<O>(lo);
      out[i + half] = static_cast<O>(hi);
    }
  };
  for (int64_t h = 0; h < n_heads; ++h) rotate(x + h * d, q_out + h * d);
  for (int64_t h = 0; h < n_kv_heads; ++h) rotate(x + (n_heads + h) * d, k_slot + h * d);
  const float* v = x + (n_heads + n_kv_heads) * d;
  for (int64_t i = 0; i < n_kv_heads * d; ++i) v_slot[i] = static_cast<P>(v[i]);
}

// 16 floats: GCC/Clang vector extensions, lowered to AVX-512 (or split to AVX2/SSE) by the
// compiler; head_dim must be a multiple of 16 (checked in Python).
typedef float v16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

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

inline float hsum(v16 v) {  // a shuffle tree: 4 adds, not 15 scalar ones
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline v16 splat(float x) { return v16{} + x; }

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

constexpr int kMaxGroup = 8;   // query heads per KV head the fast loop keeps in registers
constexpr int kMaxChunks = 8;  // head_dim / 16 (head_dim <= 128)
constexpr int kMaxBlock = 64;  // block_size (a multiple of 16 lanes)

// Softmax attention of one token's g query heads of one KV head over its context, read from
// the pool block by block through the block table, one pass with an online softmax
// (flash-decoding's recurrence): keys and values of a block are read together, once.
// q: (g, d) fp32; out: (g, d) bf16 holding T-rounded values.
template <typename T, typename P, typename O>
void attend(
    const float* q, const P* k_pool, const P* v_pool, const int64_t* table, int64_t ctx,
    int64_t block_size, int64_t n_kv_heads, int64_t kv_head, int64_t g, int64_t d, float scale,
    O* out) {
  const int64_t chunks = d / kLanes, row = n_kv_heads * d;
  v16 qv[kMaxGroup][kMaxChunks], acc[kMaxGroup][kMaxChunks];
  float m[kMaxGroup], total[kMaxGroup];
  alignas(64) float s[kMaxGroup][kMaxBlock] = {};
  for (int64_t h = 0; h < g; ++h) {
    for (int64_t c = 0; c < chunks; ++c) {
      qv[h][c] = load16(q + h * d + c * kLanes) * scale;
      acc[h][c] = v16{} * 0.f;
    }
    m[h] = -INFINITY;
    total[h] = 0.f;
  }
  for (int64_t start = 0; start < ctx; start += block_size) {
    const int64_t n = std::min(block_size, ctx - start);
    const int64_t base = (table[start / block_size] * block_size) * row + kv_head * d;
    const P* kb = k_pool + base;
    const P* vb = v_pool + base;
    for (int64_t j = 0; j < n; ++j) {
      v16 kc[kMaxChunks];
      for (int64_t c = 0; c < chunks; ++c) kc[c] = load16(kb + j * row + c * kLanes);
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
      for (int64_t c = 0; c < chunks; ++c) vc[c] = load16(vb + j * row + c * kLanes);
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

// Attention of every token's query heads, each over its own context (its sequence's block
// table, its position + 1 keys). q: (T, h, d) fp32; out: (T, h, d).
template <typename T, typename P, typename O>
void attention(
    const float* q, const P* k_pool, const P* v_pool, const int64_t* tables, int64_t max_blocks,
    const int64_t* ctx, int64_t n_tokens, int64_t h, int64_t kvh, int64_t d, int64_t block_size,
    float scale, O* out) {
  const int64_t g = h / kvh;
  int64_t keys = 0;
  for (int64_t t = 0; t < n_tokens; ++t) keys += ctx[t];
  // Split over threads only when there is enough of it to pay the fork.
  const int64_t grain = keys >= 512 ? 1 : n_tokens * kvh;
  // KV-head-major: the rows of one head run back to back, so a prefix they share (forked
  // samples) is still in cache when the next row reads it.
  at::parallel_for(0, n_tokens * kvh, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t hk = i / n_tokens, t = i % n_tokens;
      attend<T, P, O>(q + (t * h + hk * g) * d, k_pool, v_pool, tables + t * max_blocks, ctx[t],
                      block_size, kvh, hk, g, d, scale, out + (t * h + hk * g) * d);
    }
  });
}

// out = bf16(T(T(silu(gate)) * up)) from the gate_up matmul's bf16 row, as MLP.forward.
template <typename T>
void silu_mul(const BFloat16* gate_up, BFloat16* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = to_f(gate_up[i]);
    const float s = round_to<T>(gv / (1.f + std::exp(-gv)));
    out[i] = static_cast<BFloat16>(round_to<T>(s * to_f(gate_up[n + i])));
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
      at::Tensor input_norm, at::Tensor post_norm, std::vector<QLinear> linears) {
    TORCH_CHECK(linears.size() == 4, "a layer has 4 linears: qkv, o, gate_up, down");
    layers_.push_back({input_norm.contiguous(), post_norm.contiguous(), linears[0], linears[1],
                       linears[2], linears[3]});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: (T, hidden) residual stream in the model's dtype, updated in place and returned.
  // tables: (T, max_blocks) int64, each token's sequence's block table; ctx: (T,) int64, the
  // context each token attends to (its position + 1); slots: (T,) its KV slot; cos/sin:
  // (T, head_dim) fp32 rows of the rotary table at its position; k_pool/v_pool: the KV cache's
  // (layers, rows, n_kv_heads, head_dim) float pools.
  at::Tensor forward(
      at::Tensor x, const at::Tensor& tables, const at::Tensor& ctx, const at::Tensor& slots,
      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_pool,
      const at::Tensor& v_pool, int64_t block_size) {
    TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.size(1) == hidden_, "x: (T, hidden)");
    TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "pools must be contiguous");
    TORCH_CHECK(k_pool.size(0) == num_layers(), "pool layers != model layers");
    TORCH_CHECK(tables.scalar_type() == at::kLong && ctx.scalar_type() == at::kLong &&
                    slots.scalar_type() == at::kLong, "tables, ctx, slots: int64");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "cos/sin fp32");
    TORCH_CHECK(block_size <= kMaxBlock, "block_size <= ", kMaxBlock);
    c10::InferenceMode guard;
    const auto x_type = x.scalar_type();
    const auto p_type = k_pool.scalar_type();
    if (x_type == at::kFloat && p_type == at::kFloat) {
      run<float, float>(x, tables, ctx, slots, cos, sin, k_pool, v_pool, block_size);
    } else if (x_type == at::kFloat && p_type == at::kBFloat16) {
      run<float, BFloat16>(x, tables, ctx, slots, cos, sin, k_pool, v_pool, block_size);
    } else if (x_type == at::kBFloat16 && p_type == at::kBFloat16) {
      run<BFloat16, BFloat16>(x, tables, ctx, slots, cos, sin, k_pool, v_pool, block_size);
    } else if (x_type == at::kBFloat16 && p_type == at::kFloat) {
      run<BFloat16, float>(x, tables, ctx, slots, cos, sin, k_pool, v_pool, block_size);
    } else {
      TORCH_CHECK(false, "fused decode takes fp32/bf16 activations and pools, not ", x_type,
                  " / ", p_type);
    }
    return x;
  }

 private:
  template <typename T, typename P>
  void run(
      at::Tensor& x, const at::Tensor& tables, const at::Tensor& ctx_t, const at::Tensor& slots_t,
      const at::Tensor& cos_t, const at::Tensor& sin_t, const at::Tensor& k_pool_t,
      const at::Tensor& v_pool_t, int64_t block_size) {
    const int64_t n_tokens = x.size(0);
    const int64_t d = head_dim_, h = n_heads_, kvh = n_kv_heads_, g = h / kvh;
    const int64_t layer_rows = k_pool_t.size(1) * kvh * d;  // elements per pool layer
    const auto bf16 = x.options().dtype(at::kBFloat16);
    at::Tensor normed = at::empty({n_tokens, hidden_}, bf16);
    at::Tensor attn_out = at::empty({n_tokens, h * d}, bf16);
    at::Tensor act = at::empty({n_tokens, intermediate_}, bf16);
    at::Tensor q = at::empty({n_tokens, h * d}, x.options().dtype(at::kFloat));
    T* xp = x.data_ptr<T>();
    BFloat16* np = normed.data_ptr<BFloat16>();
    const int64_t* tab = tables.data_ptr<int64_t>();
    const int64_t max_blocks = tables.size(1);
    const int64_t* ctx = ctx_t.data_ptr<int64_t>();
    const int64_t* slots = slots_t.data_ptr<int64_t>();
    std::vector<float> buf;

    for (int64_t t = 0; t < n_tokens; ++t) {
      rms_norm_bf16<T>(xp + t * hidden_, layers_[0].input_norm.data_ptr<T>(), np + t * hidden_,
                       hidden_, eps_);
    }
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      P* k_pool = k_pool_t.data_ptr<P>() + static_cast<int64_t>(li) * layer_rows;
      P* v_pool = v_pool_t.data_ptr<P>() + static_cast<int64_t>(li) * layer_rows;
      // q/k/v, RoPE, KV write.
      at::Tensor qkv = L.qkv.mm(normed, gemv_rows_);
      const BFloat16* qkvp = qkv.data_ptr<BFloat16>();
      const T* bias = L.qkv.bias.defined() ? L.qkv.bias.data_ptr<T>() : nullptr;
      for (int64_t t = 0; t < n_tokens; ++t) {
        rope_and_store<T, P>(qkvp + t * qkv.stride(0), bias, cos_t.data_ptr<float>() + t * d,
                             sin_t.data_ptr<float>() + t * d, h, kvh, d,
                             q.data_ptr<float>() + t * h * d, k_pool + slots[t] * kvh * d,
                             v_pool + slots[t] * kvh * d, buf);
      }
      attention<T, P>(q.data_ptr<float>(), k_pool, v_pool, tab, max_blocks, ctx, n_tokens, h, kvh,
                      d, block_size, scale_, attn_out.data_ptr<BFloat16>());
      // Output projection, residual, post-attention norm.
      at::Tensor o = L.o.mm(attn_out, gemv_rows_);
      for (int64_t t = 0; t < n_tokens; ++t) {
        add_residual<T>(xp + t * hidden_, o.data_ptr<BFloat16>() + t * o.stride(0), hidden_);
        rms_norm_bf16<T>(xp + t * hidden_, L.post_norm.data_ptr<T>(), np + t * hidden_, hidden_,
                         eps_);
      }
      // MLP, residual, the next layer's input norm.
      at::Tensor gu = L.gate_up.mm(normed, gemv_rows_);
      for (int64_t t = 0; t < n_tokens; ++t) {
        silu_mul<T>(gu.data_ptr<BFloat16>() + t * gu.stride(0),
                    act.data_ptr<BFloat16>() + t * intermediate_, intermediate_);
      }
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
};

QLinear make_linear(
    int64_t kind, at::Tensor a, at::Tensor b, int64_t group, int64_t out_features,
    c10::optional<at::Tensor> bias, c10::optional<at::Tensor> dense) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "linear kind: 0 int4, 1 int8, 2 oneDNN");
  TORCH_CHECK(kind != 2 || dense.has_value(), "a oneDNN linear needs its packed weight");
  QLinear l;
  l.kind = kind;
  l.a = a;
  l.b = b;
  l.group = group;
  l.out_features = out_features;
  if (bias.has_value()) l.bias = bias->contiguous();
  if (dense.has_value()) l.dense = *dense;
  return l;
}

// The fused step's attention alone, fp32 activations (tests, benchmarks): q (T, h, d) fp32,
// pools (rows, kvh, d) fp32 or bf16, tables (T, max_blocks) and ctx (T,) int64 -> (T, h, d).
at::Tensor paged_attention(
    const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
    const at::Tensor& tables, const at::Tensor& ctx, int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "q: (T, h, d) fp32");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.dim() == 3, "pools");
  TORCH_CHECK(tables.scalar_type() == at::kLong && ctx.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(q.size(2) % kLanes == 0 && q.size(2) / kLanes <= kMaxChunks, "head_dim");
  TORCH_CHECK(block_size <= kMaxBlock, "block_size");
  const int64_t kvh = k_pool.size(1);
  TORCH_CHECK(q.size(1) % kvh == 0 && q.size(1) / kvh <= kMaxGroup, "heads per KV head");
  at::Tensor out = at::empty_like(q);
  auto run = [&](auto* k, auto* v) {
    attention<float>(q.data_ptr<float>(), k, v, tables.contiguous().data_ptr<int64_t>(),
                     tables.size(1), ctx.contiguous().data_ptr<int64_t>(), q.size(0), q.size(1),
                     kvh, q.size(2), block_size, static_cast<float>(scale), out.data_ptr<float>());
  };
  if (k_pool.scalar_type() == at::kFloat) {
    run(k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
  } else {
    TORCH_CHECK(k_pool.scalar_type() == at::kBFloat16, "pools: fp32 or bf16");
    run(k_pool.data_ptr<BFloat16>(), v_pool.data_ptr<BFloat16>());
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
