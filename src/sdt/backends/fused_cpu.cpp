// Fused spatial-decay attention for the CPU, forward and backward: see fused.py.
//
// Shapes: S sequences (batch x heads, or batch x heads x rows for the decomposed layout) of
// L = height * width tokens with head dim d; q, k, v, out (S, L, d); rates (S, L); lse (S, L).
// bias(i, j) = -|(s_i + s_j) / 2 * dist(i, j)| with the Manhattan distance on the grid (or the
// indicator i != j). One task is a block of query rows of one sequence, or a group of whole short
// sequences, sized so that its (rows, L) logits stay in the core's cache: the GEMMs and the
// elementwise passes of a block never touch main memory for anything of size L^2.
//
// q, k, v (and grad_out, out) are float32 or bfloat16, all of one dtype; rates, lse and the rate
// gradient are always float32, and out, dq, dk, dv come back in q's dtype. bfloat16 forward: each task
// widens its q rows and its sequences' k and v to float32 in cache, so the logits, the bias, the softmax
// and P v are the float32 kernel's, and the output is rounded to bf16 once. (A bf16 P v GEMM, with P
// rounded to bf16, was 10-40% slower per call at this model's shapes, L = 28-196 and d = 16-32, where
// oneDNN's small bf16 GEMMs lose to float32 ones, and twice as far from float32.) bfloat16 backward:
// the inputs are widened to float32 once (O(S L d), against the O(S L^2 d) work), the float32
// backward runs, and dq, dk, dv are rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// exp(x) for x <= 0 without a libm call, so that the compiler vectorises the loops: 2^(x log2 e)
// split into 2^n (exponent bits) and 2^f, f in [0, 1), by a degree-5 polynomial fitted to the
// relative error (max 2.4e-7, 2 float32 ulps). Below -87 the result is flushed towards 0.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = 0.0018753765718660083f;
  p = p * f + 0.008987259186660827f;
  p = p * f + 0.055835965428523704f;
  p = p * f + 0.24014649504458194f;
  p = p * f + 0.6931547379751158f;
  p = p * f + 0.999999834275679f;
  const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof(power));
  return p * power;
}

constexpr int64_t kLanes = 16;  // floats per AVX-512 register

// The grid of one sequence: `rows` and `cols` give each token's row and column (as floats, L each), so that
// the distance to every key is one flat loop over the L keys.
struct Layout {
  int64_t height, width;
  bool indicator;
  float scale;
  const float* rows;
  const float* cols;
  int64_t tokens() const { return height * width; }
};

// The row and column of each token of a height x width grid, for Layout.
struct GridCoordinates {
  std::vector<float> rows, cols;
  GridCoordinates(int64_t height, int64_t width) : rows(height * width), cols(height * width) {
    for (int64_t j = 0; j < height * width; ++j) {
      rows[j] = static_cast<float>(j / width);
      cols[j] = static_cast<float>(j % width);
    }
  }
};

// Calls body(j, dist(query, j), pair(query, j)) for every key j, pair = (s_i + s_j) / 2 * dist:
// the bias is -|pair|. One loop over all L keys, so that it vectorises in whole vectors with one tail
// per row (a loop per grid row left a scalar tail per grid row: at a 14-wide grid, 6 of 14 keys; bodies
// that only write row j, plus a sum the compiler vectorises as a reduction under -ffast-math).
template <typename Body>
inline void for_each_key(const Layout& layout, const float* rates, int64_t query, Body body) {
  const float q_row = layout.rows[query], q_col = layout.cols[query];
  const float half_rate_i = 0.5f * rates[query];
  const int64_t tokens = layout.tokens();
  if (layout.indicator) {
    for (int64_t j = 0; j < tokens; ++j) {
      const float dist = j == query ? 0.0f : 1.0f;
      body(j, dist, (half_rate_i + 0.5f * rates[j]) * dist);
    }
  } else {
    const float* rows = layout.rows;
    const float* cols = layout.cols;
    for (int64_t j = 0; j < tokens; ++j) {
      const float dist = std::fabs(q_row - rows[j]) + std::fabs(q_col - cols[j]);
      body(j, dist, (half_rate_i + 0.5f * rates[j]) * dist);
    }
  }
}

