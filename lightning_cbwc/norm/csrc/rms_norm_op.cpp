// Dispatcher registration and autograd for the CPU RMSNorm kernels in rms_norm.cpp.
//
//   lightning_cbwc::rms_norm(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps)
//       -> Tensor
//   lightning_cbwc::zero_mean_rms_norm(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias,
//       float eps) -> Tensor          # the same forward; the backward is LayerNorm's (x zero-mean by promise)
//   lightning_cbwc::center_columns_(Tensor(a!)[] tensors, int[] dims) -> ()   # each minus its mean over dim
//   lightning_cbwc::rms_norm_backward(Tensor grad, Tensor x, int[] normalized_shape, Tensor? weight,
//       float eps, bool[3] output_mask, bool zero_mean=False) -> (Tensor, Tensor, Tensor)
//
// A separate translation unit from the kernels so that the two (each dominated by header parsing) compile in
// parallel.  The fake kernels are registered from Python (lightning_cbwc/norm/ops.py).

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace lightning_cbwc {
at::Tensor rms_norm_cpu(const at::Tensor& x, at::IntArrayRef normalized_shape,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                        double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                     at::IntArrayRef normalized_shape,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     double eps, std::array<bool, 3> mask,
                                                                     bool zero_mean);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    at::IntArrayRef normalized_shape,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, double eps);
at::Tensor centered_embedding_cpu(const at::Tensor& weight, const at::Tensor& indices);
void center_columns_cpu(at::TensorList tensors, at::IntArrayRef dims);
std::string build_info();
}  // namespace lightning_cbwc

namespace {

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ---------------------------------------------------------------------------------------------------------
// Autograd: a C++ autograd Function, so that an eager call costs one dispatcher hop and no Python.

at::Tensor call_forward(const at::Tensor& x, at::IntArrayRef ns, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lightning_cbwc::rms_norm", "")
                       .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, double)>();
  return op.call(x, ns, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad, const at::Tensor& x,
                                                             at::IntArrayRef ns,
                                                             const std::optional<at::Tensor>& weight, double eps,
                                                             std::array<bool, 3> mask, bool zero_mean) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lightning_cbwc::rms_norm_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&,
                           double, std::array<bool, 3>, bool)>();
  return op.call(grad, x, ns, weight, eps, mask, zero_mean);
}

// What both autograd Functions keep for the backward: the norm's input, its weight, the call's shape, and
// whether the backward is LayerNorm's (``zero_mean``: the input is zero-mean by promise).
void save_norm(torch::autograd::AutogradContext* ctx, const at::Tensor& normed, at::IntArrayRef ns,
               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
               bool zero_mean = false) {
  const bool has_w = present(weight);
  const bool has_b = present(bias);
  ctx->save_for_backward({normed, has_w ? *weight : at::Tensor()});
  ctx->saved_data["ns"] = ns.vec();
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_w"] = has_w;
  ctx->saved_data["has_b"] = has_b;
  ctx->saved_data["zero_mean"] = zero_mean;
  if (has_b) ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias->scalar_type());
}

// (d normed input, dweight, dbias) from the saved norm; ``first_param`` is the edge index of the weight
// (edges count only the tensor inputs that were present), ``need_dx`` whether any input before it wants a
// gradient.  Gradients not needed come back undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(torch::autograd::AutogradContext* ctx,
                                                             const at::Tensor& grad, size_t first_param,
                                                             bool need_dx) {
  const auto saved = ctx->get_saved_variables();
  const bool has_w = ctx->saved_data["has_w"].toBool();
  const bool has_b = ctx->saved_data["has_b"].toBool();
  const size_t b_edge = has_w ? first_param + 1 : first_param;
  const std::array<bool, 3> mask = {need_dx, has_w && ctx->needs_input_grad(first_param),
                                    has_b && ctx->needs_input_grad(b_edge)};
  at::Tensor dx, dw, db;
  if (grad.defined() && (mask[0] || mask[1] || mask[2])) {
    const std::vector<int64_t> ns = ctx->saved_data["ns"].toIntVector();
    const std::optional<at::Tensor> weight = has_w ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    std::tie(dx, dw, db) = call_backward(grad, saved[0], ns, weight, ctx->saved_data["eps"].toDouble(), mask,
                                         ctx->saved_data["zero_mean"].toBool());
    if (mask[2]) {
      const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
      if (db.scalar_type() != bias_dtype) db = db.to(bias_dtype);
    }
  }
  return {mask[0] ? dx : at::Tensor(), mask[1] ? dw : at::Tensor(), mask[2] ? db : at::Tensor()};
}

