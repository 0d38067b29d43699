// CUDA kernels of multi-scale deformable attention (float64, float32, float16, bfloat16).
//
// One warp per (batch, query, head): lanes cover the head's channels (in chunks of 32), so
// every tap of a value row is one coalesced read. All arithmetic is in at::opmath_type
// (float for half/bfloat16). In the backward, grad_value is scattered with atomics into a
// buffer of that type (cast back at the end); the location / weight gradients of a sample
// are reduced across the warp with shuffles and written by lane 0 (each warp owns its
// samples, so those need no atomics).
// Only c10/ATen headers that need nothing beyond the CUDA runtime (ATen/cuda/CUDAContext.h
// would pull in cuBLAS/cuSPARSE headers, absent from minimal toolkits).
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ms_deform_attn.h"

namespace hiervl {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;

struct Dims {
  int64_t batch, positions, heads, channels, queries, levels, points;
};

// Same rule as the CPU kernel and grid_sample(align_corners=False, zeros): see the header.
template <typename T>
struct Taps {
  int64_t index[4];  // position inside the level, -1 outside the map
  T weight[4];
  T dwdx[4];
  T dwdy[4];
};

template <typename T>
__device__ __forceinline__ bool bilinear_taps(
    T loc_x, T loc_y, int64_t height, int64_t width, Taps<T>& taps) {
  const T x = loc_x * static_cast<T>(width) - T(0.5);
  const T y = loc_y * static_cast<T>(height) - T(0.5);
  if (!(x > T(-1) && y > T(-1) && x < static_cast<T>(width) && y < static_cast<T>(height))) {
    return false;
  }
  const T x0f = floor(x), y0f = floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  const T lx = x - x0f, ly = y - y0f;
  const T hx = T(1) - lx, hy = T(1) - ly;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < width;
  const bool y0_in = y0 >= 0, y1_in = y0 + 1 < height;
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

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ locations,
    const scalar_t* __restrict__ weights,
    scalar_t* __restrict__ out,
    const Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nqh = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (nqh >= d.batch * d.queries * d.heads) return;  // uniform across the warp
  const int lane = threadIdx.x % kWarp;
  const int64_t h = nqh % d.heads;
  const int64_t n = nqh / (d.queries * d.heads);
  const int64_t row = d.heads * d.channels;
  const scalar_t* value_nh = value + n * d.positions * row + h * d.channels;
  Taps<acc_t> taps;
  for (int64_t c0 = 0; c0 < d.channels; c0 += kWarp) {
    const int64_t c = c0 + lane;
    const bool active = c < d.channels;
    acc_t acc = 0;
    int64_t k = nqh * d.levels * d.points;
    for (int64_t l = 0; l < d.levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const scalar_t* value_l = value_nh + starts[l] * row;
      for (int64_t p = 0; p < d.points; ++p, ++k) {
        const acc_t lx = static_cast<acc_t>(locations[2 * k]);
        const acc_t ly = static_cast<acc_t>(locations[2 * k + 1]);
        if (!active || !bilinear_taps(lx, ly, height, width, taps)) continue;
        const acc_t a = static_cast<acc_t>(weights[k]);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          if (taps.index[t] < 0) continue;
          acc += a * taps.weight[t] * static_cast<acc_t>(value_l[taps.index[t] * row + c]);
        }
      }
    }
    if (active) out[nqh * d.channels + c] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ locations,
    const scalar_t* __restrict__ weights,
    const scalar_t* __restrict__ grad_out,
    at::opmath_type<scalar_t>* __restrict__ grad_value,  // zero-initialised
    at::opmath_type<scalar_t>* __restrict__ grad_locations,  // zero-initialised
    at::opmath_type<scalar_t>* __restrict__ grad_weights,  // zero-initialised
    const Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nqh = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (nqh >= d.batch * d.queries * d.heads) return;  // uniform across the warp
  const int lane = threadIdx.x % kWarp;
  const int64_t h = nqh % d.heads;
  const int64_t n = nqh / (d.queries * d.heads);
  const int64_t row = d.heads * d.channels;
  const int64_t nh_offset = n * d.positions * row + h * d.channels;
  Taps<acc_t> taps;
  for (int64_t c0 = 0; c0 < d.channels; c0 += kWarp) {
    const int64_t c = c0 + lane;
    const bool active = c < d.channels;
    const acc_t g = active ? static_cast<acc_t>(grad_out[nqh * d.channels + c]) : acc_t(0);
    int64_t k = nqh * d.levels * d.points;
    for (int64_t l = 0; l < d.levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const int64_t level_offset = nh_offset + starts[l] * row;
      for (int64_t p = 0; p < d.points; ++p, ++k) {
        const acc_t lx = static_cast<acc_t>(locations[2 * k]);
        const acc_t ly = static_cast<acc_t>(locations[2 * k + 1]);
        // Same outcome on every lane, so the shuffles below stay warp-uniform.
        if (!bilinear_taps(lx, ly, height, width, taps)) continue;
        const acc_t a = static_cast<acc_t>(weights[k]);
        acc_t grad_a = 0, grad_x = 0, grad_y = 0;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          if (taps.index[t] < 0 || !active) continue;
          const int64_t offset = level_offset + taps.index[t] * row + c;
          const acc_t dot = g * static_cast<acc_t>(value[offset]);
          grad_a += taps.weight[t] * dot;
          grad_x += taps.dwdx[t] * dot;
          grad_y += taps.dwdy[t] * dot;
          gpuAtomicAdd(grad_value + offset, a * taps.weight[t] * g);
        }
        grad_a = warp_sum(grad_a);
        grad_x = warp_sum(grad_x);
        grad_y = warp_sum(grad_y);
        if (lane == 0) {
          grad_weights[k] += grad_a;
          grad_locations[2 * k] += a * grad_x * static_cast<acc_t>(width);
          grad_locations[2 * k + 1] += a * grad_y * static_cast<acc_t>(height);
        }
      }
    }
  }
}

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