// The row of q k^T in `row` becomes its softmax probabilities, in place. Returns the row's log-sum-exp.
inline float softmax_row(float* row, const float* rates, int64_t query, const Layout& layout) {
  const float scale = layout.scale;
  for_each_key(layout, rates, query, [&](int64_t j, float, float pair) { row[j] = row[j] * scale - std::fabs(pair); });
  // The max and the exponentials run over blocks of kLanes floats with per-lane partial results, and
  // the last partial block is padded in a local one: a plain reduction loop stays scalar (GCC) and
  // a scalar tail of up to 15 exponentials per row costs as much as the rest at L = 56.
  const int64_t tokens = layout.tokens(), whole = tokens / kLanes * kLanes;
  float lane_max[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane_max[l] = -3.0e38f;
  for (int64_t j = 0; j < whole; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane_max[l] = std::max(lane_max[l], row[j + l]);
  for (int64_t j = whole; j < tokens; ++j) lane_max[j - whole] = std::max(lane_max[j - whole], row[j]);
  float row_max = lane_max[0];
  for (int64_t l = 1; l < kLanes; ++l) row_max = std::max(row_max, lane_max[l]);
  float lane_sum[kLanes] = {};
  for (int64_t j = 0; j < whole; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float e = exp_nonpositive(row[j + l] - row_max);
      row[j + l] = e;
      lane_sum[l] += e;
    }
  }
  if (whole < tokens) {
    const int64_t tail = tokens - whole;
    float block[kLanes];  // padding: exp(-100) is 1e-38 (flushed at -87), below the rounding of total >= 1
    for (int64_t l = 0; l < kLanes; ++l) block[l] = -100.0f;
    for (int64_t l = 0; l < tail; ++l) block[l] = row[whole + l] - row_max;
    for (int64_t l = 0; l < kLanes; ++l) {
      const float e = exp_nonpositive(block[l]);
      block[l] = e;
      lane_sum[l] += e;
    }
    for (int64_t l = 0; l < tail; ++l) row[whole + l] = block[l];
  }
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += lane_sum[l];
  const float inverse = 1.0f / total;
#pragma omp simd
  for (int64_t j = 0; j < tokens; ++j) row[j] *= inverse;
  return row_max + std::log(total);
}

// One query row of the backward, in place: the logits in p become P = exp(logits - lse), dP in ds becomes
// dS = P * (dP - delta), and each key's rate gradient is added to grad_rates; returns the query's own rate
// gradient (their sum). d(pair) = -sign(pair) * dS, and d(pair) / d(s_i) = d(pair) / d(s_j) = dist / 2.
// The restrict pointers let the loop vectorise.
template <bool Indicator>
inline float backward_row_for(const Layout& layout, const float* __restrict rates, int64_t query, float row_lse,
                              float row_delta, float* __restrict p, float* __restrict ds, float* __restrict grad_rates,
                              float* __restrict row_grad) {
  const float scale = layout.scale, q_row = layout.rows[query], q_col = layout.cols[query];
  const float half_rate_i = 0.5f * rates[query];
  const float* __restrict rows = layout.rows;
  const float* __restrict cols = layout.cols;
  const int64_t tokens = layout.tokens();
  // for_each_key's loop written out, one per distance, and its sum in a second pass over row_grad: through
  // the lambda, with the distance chosen inside the loop, or with the sum inside it, GCC left it scalar
  for (int64_t j = 0; j < tokens; ++j) {
    const float dist = Indicator ? (j == query ? 0.0f : 1.0f) : std::fabs(q_row - rows[j]) + std::fabs(q_col - cols[j]);
    const float pair = (half_rate_i + 0.5f * rates[j]) * dist;
    const float prob = exp_nonpositive(p[j] * scale - std::fabs(pair) - row_lse);
    p[j] = prob;
    const float grad = prob * (ds[j] - row_delta);
    ds[j] = grad;
    const float sign = pair > 0.0f ? 1.0f : (pair < 0.0f ? -1.0f : 0.0f);
    const float grad_rate = -sign * grad * 0.5f * dist;
    row_grad[j] = grad_rate;
    grad_rates[j] += grad_rate;
  }
  float lane_sum[kLanes] = {};
  const int64_t whole = tokens / kLanes * kLanes;
  for (int64_t j = 0; j < whole; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane_sum[l] += row_grad[j + l];
  for (int64_t j = whole; j < tokens; ++j) lane_sum[j - whole] += row_grad[j];
  float row_sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) row_sum += lane_sum[l];
  return row_sum;
}

inline float backward_row(const Layout& layout, const float* rates, int64_t query, float row_lse, float row_delta,
                          float* p, float* ds, float* grad_rates, float* row_grad) {
  return layout.indicator ? backward_row_for<true>(layout, rates, query, row_lse, row_delta, p, ds, grad_rates, row_grad)
                          : backward_row_for<false>(layout, rates, query, row_lse, row_delta, p, ds, grad_rates, row_grad);
}

// Work split: `rows` query rows per block and `group` whole sequences per task when one block
// holds a whole sequence, so that group * rows * L stays near `budget` floats.
struct Split {
  int64_t rows, group, blocks, groups;
  Split(int64_t sequences, int64_t tokens, int64_t budget) {
    rows = std::max<int64_t>(1, std::min(tokens, budget / tokens));
    group = rows == tokens ? std::max<int64_t>(1, std::min(sequences, budget / (tokens * tokens))) : 1;
    blocks = (tokens + rows - 1) / rows;
    groups = (sequences + group - 1) / group;
  }
};

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rates, int64_t height,
                  int64_t width) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous (S, L, d) tensor");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "q, k, v must be float32 or bfloat16, got ", q.scalar_type(), " (cast them, e.g. q.float())");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v must have the same shape");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && rates.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(q.size(1) == height * width, "L must equal height * width");
  TORCH_CHECK(rates.dim() == 2 && rates.size(0) == q.size(0) && rates.size(1) == q.size(1) &&
              rates.scalar_type() == at::kFloat, "rates must be (S, L) float32");
}