class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef ns,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            double eps, bool zero_mean) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = call_forward(x, ns, weight, bias, eps);
    }
    save_norm(ctx, x, ns, weight, bias, eps, zero_mean);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto [dx, dw, db] = norm_backward(ctx, grads[0], 1, ctx->needs_input_grad(0));
    return {dx, at::Tensor(), dw, db, at::Tensor(), at::Tensor()};
  }
};

bool requires_grad(const std::optional<at::Tensor>& t) { return present(t) && t->requires_grad(); }

std::tuple<at::Tensor, at::Tensor> call_add_forward(const at::Tensor& x, const at::Tensor& residual,
                                                    at::IntArrayRef ns, const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lightning_cbwc::add_rms_norm", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 at::IntArrayRef, const std::optional<at::Tensor>&,
                                                                 const std::optional<at::Tensor>&, double)>();
  return op.call(x, residual, ns, weight, bias, eps);
}

// (y, h) = (rms_norm(x + residual), x + residual).  Backward: dh = grad_h + rms_norm_backward(grad_y, h);
// x and residual both get dh.
class AddRMSNormFunction : public torch::autograd::Function<AddRMSNormFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& residual, at::IntArrayRef ns,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, double eps) {
    at::Tensor y, h;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, h) = call_add_forward(x, residual, ns, weight, bias, eps);
    }
    save_norm(ctx, h, ns, weight, bias, eps);
    return {y, h};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const bool need_dh = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    auto [dh, dw, db] = norm_backward(ctx, grads[0], 2, need_dh);  // edges: x, residual, weight, bias
    const at::Tensor& grad_h = grads[1];
    if (need_dh && grad_h.defined()) dh = dh.defined() ? dh.add_(grad_h) : grad_h.clone();
    return {ctx->needs_input_grad(0) ? dh : at::Tensor(), ctx->needs_input_grad(1) ? dh : at::Tensor(),
            at::Tensor(), dw, db, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> add_rms_norm_autograd(const at::Tensor& x, const at::Tensor& residual,
                                                         at::IntArrayRef ns,
                                                         const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& bias, double eps) {
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || residual.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_add_forward(x, residual, ns, weight, bias, eps);
  }
  auto out = AddRMSNormFunction::apply(x, residual, ns, weight, bias, eps);
  return {out[0], out[1]};
}

template <bool ZERO_MEAN>
at::Tensor rms_norm_autograd(const at::Tensor& x, at::IntArrayRef ns, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, double eps) {
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    // Nothing to differentiate (inference, frozen inputs): skip building an autograd node.
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(x, ns, weight, bias, eps);
  }
  return RMSNormFunction::apply(x, ns, weight, bias, eps, ZERO_MEAN);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightning_cbwc, m) {
  m.def("rms_norm(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def(
      "zero_mean_rms_norm(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def(
      "rms_norm_backward(Tensor grad, Tensor x, int[] normalized_shape, Tensor? weight, float eps, "
      "bool[3] output_mask, bool zero_mean=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "add_rms_norm(Tensor x, Tensor residual, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor)");
  m.def("centered_embedding(Tensor weight, Tensor indices) -> Tensor");
  m.def("center_columns_(Tensor(a!)[] tensors, int[] dims) -> ()");
  m.def("_rms_norm_build_info() -> str", &lightning_cbwc::build_info);
}

TORCH_LIBRARY_IMPL(lightning_cbwc, CPU, m) {
  m.impl("rms_norm", &lightning_cbwc::rms_norm_cpu);
  m.impl("zero_mean_rms_norm", &lightning_cbwc::rms_norm_cpu);
  m.impl("rms_norm_backward", &lightning_cbwc::rms_norm_backward_cpu);
  m.impl("add_rms_norm", &lightning_cbwc::add_rms_norm_cpu);
  m.impl("centered_embedding", &lightning_cbwc::centered_embedding_cpu);
  m.impl("center_columns_", &lightning_cbwc::center_columns_cpu);
}

TORCH_LIBRARY_IMPL(lightning_cbwc, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd<false>);
  m.impl("zero_mean_rms_norm", &rms_norm_autograd<true>);
  m.impl("add_rms_norm", &add_rms_norm_autograd);
  // Inference only (CenteredEmbedding uses it without autograd): a call that needs a gradient raises.
  m.impl("centered_embedding", torch::autograd::autogradNotImplementedFallback());
  // No double backward: differentiating through the backward raises instead of silently giving zeros.
  m.impl("rms_norm_backward", torch::autograd::autogradNotImplementedFallback());
}
