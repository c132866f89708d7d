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

struct Layout {
  int64_t height, width;
  bool indicator;
  float scale;
  int64_t tokens() const { return height * width; }
};

// Calls body(j, dist(query, j), pair(query, j)) for every key j, pair = (s_i + s_j) / 2 * dist:
// the bias is -|pair|. A loop over grid rows and columns, one per distance, so that it vectorises
// (bodies that only write row j; a sum across j in the body keeps the compiler from vectorising).
template <typename Body>
inline void for_each_key(const Layout& layout, const float* rates, int64_t query, Body body) {
  const int64_t q_row = query / layout.width, q_col = query % layout.width;
  const float half_rate_i = 0.5f * rates[query];
  for (int64_t r = 0; r < layout.height; ++r) {
    const float* line_rates = rates + r * layout.width;
    const int64_t offset = r * layout.width;
    if (layout.indicator) {
      for (int64_t c = 0; c < layout.width; ++c) {
        const float dist = (r == q_row && c == q_col) ? 0.0f : 1.0f;
        body(offset + c, dist, (half_rate_i + 0.5f * line_rates[c]) * dist);
      }
    } else {
      const float row_dist = static_cast<float>(std::abs(q_row - r)), q_col_f = static_cast<float>(q_col);
      for (int64_t c = 0; c < layout.width; ++c) {
        const float dist = row_dist + std::fabs(q_col_f - static_cast<float>(c));
        body(offset + c, dist, (half_rate_i + 0.5f * line_rates[c]) * dist);
      }
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
  const Layout layout{height, width, indicator, 1.0f / std::sqrt(static_cast<float>(q.size(2)))};
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
  const Layout layout{height, width, indicator, 1.0f / std::sqrt(static_cast<float>(q.size(2)))};
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
            float row_sum = 0.0f;
            // P = exp(logits - lse); dS = P * (dP - delta); d(pair) = -sign(pair) * dS, and
            // d(pair) / d(s_i) = d(pair) / d(s_j) = dist / 2: rate i gets the row, rate j the column.
            for_each_key(layout, seq_rates, query, [&](int64_t j, float dist, float pair) {
              const float prob = exp_nonpositive(p[j] * scale - std::fabs(pair) - row_lse);
              p[j] = prob;
              const float grad = prob * (ds[j] - row_delta);
              ds[j] = grad;
              const float sign = static_cast<float>((pair > 0.0f) - (pair < 0.0f));
              const float grad_rate = -sign * grad * 0.5f * dist;
              row_sum += grad_rate;
              seq_grad_rates[j] += grad_rate;
            });
            seq_grad_rates[query] += row_sum;
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

}  // namespace

TORCH_LIBRARY(sdt_fused, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor rates, int height, int width, bool indicator, int budget) "
        "-> (Tensor, Tensor)");
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor rates, Tensor lse, int height, "
        "int width, bool indicator, int budget) -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("forward", c10::DispatchKey::CPU, TORCH_FN(decay_attention_forward));
  m.impl("backward", c10::DispatchKey::CPU, TORCH_FN(decay_attention_backward));
}