// softmax(q k^T / sqrt(d) + bias) v and the log-sum-exp of each row: ((S, L, d) in q's dtype, (S, L) float32).
template <typename scalar_t>
std::tuple<Tensor, Tensor> forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& rates,
                                        const Layout& layout, int64_t budget) {
  constexpr bool widen = !std::is_same_v<scalar_t, float>;  // bf16: q, k, v to float32 per task
  const int64_t sequences = q.size(0), tokens = q.size(1), dim = q.size(2);
  const Split split(sequences, tokens, budget);
  const auto f32 = q.options().dtype(at::kFloat);
  auto out = at::empty_like(q);
  auto lse = at::empty({sequences, tokens}, f32);
  float* lse_data = lse.data_ptr<float>();
  const float* rates_data = rates.data_ptr<float>();

  // Grad mode and InferenceMode are thread-local and OpenMP workers do not inherit them: without the
  // caller's state a worker writing into an inference tensor (any output made under
  // torch.inference_mode) raises "Inplace update to inference tensor outside InferenceMode".
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, split.groups * split.blocks, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard caller_state_guard(caller_state);
    at::NoGradGuard no_grad;  // out= GEMMs must not record autograd history
    auto logits_buffer = at::empty({split.group, split.rows, tokens}, f32);
    // bf16 only: float32 copies of the task's q rows, k and v, and of its output rows before rounding
    Tensor q_wide, k_wide, v_wide, out_wide;
    if constexpr (widen) {
      q_wide = at::empty({split.group, split.rows, dim}, f32);
      k_wide = at::empty({split.group, tokens, dim}, f32);
      v_wide = at::empty({split.group, tokens, dim}, f32);
      out_wide = at::empty({split.group, split.rows, dim}, f32);
    }
    float* logits_data = logits_buffer.data_ptr<float>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = (task / split.blocks) * split.group, start = (task % split.blocks) * split.rows;
      const int64_t count = std::min(split.group, sequences - first), rows = std::min(split.rows, tokens - start);
      auto logits = logits_buffer.narrow(0, 0, count).narrow(1, 0, rows);
      auto q_block = q.narrow(0, first, count).narrow(1, start, rows);
      auto k_group = k.narrow(0, first, count);
      if constexpr (widen) {
        q_block = q_wide.narrow(0, 0, count).narrow(1, 0, rows).copy_(q_block);
        k_group = k_wide.narrow(0, 0, count).copy_(k_group);
      }
      at::bmm_out(logits, q_block, k_group.transpose(1, 2));
      for (int64_t s = 0; s < count; ++s) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t offset = (s * split.rows + r) * tokens, seq = first + s, query = start + r;
          lse_data[seq * tokens + query] = softmax_row(logits_data + offset, rates_data + seq * tokens, query,
                                                       layout);
        }
      }
      auto out_block = out.narrow(0, first, count).narrow(1, start, rows);
      // softmax_row turned the logits into probabilities
      if constexpr (widen) {
        auto v_group = v_wide.narrow(0, 0, count).copy_(v.narrow(0, first, count));
        auto out_wide_block = out_wide.narrow(0, 0, count).narrow(1, 0, rows);
        at::bmm_out(out_wide_block, logits, v_group);
        out_block.copy_(out_wide_block);
      } else {
        at::bmm_out(out_block, logits, v.narrow(0, first, count));
      }
    }
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor> decay_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& rates, int64_t height, int64_t width,
                                                   bool indicator, int64_t budget) {
  check_inputs(q, k, v, rates, height, width);
  const GridCoordinates grid(height, width);
  const Layout layout{height, width, indicator, 1.0f / std::sqrt(static_cast<float>(q.size(2))), grid.rows.data(),
                      grid.cols.data()};
  if (q.scalar_type() == at::kBFloat16) return forward_impl<at::BFloat16>(q, k, v, rates, layout, budget);
  return forward_impl<float>(q, k, v, rates, layout, budget);
}