int64_t num_blocks(const Dims& d) {
  const int64_t warps = d.batch * d.queries * d.heads;
  return (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
}

}  // namespace

int cuda_compiled_version() {
  return CUDART_VERSION;
}

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims d = dims_of(value, sampling_locations);
  at::Tensor out = at::empty({d.batch, d.queries, d.heads * d.channels}, value.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        forward_kernel<scalar_t><<<num_blocks(d), kWarp * kWarpsPerBlock, 0, stream>>>(
            value.data_ptr<scalar_t>(),
            spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(),
            sampling_locations.data_ptr<scalar_t>(),
            attention_weights.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(),
            d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Dims d = dims_of(value, sampling_locations);
  const auto acc_options = value.options().dtype(at::toOpMathType(value.scalar_type()));
  at::Tensor grad_value = at::zeros(value.sizes(), acc_options);
  at::Tensor grad_locations = at::zeros(sampling_locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(attention_weights.sizes(), acc_options);
  if (grad_output.numel() > 0 && value.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t><<<num_blocks(d), kWarp * kWarpsPerBlock, 0, stream>>>(
              value.data_ptr<scalar_t>(),
              spatial_shapes.data_ptr<int64_t>(),
              level_start_index.data_ptr<int64_t>(),
              sampling_locations.data_ptr<scalar_t>(),
              attention_weights.data_ptr<scalar_t>(),
              grad_output.data_ptr<scalar_t>(),
              grad_value.data_ptr<acc_t>(),
              grad_locations.data_ptr<acc_t>(),
              grad_weights.data_ptr<acc_t>(),
              d);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  const auto dtype = value.scalar_type();
  return {grad_value.to(dtype), grad_locations.to(dtype), grad_weights.to(dtype)};
}

}  // namespace hiervl
