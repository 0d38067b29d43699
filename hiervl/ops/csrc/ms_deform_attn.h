// Multi-scale deformable attention kernels (declarations shared by the bindings and the
// CPU/CUDA implementations).
//
// Shapes: value (N, S, nH, Dh); spatial_shapes (nL, 2) int64 (H, W); level_start_index (nL,)
// int64; sampling_locations (N, Lq, nH, nL, nP, 2) normalised (x, y); attention_weights
// (N, Lq, nH, nL, nP); output (N, Lq, nH * Dh). All tensors contiguous and on one device;
// value, sampling_locations and attention_weights share one floating dtype.
//
// Sampling rule (identical to grid_sample(align_corners=False, padding_mode="zeros")):
// (x, y) maps to the pixel coordinate (x * W - 0.5, y * H - 0.5); the four bilinear taps
// that fall outside the map read zero.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace hiervl {

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Returns {grad_value, grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

// CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000).
int cuda_compiled_version();
#endif

}  // namespace hiervl