// Gradients of q, k, v and the rates (S, L) given grad_out and the forward's out and lse.
// Each task owns whole sequences, so their dk, dv and d(rates) accumulate without races.
std::tuple<Tensor, Tensor, Tensor, Tensor> decay_attention_backward(
    const Tensor& grad_out_in, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& rates, const Tensor& lse, int64_t height, int64_t width, bool indicator, int64_t budget) {
  check_inputs(q, k, v, rates, height, width);
  TORCH_CHECK(grad_out_in.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out_in.scalar_type() == q.scalar_type() &&
              out.scalar_type() == q.scalar_type(), "grad_out and out must have q's shape and dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == rates.sizes(),
              "lse must be the forward's contiguous (S, L) float32 log-sum-exp");
  if (q.scalar_type() == at::kBFloat16) {  // float32 throughout, rounded once at the end
    auto wide = [](const Tensor& t) { return t.to(at::kFloat).contiguous(); };
    auto [grad_q, grad_k, grad_v, grad_rates] = decay_attention_backward(
        wide(grad_out_in), wide(q), wide(k), wide(v), wide(out), rates, lse, height, width, indicator, budget);
    return {grad_q.to(q.scalar_type()), grad_k.to(q.scalar_type()), grad_v.to(q.scalar_type()), grad_rates};
  }
  const int64_t sequences = q.size(0), tokens = q.size(1);
  const GridCoordinates grid(height, width);
  const Layout layout{height, width, indicator, 1.0f / std::sqrt(static_cast<float>(q.size(2))), grid.rows.data(),
                      grid.cols.data()};
  const Split split(sequences, tokens, budget);
  auto grad_out = grad_out_in.contiguous();
  auto delta = (grad_out * out).sum(-1);  // rowsum(dO * O) = rowsum(P * dP): (S, L)
  auto grad_q = at::empty_like(q), grad_k = at::zeros_like(k), grad_v = at::zeros_like(v);
  auto grad_rates = at::zeros_like(rates);
  auto k_t = k.transpose(1, 2), v_t = v.transpose(1, 2);
  const float* rates_data = rates.data_ptr<float>();
  const float* lse_data = lse.data_ptr<float>();
  const float* delta_data = delta.data_ptr<float>();
  float* grad_rates_data = grad_rates.data_ptr<float>();
  const float scale = layout.scale;

  const at::ThreadLocalState caller_state;  // as in the forward
  at::parallel_for(0, split.groups, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard caller_state_guard(caller_state);
    at::NoGradGuard no_grad;
    auto probs_buffer = at::empty({split.group, split.rows, tokens}, q.options());
    auto grad_buffer = at::empty({split.group, split.rows, tokens}, q.options());
    std::vector<float> row_grad(tokens);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = task * split.group, count = std::min(split.group, sequences - first);
      auto k_t_group = k_t.narrow(0, first, count), v_t_group = v_t.narrow(0, first, count);
      auto k_group = k.narrow(0, first, count), grad_k_group = grad_k.narrow(0, first, count);
      auto grad_v_group = grad_v.narrow(0, first, count);
      for (int64_t start = 0; start < tokens; start += split.rows) {
        const int64_t rows = std::min(split.rows, tokens - start);
        auto probs = probs_buffer.narrow(0, 0, count).narrow(1, 0, rows);
        auto grad_logits = grad_buffer.narrow(0, 0, count).narrow(1, 0, rows);
        auto q_block = q.narrow(0, first, count).narrow(1, start, rows);
        auto grad_out_block = grad_out.narrow(0, first, count).narrow(1, start, rows);
        at::bmm_out(probs, q_block, k_t_group);
        at::bmm_out(grad_logits, grad_out_block, v_t_group);  // dP
        for (int64_t s = 0; s < count; ++s) {
          const int64_t seq = first + s;
          const float* seq_rates = rates_data + seq * tokens;
          float* seq_grad_rates = grad_rates_data + seq * tokens;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t query = start + r, index = seq * tokens + query;
            float* p = probs_buffer.data_ptr<float>() + (s * split.rows + r) * tokens;
            float* ds = grad_buffer.data_ptr<float>() + (s * split.rows + r) * tokens;
            const float row_lse = lse_data[index], row_delta = delta_data[index];
            seq_grad_rates[query] +=
                backward_row(layout, seq_rates, query, row_lse, row_delta, p, ds, seq_grad_rates, row_grad.data());
          }
        }
        grad_v_group.baddbmm_(probs.transpose(1, 2), grad_out_block);
        auto grad_q_block = grad_q.narrow(0, first, count).narrow(1, start, rows);
        at::bmm_out(grad_q_block, grad_logits, k_group);
        grad_k_group.baddbmm_(grad_logits.transpose(1, 2), q_block, 1.0, scale);
      }
    }
  });
  grad_q.mul_(scale);
  return {grad_q, grad_k, grad_v, grad_rates};
}


