// Python bindings of hiervl._C: input validation and device dispatch for MSDeformAttn.
#include <torch/extension.h>

#include "ms_deform_attn.h"

namespace hiervl {
namespace {

void check_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, nH, Dh), got ", value.sizes());
  TORCH_CHECK(
      sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
      "ms_deform_attn: sampling_locations must be (N, Lq, nH, nL, nP, 2), got ",
      sampling_locations.sizes());
  const auto n = value.size(0), n_heads = value.size(2);
  const auto n_queries = sampling_locations.size(1), n_levels = sampling_locations.size(3),
             n_points = sampling_locations.size(4);
  TORCH_CHECK(
      sampling_locations.size(0) == n && sampling_locations.size(2) == n_heads,
      "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
      " do not match value ", value.sizes(), " in batch or heads");
  const std::vector<int64_t> weights_shape{n, n_queries, n_heads, n_levels, n_points};
  TORCH_CHECK(
      attention_weights.sizes() == at::IntArrayRef(weights_shape),
      "ms_deform_attn: attention_weights must be (N, Lq, nH, nL, nP) = ",
      at::IntArrayRef(weights_shape), ", got ", attention_weights.sizes());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(0) == n_levels && spatial_shapes.size(1) == 2,
      "ms_deform_attn: spatial_shapes must be (nL, 2) with nL = ", n_levels, ", got ",
      spatial_shapes.sizes());
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == n_levels,
      "ms_deform_attn: level_start_index must be (nL,) with nL = ", n_levels, ", got ",
      level_start_index.sizes());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(
      sampling_locations.scalar_type() == value.scalar_type() &&
          attention_weights.scalar_type() == value.scalar_type(),
      "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, got ",
      value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
      attention_weights.scalar_type());
  // Level geometry is checked on the host (nL values) so that no kernel can read outside value.
  const at::Tensor shapes_cpu = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts_cpu = level_start_index.to(at::kCPU).contiguous();
  const int64_t* shape = shapes_cpu.data_ptr<int64_t>();
  const int64_t* start = starts_cpu.data_ptr<int64_t>();
  int64_t expected_start = 0;
  for (int64_t l = 0; l < n_levels; ++l) {
    TORCH_CHECK(
        shape[2 * l] > 0 && shape[2 * l + 1] > 0, "ms_deform_attn: level ", l, " has shape (",
        shape[2 * l], ", ", shape[2 * l + 1], ")");
    TORCH_CHECK(
        start[l] == expected_start, "ms_deform_attn: level_start_index[", l, "] = ", start[l],
        " but the levels before it cover ", expected_start, " positions");
    expected_start += shape[2 * l] * shape[2 * l + 1];
  }
  TORCH_CHECK(
      expected_start == value.size(1), "ms_deform_attn: spatial_shapes cover ", expected_start,
      " positions but value has S = ", value.size(1));
  for (const at::Tensor* t :
       {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: all inputs must be contiguous");
    TORCH_CHECK(
        t->device() == value.device(), "ms_deform_attn: all inputs must be on ", value.device(),
        ", got one on ", t->device());
  }
}

at::Tensor forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_forward_cuda(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
#else
    TORCH_CHECK(false, "ms_deform_attn: hiervl._C was built without CUDA (see INSTALL.md)");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_forward_cpu(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

std::vector<at::Tensor> backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const std::vector<int64_t> out_shape{
      value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)};
  TORCH_CHECK(
      grad_output.sizes() == at::IntArrayRef(out_shape) && grad_output.is_contiguous() &&
          grad_output.scalar_type() == value.scalar_type() &&
          grad_output.device() == value.device(),
      "ms_deform_attn: grad_output must be a contiguous ", value.scalar_type(), " tensor of shape ",
      at::IntArrayRef(out_shape), " on ", value.device(), ", got ", grad_output.sizes(), " ",
      grad_output.scalar_type());
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_backward_cuda(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_output);
#else
    TORCH_CHECK(false, "ms_deform_attn: hiervl._C was built without CUDA (see INSTALL.md)");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_backward_cpu(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output);
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_version() {
#ifdef WITH_CUDA
  const int v = cuda_compiled_version();
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#else
  return "";
#endif
}

}  // namespace
}  // namespace hiervl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "HierVL compiled ops: multi-scale deformable attention (CPU and, if built, CUDA)";
  m.def("ms_deform_attn_forward", &hiervl::forward, "MSDeformAttn forward -> (N, Lq, nH*Dh)");
  m.def(
      "ms_deform_attn_backward", &hiervl::backward,
      "MSDeformAttn backward -> [grad_value, grad_sampling_locations, grad_attention_weights]");
  m.def("with_cuda", &hiervl::with_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_version", &hiervl::cuda_version, "CUDA version of the compiled kernels ('' if none)");
}
