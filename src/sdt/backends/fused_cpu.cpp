// Fused spatial-decay attention forward for the CPU (inference): see fused.py.
//
// For each group of sequences and block of query rows, one thread computes q k^T into a small
// cache-resident buffer, adds the decay bias -|(s_i + s_j) / 2 * dist(i, j)| while taking the row
// maximum (one pass), exponentiates and sums (a second pass), multiplies by v and divides by the
// row sums. Nothing of size L^2 is written to main memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for x <= 0 without a libm call, so that the compiler vectorises the loop: 2^(x log2 e)
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

// One query row against every key of its sequence: logits = scale * (q k^T) + bias, then
// exp(logits - max) in place; returns the sum of the exponentials.
inline float softmax_row(float* row, const float* rates, int64_t query, int64_t height, int64_t width,
                         bool indicator, float scale) {
  const int64_t q_row = query / width, q_col = query % width;
  const float half_rate_i = 0.5f * rates[query];
  float row_max = -3.0e38f;
  for (int64_t r = 0; r < height; ++r) {
    float* logits = row + r * width;
    const float* line_rates = rates + r * width;
    const float row_dist = static_cast<float>(std::abs(q_row - r));
    for (int64_t c = 0; c < width; ++c) {
      float dist;
      if (indicator) {
        dist = (r == q_row && c == q_col) ? 0.0f : 1.0f;
      } else {
        dist = row_dist + std::fabs(static_cast<float>(q_col - c));
      }
      const float value = logits[c] * scale - std::fabs((half_rate_i + 0.5f * line_rates[c]) * dist);
      logits[c] = value;
      row_max = std::max(row_max, value);
    }
  }
  const int64_t tokens = height * width;
  float total = 0.0f;
  for (int64_t j = 0; j < tokens; ++j) {
    const float e = exp_nonpositive(row[j] - row_max);
    row[j] = e;
    total += e;
  }
  return total;
}

}  // namespace

// q, k, v: (S, L, d) float32 contiguous; rates: (S, L) float32 contiguous; L = height * width.
// Returns softmax(q k^T / sqrt(d) + bias) v: (S, L, d) float32.
at::Tensor decay_attention_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor rates,
                                      int64_t height, int64_t width, bool indicator, int64_t budget) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be (S, L, d) float32");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v must have the same shape");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && rates.is_contiguous(), "inputs must be contiguous");
  const int64_t sequences = q.size(0), tokens = q.size(1), dim = q.size(2);
  TORCH_CHECK(tokens == height * width, "L must equal height * width");
  TORCH_CHECK(rates.dim() == 2 && rates.size(0) == sequences && rates.size(1) == tokens &&
              rates.scalar_type() == at::kFloat, "rates must be (S, L) float32");
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  // A task is `group` whole sequences (short ones) or `rows` query rows of one sequence, sized so
  // its logits (group * rows * L floats) stay near `budget` elements, i.e. in the core's cache.
  const int64_t rows = std::max<int64_t>(1, std::min(tokens, budget / tokens));
  const int64_t group = rows == tokens ? std::max<int64_t>(1, std::min(sequences, budget / (tokens * tokens))) : 1;
  const int64_t blocks = (tokens + rows - 1) / rows;
  const int64_t tasks = ((sequences + group - 1) / group) * blocks;
  auto out = at::empty_like(q);
  auto k_t = k.transpose(1, 2);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    auto logits_buffer = at::empty({group, rows, tokens}, q.options());
    std::vector<float> inverse_sums(group * rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = (task / blocks) * group, start = (task % blocks) * rows;
      const int64_t count = std::min(group, sequences - first), height_rows = std::min(rows, tokens - start);
      auto logits = logits_buffer.narrow(0, 0, count).narrow(1, 0, height_rows);
      at::bmm_out(logits, q.narrow(0, first, count).narrow(1, start, height_rows), k_t.narrow(0, first, count));
      float* data = logits.data_ptr<float>();
      for (int64_t s = 0; s < count; ++s) {
        const float* seq_rates = rates.data_ptr<float>() + (first + s) * tokens;
        for (int64_t r = 0; r < height_rows; ++r) {
          float* row = data + (s * rows + r) * tokens;
          inverse_sums[s * rows + r] = 1.0f / softmax_row(row, seq_rates, start + r, height, width, indicator, scale);
        }
      }
      auto out_block = out.narrow(0, first, count).narrow(1, start, height_rows);
      at::bmm_out(out_block, logits, v.narrow(0, first, count));
      for (int64_t s = 0; s < count; ++s) {
        float* out_data = out_block.select(0, s).data_ptr<float>();
        for (int64_t r = 0; r < height_rows; ++r) {
          const float inverse = inverse_sums[s * rows + r];
          for (int64_t c = 0; c < dim; ++c) out_data[r * dim + c] *= inverse;
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY(sdt_fused, m) {
  m.def("decay_attention_forward(Tensor q, Tensor k, Tensor v, Tensor rates, int height, int width, bool indicator, "
        "int budget) -> Tensor");
  m.impl("decay_attention_forward", c10::DispatchKey::CPU, TORCH_FN(decay_attention_forward));
}