// Rotary embedding and the head layout in one pass (the attention's q and k, see ops.py):
// x (B, L, G * n * d) with any strides but a unit last one (a slice of the fused q/k/v GEMM's output)
// -> out (G, B, n, L, d) contiguous, pair (2i, 2i+1) of every head rotated by the angle of token l:
// (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), sin and cos (L, d) float32. Computed in float32 and
// rounded once to x's dtype. The backward applies the transposed rotation and writes (B, L, G * n * d).
template <typename scalar_t>
void rotary_heads_kernel(const Tensor& x, const Tensor& sin, const Tensor& cos, Tensor& out, int64_t groups,
                         int64_t heads, bool inverse) {
  // forward: x (B, L, C) strided -> out (G, B, n, L, d); inverse: x (G, B, n, L, d) -> out (B, L, C) contiguous
  const int64_t batch = inverse ? x.size(1) : x.size(0), tokens = sin.size(0), dim = sin.size(1);
  const int64_t channels = groups * heads * dim;
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const float* sin_data = sin.data_ptr<float>();
  const float* cos_data = cos.data_ptr<float>();
  const int64_t x_batch_stride = inverse ? 0 : x.stride(0), x_token_stride = inverse ? 0 : x.stride(1);
  at::parallel_for(0, batch * tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / tokens, l = index % tokens;
      const float* s = sin_data + l * dim;
      const float* c = cos_data + l * dim;
      for (int64_t head = 0; head < groups * heads; ++head) {
        const int64_t g = head / heads, h = head % heads;
        const int64_t heads_offset = (((g * batch + b) * heads + h) * tokens + l) * dim;
        const int64_t token_offset = inverse ? index * channels + head * dim
                                             : b * x_batch_stride + l * x_token_stride + head * dim;
        const scalar_t* src = x_data + (inverse ? heads_offset : token_offset);
        scalar_t* dst = out_data + (inverse ? token_offset : heads_offset);
        const float sign = inverse ? -1.0f : 1.0f;  // the transposed rotation turns by -angle
#pragma omp simd
        for (int64_t i = 0; i < dim; i += 2) {
          const float x0 = static_cast<float>(src[i]), x1 = static_cast<float>(src[i + 1]);
          dst[i] = static_cast<scalar_t>(x0 * c[i] - sign * x1 * s[i]);
          dst[i + 1] = static_cast<scalar_t>(x1 * c[i + 1] + sign * x0 * s[i + 1]);
        }
      }
    }
  });
}

