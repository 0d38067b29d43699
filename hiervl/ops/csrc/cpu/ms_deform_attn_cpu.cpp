// CPU kernels of multi-scale deformable attention (float32 and float64).
//
// Forward: one task per (batch, query); each writes only its own output row.
// Backward: one task per (batch, head, level). The taps of level l lie inside level l's rows
// of value, so grad_value[n, rows of l, h, :] is touched only by the task that owns
// (n, h, l), and every grad entry of the sampling locations / attention weights belongs to
// exactly one such task: the scatter needs neither atomics nor per-thread copies. Every task
// handles Lq * nP samples whatever its level's size, so the tasks are balanced.
#include <ATen/Parallel.h>

#include <cmath>

#include "ms_deform_attn.h"

namespace hiervl {
namespace {

// The (up to) four bilinear taps of one sampling location on an H x W map.
// Taps outside the map get index -1 (zero padding). dwdx / dwdy are the derivatives of each
// tap weight with respect to the pixel coordinates x and y.
template <typename T>
struct Taps {
  int64_t index[4];
  T weight[4];
  T dwdx[4];
  T dwdy[4];
};

// Returns false when no tap lies inside the map (nothing to read or write).
template <typename T>
inline bool bilinear_taps(T loc_x, T loc_y, int64_t height, int64_t width, Taps<T>& taps) {
  // grid_sample(align_corners=False): normalised 0 is the outer edge of the first pixel.
  const T x = loc_x * static_cast<T>(width) - T(0.5);
  const T y = loc_y * static_cast<T>(height) - T(0.5);
  // Written so that NaN coordinates also take the early exit.
  if (!(x > T(-1) && y > T(-1) && x < static_cast<T>(width) && y < static_cast<T>(height))) {
    return false;
  }
  const T x0f = std::floor(x), y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  const T lx = x - x0f, ly = y - y0f;
  const T hx = T(1) - lx, hy = T(1) - ly;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < width;
  const bool y0_in = y0 >= 0, y1_in = y0 + 1 < height;
  // Tap order: (y0, x0), (y0, x1), (y1, x0), (y1, x1).
  taps.index[0] = (y0_in && x0_in) ? y0 * width + x0 : -1;
  taps.index[1] = (y0_in && x1_in) ? y0 * width + x0 + 1 : -1;
  taps.index[2] = (y1_in && x0_in) ? (y0 + 1) * width + x0 : -1;
  taps.index[3] = (y1_in && x1_in) ? (y0 + 1) * width + x0 + 1 : -1;
  taps.weight[0] = hy * hx;
  taps.weight[1] = hy * lx;
  taps.weight[2] = ly * hx;
  taps.weight[3] = ly * lx;
  taps.dwdx[0] = -hy;
  taps.dwdx[1] = hy;
  taps.dwdx[2] = -ly;
  taps.dwdx[3] = ly;
  taps.dwdy[0] = -hx;
  taps.dwdy[1] = -lx;
  taps.dwdy[2] = hx;
  taps.dwdy[3] = lx;
  return true;
}

// Geometry shared by both passes.
struct Dims {
  int64_t batch, positions, heads, channels, queries, levels, points;
};

Dims dims_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return Dims{
      value.size(0),
      value.size(1),
      value.size(2),
      value.size(3),
      sampling_locations.size(1),
      sampling_locations.size(3),
      sampling_locations.size(4)};
}

template <typename T>
void forward_kernel(
    const T* __restrict__ value,
    const int64_t* shapes,
    const int64_t* starts,
    const T* __restrict__ locations,
    const T* __restrict__ weights,
    T* __restrict__ out,
    const Dims d) {
  const int64_t row = d.heads * d.channels;  // stride between two positions of value
  // ~nH·nL·nP·4·Dh multiply-adds per query: a few queries per task amortise scheduling.
  constexpr int64_t kGrain = 16;
  at::parallel_for(0, d.batch * d.queries, kGrain, [&](int64_t begin, int64_t end) {
    Taps<T> taps;
    for (int64_t nq = begin; nq < end; ++nq) {
      const T* value_n = value + (nq / d.queries) * d.positions * row;
      for (int64_t h = 0; h < d.heads; ++h) {
        T* __restrict__ out_h = out + (nq * d.heads + h) * d.channels;
        int64_t k = (nq * d.heads + h) * d.levels * d.points;  // flat sample index
        for (int64_t l = 0; l < d.levels; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const T* value_l = value_n + starts[l] * row + h * d.channels;
          for (int64_t p = 0; p < d.points; ++p, ++k) {
            if (!bilinear_taps(locations[2 * k], locations[2 * k + 1], height, width, taps)) {
              continue;
            }
            for (int t = 0; t < 4; ++t) {
              if (taps.index[t] < 0) continue;
              const T w = weights[k] * taps.weight[t];
              const T* __restrict__ v = value_l + taps.index[t] * row;
#pragma omp simd
              for (int64_t c = 0; c < d.channels; ++c) out_h[c] += w * v[c];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(
    const T* __restrict__ value,
    const int64_t* shapes,
    const int64_t* starts,
    const T* __restrict__ locations,
    const T* __restrict__ weights,
    const T* __restrict__ grad_out,
    T* __restrict__ grad_value,
    T* __restrict__ grad_locations,
    T* __restrict__ grad_weights,
    const Dims d) {
  const int64_t row = d.heads * d.channels;
  at::parallel_for(0, d.batch * d.heads * d.levels, 1, [&](int64_t begin, int64_t end) {
    Taps<T> taps;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task % d.levels;
      const int64_t h = (task / d.levels) % d.heads;
      const int64_t n = task / (d.levels * d.heads);
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const int64_t level_offset = (n * d.positions + starts[l]) * row + h * d.channels;
      for (int64_t q = 0; q < d.queries; ++q) {
        const int64_t nqh = (n * d.queries + q) * d.heads + h;
        const T* __restrict__ g = grad_out + nqh * d.channels;
        int64_t k = (nqh * d.levels + l) * d.points;  // flat sample index
        for (int64_t p = 0; p < d.points; ++p, ++k) {
          // Out-of-map samples keep their zero-initialised gradients.
          if (!bilinear_taps(locations[2 * k], locations[2 * k + 1], height, width, taps)) {
            continue;
          }
          const T a = weights[k];
          T grad_a = 0, grad_x = 0, grad_y = 0;
          for (int t = 0; t < 4; ++t) {
            if (taps.index[t] < 0) continue;
            const int64_t offset = level_offset + taps.index[t] * row;
            const T* __restrict__ v = value + offset;
            T* __restrict__ gv = grad_value + offset;
            const T scale = a * taps.weight[t];
            T dot = 0;  // <grad_out, value tap>
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < d.channels; ++c) {
              dot += g[c] * v[c];
              gv[c] += scale * g[c];
            }
            grad_a += taps.weight[t] * dot;
            grad_x += taps.dwdx[t] * dot;
            grad_y += taps.dwdy[t] * dot;
          }
          grad_weights[k] = grad_a;
          // d(pixel x)/d(loc x) = W and d(pixel y)/d(loc y) = H.
          grad_locations[2 * k] = a * grad_x * static_cast<T>(width);
          grad_locations[2 * k + 1] = a * grad_y * static_cast<T>(height);
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Dims d = dims_of(value, sampling_locations);
  at::Tensor out = at::zeros({d.batch, d.queries, d.heads * d.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(
        value.data_ptr<scalar_t>(),
        spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(),
        d);
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const Dims d = dims_of(value, sampling_locations);
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_locations = at::zeros_like(sampling_locations);
  at::Tensor grad_weights = at::zeros_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(
        value.data_ptr<scalar_t>(),
        spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(),
        attention_weights.data_ptr<scalar_t>(),
        grad_output.data_ptr<scalar_t>(),
        grad_value.data_ptr<scalar_t>(),
        grad_locations.data_ptr<scalar_t>(),
        grad_weights.data_ptr<scalar_t>(),
        d);
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace hiervl