void check_rotary_tables(const Tensor& sin, const Tensor& cos, int64_t tokens, int64_t dim) {
  TORCH_CHECK(sin.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.is_contiguous() &&
              cos.is_contiguous() && sin.dim() == 2 && sin.sizes() == cos.sizes(),
              "sin and cos must be contiguous (L, d) float32 tables");
  TORCH_CHECK(sin.size(0) == tokens && sin.size(1) == dim && dim % 2 == 0,
              "the rotary tables are (", sin.size(0), ", ", sin.size(1), ") but the input has ", tokens,
              " tokens of head size ", dim, " (an even size)");
}

Tensor rotary_heads(const Tensor& x, const Tensor& sin, const Tensor& cos, int64_t groups, int64_t heads) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be (B, L, C) with a unit last stride");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(groups > 0 && heads > 0 && x.size(2) % (groups * heads) == 0, "C must split into groups x heads");
  const int64_t dim = x.size(2) / (groups * heads);
  check_rotary_tables(sin, cos, x.size(1), dim);
  auto out = at::empty({groups, x.size(0), heads, x.size(1), dim}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    rotary_heads_kernel<at::BFloat16>(x, sin, cos, out, groups, heads, false);
  } else {
    rotary_heads_kernel<float>(x, sin, cos, out, groups, heads, false);
  }
  return out;
}

Tensor rotary_heads_backward(const Tensor& grad_in, const Tensor& sin, const Tensor& cos) {
  TORCH_CHECK(grad_in.dim() == 5, "the gradient must be (G, B, n, L, d)");
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat || grad_in.scalar_type() == at::kBFloat16,
              "the gradient must be float32 or bfloat16");
  auto grad = grad_in.contiguous();
  const int64_t groups = grad.size(0), heads = grad.size(2), dim = grad.size(4);
  check_rotary_tables(sin, cos, grad.size(3), dim);
  auto out = at::empty({grad.size(1), grad.size(3), groups * heads * dim}, grad.options());
  if (grad.scalar_type() == at::kBFloat16) {
    rotary_heads_kernel<at::BFloat16>(grad, sin, cos, out, groups, heads, true);
  } else {
    rotary_heads_kernel<float>(grad, sin, cos, out, groups, heads, true);
  }
  return out;
}


// Depthwise convolutions on channels-last (B, H, W, C) tensors (sdt::depthwise_conv in ops.py): their
// weight and bias gradients. oneDNN's depthwise backward took 5-20 ms per call at the model's training
// shapes, many times its forward; the forward and the input gradient stay oneDNN convolutions.
// The weight and bias gradients of a depthwise conv: grad_weight (k * k, C) = sum over b, h, w of
// grad(b, h, w) * x(b, h + i - k/2, w + j - k/2), grad_bias (C) = sum of grad; float32. Each thread sums
// its rows into its own (k * k + 1, C) buffer, and the buffers are added at the end. Within a row,
// one kernel row i and 16 channels at a time, the k sums of taps (i, 0..k-1) stay in registers while
// w runs along the row (Kernel is a compile-time size for that; 0 is any size, slower).
template <typename scalar_t, int64_t Kernel>
void dwconv_param_grads_row(const scalar_t* grad_row, const scalar_t* x, int64_t sb, int64_t sh, int64_t sw,
                            int64_t b, int64_t h, int64_t height, int64_t width, int64_t channels,
                            int64_t kernel_runtime, float* acc) {
  constexpr int64_t kBlock = 16;
  const int64_t kernel = Kernel > 0 ? Kernel : kernel_runtime, pad = kernel / 2, taps = kernel * kernel;
  float* bias_acc = acc + taps * channels;
  for (int64_t w = 0; w < width; ++w) {
    const scalar_t* g = grad_row + w * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) bias_acc[c] += static_cast<float>(g[c]);
  }
  for (int64_t i = 0; i < kernel; ++i) {
    const int64_t hh = h + i - pad;
    if (hh < 0 || hh >= height) continue;
    const scalar_t* x_row = x + b * sb + hh * sh;
    for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
      const int64_t lanes = std::min(kBlock, channels - c0);
      float sums[Kernel > 0 ? Kernel : 16][kBlock] = {};
      for (int64_t w = 0; w < width; ++w) {
        const scalar_t* g = grad_row + w * channels + c0;
        float g_lanes[kBlock] = {};
        for (int64_t c = 0; c < lanes; ++c) g_lanes[c] = static_cast<float>(g[c]);
        for (int64_t j = 0; j < kernel; ++j) {
          const int64_t ww = w + j - pad;
          if (ww < 0 || ww >= width) continue;
          const scalar_t* src = x_row + ww * sw + c0;
          if (lanes == kBlock) {
#pragma omp simd
            for (int64_t c = 0; c < kBlock; ++c) sums[j][c] += g_lanes[c] * static_cast<float>(src[c]);
          } else {
            for (int64_t c = 0; c < lanes; ++c) sums[j][c] += g_lanes[c] * static_cast<float>(src[c]);
          }
        }
      }
      for (int64_t j = 0; j < kernel; ++j)
        for (int64_t c = 0; c < lanes; ++c) acc[(i * kernel + j) * channels + c0 + c] += sums[j][c];
    }
  }
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> dwconv_param_grads_impl(const Tensor& grad, const Tensor& x, int64_t kernel) {
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  const int64_t taps = kernel * kernel;
  const int64_t threads = at::get_num_threads();
  auto partial = at::zeros({threads, taps + 1, channels}, x.options().dtype(at::kFloat));
  float* partial_data = partial.data_ptr<float>();
  const scalar_t* grad_data = grad.data_ptr<scalar_t>();
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  const int64_t sb = x.stride(0), sh = x.stride(1), sw = x.stride(2);
  at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
    float* acc = partial_data + at::get_thread_num() * (taps + 1) * channels;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / height, h = row % height;
      const scalar_t* grad_row = grad_data + row * width * channels;
      if (kernel == 3) {
        dwconv_param_grads_row<scalar_t, 3>(grad_row, x_data, sb, sh, sw, b, h, height, width, channels, 3, acc);
      } else if (kernel == 5) {
        dwconv_param_grads_row<scalar_t, 5>(grad_row, x_data, sb, sh, sw, b, h, height, width, channels, 5, acc);
      } else {
        dwconv_param_grads_row<scalar_t, 0>(grad_row, x_data, sb, sh, sw, b, h, height, width, channels, kernel, acc);
      }
    }
  });
  auto total = partial.sum(0);
  return {total.narrow(0, 0, taps).clone(), total[taps].clone()};  // two tensors of their own
}

std::tuple<Tensor, Tensor> dwconv_param_grads(const Tensor& grad_in, const Tensor& x, int64_t kernel) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "x must be (B, H, W, C) with a unit channel stride");
  TORCH_CHECK(grad_in.sizes() == x.sizes() && grad_in.scalar_type() == x.scalar_type(),
              "grad must have x's shape and dtype");
  TORCH_CHECK(kernel % 2 == 1 && kernel <= 15, "the kernel size must be odd and at most 15");
  auto grad = grad_in.contiguous();
  if (x.scalar_type() == at::kBFloat16) return dwconv_param_grads_impl<at::BFloat16>(grad, x, kernel);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
  return dwconv_param_grads_impl<float>(grad, x, kernel);
}

}  // namespace

TORCH_LIBRARY(sdt_fused, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor rates, int height, int width, bool indicator, int budget) "
        "-> (Tensor, Tensor)");
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor rates, Tensor lse, int height, "
        "int width, bool indicator, int budget) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rotary_heads(Tensor x, Tensor sin, Tensor cos, int groups, int heads) -> Tensor");
  m.def("rotary_heads_backward(Tensor grad, Tensor sin, Tensor cos) -> Tensor");
  m.def("dwconv_param_grads(Tensor grad, Tensor x, int kernel) -> (Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, TORCH_FN(decay_attention_forward));
  m.impl("dwconv_param_grads", c10::DispatchKey::CPU, TORCH_FN(dwconv_param_grads));
  m.impl("rotary_heads", c10::DispatchKey::CPU, TORCH_FN(rotary_heads));
  m.impl("rotary_heads_backward", c10::DispatchKey::CPU, TORCH_FN(rotary_heads_backward));
  m.impl("backward", c10::DispatchKey::CPU, TORCH_FN(decay_attention_backward));
}
