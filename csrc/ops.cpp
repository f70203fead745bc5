// The one place every oni op schema lives. Kernels register per device in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); oni/reference.py is the spec.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#ifndef ONI_CUDA_VERSION
#define ONI_CUDA_VERSION 0
#endif

extern "C" {
// `import oni._C` loads this library so the TORCH_LIBRARY blocks below run; the module
// itself is empty (ops are reached through torch.ops.oni, never through pybind).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "oni custom ops (registered with torch.ops.oni)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// No op has a derivative, and none runs silently on tensors that require grad (torch's own
// fallback for custom ops only warns, then gives None gradients):
// - the functional ops get torch's not-implemented kernel: their outputs carry a grad_fn
//   whose backward raises "derivative for oni::... is not implemented";
// - the in-place ops refuse such tensors at the call (a tensor written in place cannot take
//   a grad_fn when the schema returns nothing, so its old history would give wrong
//   gradients), and bump the version counter of every tensor they write, as aten's in-place
//   ops do, so autograd notices when a tensor it saved was overwritten.
namespace {

// Tensor(a!) in a schema: the op writes this argument.
bool is_written(const c10::Argument& arg) {
  return arg.alias_info() != nullptr && arg.alias_info()->isWrite();
}

void refuse_grad_in_place(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                          torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t start = stack->size() - args.size();
  if (c10::GradMode::is_enabled()) {
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& value = (*stack)[start + i];
      TORCH_CHECK(!(value.isTensor() && value.toTensor().requires_grad()), op.schema().name(),
                  ": ", args[i].name(), " requires grad, but this op writes in place and has no "
                  "derivative; call it under torch.no_grad() or on detached tensors");
    }
  }
  const at::AutoDispatchBelowAutograd below;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t start = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& value = (*stack)[start + i];
    if (is_written(args[i]) && value.isTensor()) written.push_back(value.toTensor());
  }
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

// Defines an op and gives it the autograd behaviour above, read off its schema: an op with
// an argument it writes (Tensor(a!)) is in place, any other is functional.
void define(torch::Library& m, const char* schema_text) {
  c10::FunctionSchema schema = torch::schema(schema_text);
  const std::string name = schema.name();
  const auto& args = schema.arguments();
  const bool in_place = std::any_of(args.begin(), args.end(), is_written);
  m.def(std::move(schema));
  if (in_place) {
    m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::Autograd,
                                         torch::CppFunction::makeFromBoxedFunction<
                                             &refuse_grad_in_place>()));
    m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::ADInplaceOrView,
                                         torch::CppFunction::makeFromBoxedFunction<
                                             &bump_written_versions>()));
  } else {
    m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::Autograd,
                                         torch::autograd::autogradNotImplementedFallback()));
  }
}
}  // namespace

TORCH_LIBRARY(oni, m) {
  // Layout shared by the Shapley ops. N inputs x [N, d], B references per input
  // baseline [N, B, d], P walks per input perm [N, P, L] (feature indices; the first
  // n_active[n] entries of each walk are a permutation of input n's active features, the
  // rest padding). A walk over a active features visits a - 1 interior prefixes (the empty
  // and full prefixes are the shared endpoints f(baseline) and f(x)), so the step rows are
  // ordered [n][p][b][k] with k = 1..a_n - 1, S = sum_n P * B * max(a_n - 1, 0) rows.

  // First-layer pre-activations W z + bias of every interior prefix z, by cumulative sums of
  // permuted weight columns W[:, perm] * (x - baseline)[perm]; with relu, max(0, .) of them
  // (the activation that follows, fused: one pass over [S, H] fewer). -> [S, H] of x's dtype,
  // or with out_dtype=bfloat16 (float32 x only) the float32 values rounded to bfloat16 (half
  // the bytes written, and no conversion pass before a bfloat16 model tail).
  define(m, "permutation_walk_linear(Tensor x, Tensor baseline, Tensor perm, Tensor n_active, "
           "Tensor weight, Tensor? bias, int total_steps, bool relu=False, "
           "ScalarType? out_dtype=None) -> Tensor");
  // The masked inputs z themselves (x on the prefix, baseline elsewhere). -> [S, d]
  define(m, "permutation_walk_masked(Tensor x, Tensor baseline, Tensor perm, Tensor n_active, "
           "int total_steps) -> Tensor");
  // From model outputs at every step (and at the endpoints), the explained-class value
  // (softmax probability, or the raw output) averaged over references, differenced along
  // each walk, averaged over each group of `walks_per_sample` walks (2 = antithetic pair),
  // and accumulated over samples into a per-feature mean and sum of squared deviations
  // (float64, [N, n_features] each). Deterministic: one input's walks are summed in order.
  // A feature with a non-finite contribution (NaN or infinite logits, or an overflow) gets
  // NaN in both mean and m2.
  define(m, "shapley_accumulate(Tensor step_logits, Tensor start_logits, Tensor end_logits, "
           "Tensor target, Tensor perm, Tensor n_active, int n_features, int walks_per_sample, "
           "bool softmax) -> (Tensor mean, Tensor m2)");

  // Noise solver (DESIGN.md, "The method" 4). Shannon entropy H = -sum p log p of
  // softmax(logits) per row and its gradient dH/dlogits = -p (log p + H), fused and stable
  // (log-sum-exp; p log p = 0 at p = 0; a row with a NaN or +inf logit, or all -inf, gets
  // NaN, as torch.softmax). logits [N, k] -> (H [N], grad [N, k]).
  define(m, "entropy_and_grad(Tensor logits) -> (Tensor entropy, Tensor grad)");
  // One projected ascent step on the rows where active: z = eta + step * direction, then
  // the exact Euclidean projection onto {|eta_i| <= budget_i} ∩ {||eta||_2 <= radius}
  // (KKT: eta = clip(z / (1 + lambda), -budget, budget), lambda >= 0 the smallest keeping
  // the norm <= radius). Inactive rows are returned unchanged; an active row whose z holds
  // a NaN or an infinity (no projection exists) comes back all NaN, as does one where the
  // ball binds and ||z||^2 overflows the float64 arithmetic inside (|z| beyond ~1e154; no
  // float32 input gets there). eta, direction, budget
  // [N, d]; step, radius [N] (radius may be +inf); active [N] bool. -> eta [N, d]
  // check_values: scan budget (finite, >= 0) and radius (>= 0, not NaN) and raise on the
  // first bad one. False skips the scan on CUDA, where it costs a device-to-host readback
  // (a host sync) per call; for callers that validated both once (the noise solver calls
  // this on every pass). The CPU kernel always scans: it is cheap there, and its sort of
  // the breakpoints must not see a NaN.
  define(m, "ascend_and_project(Tensor eta, Tensor direction, Tensor step, Tensor budget, "
           "Tensor radius, Tensor active, bool check_values=True) -> Tensor");

  // Shadow-model training (oni/shadows.py, precision="bf16"). One mixed-precision Adam step
  // in one pass over memory, in place: g = float32(grad_bf16) (+ weight_decay * param, L2 as
  // torch.optim.Adam), then torch.optim.Adam's update of the float32 param and moments
  // (lerp of exp_avg, bias corrections 1 - beta^step in float64, eps added after the
  // corrected square root), moments below flush_below (|exp_avg|, exp_avg_sq) set to 0 (no
  // subnormals: slow on x86), and param_bf16 = bfloat16(param) (round to nearest even).
  // param, exp_avg, exp_avg_sq float32 and param_bf16, grad_bf16 bfloat16, one shape, all
  // contiguous; step >= 1 counts this step.
  define(m, "adam_step_bf16(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
           "Tensor(d!) param_bf16, Tensor grad_bf16, int step, float lr, float beta1, "
           "float beta2, float eps, float weight_decay, float flush_below) -> ()");

  // Shadow-model training, float32 (oni/shadows.py): the first layer of K models on inputs
  // that are mostly zeros (binary tabular rows), computed from the non-zeros only. x
  // [K, B, d]; weight_t [K, d, H] is the layer's weight transposed (row j: input j's
  // fan-out); bias [K, H] optional. Zeros of x are skipped: 0 * inf contributes 0, not NaN.
  // out = bias + x @ weight_t -> [K, B, H]; each output sums its non-zeros in ascending j.
  define(m, "sparse_input_linear(Tensor x, Tensor weight_t, Tensor? bias) -> Tensor");
  // The weight gradient of that layer, out = x^T @ grad, written into out [K, d, H]
  // (contiguous; the trainer's .grad, so no fresh tensor is faulted in every step). Each
  // output sums its non-zeros in ascending b.
  define(m, "sparse_input_weight_grad(Tensor x, Tensor grad, Tensor(a!) out) -> ()");

  // Shadow-model training, precision="bf16" (oni/shadows.py): the ReLUs of the hidden layers
  // on bfloat16 activations [..., B], in place; faster on the CPU than aten's bfloat16 ops,
  // which round-trip through float32. relu_bf16_: x = max(x, 0), -0 and NaN kept (as
  // torch.relu).
  define(m, "relu_bf16_(Tensor(a!) x) -> ()");
  // The ReLU's backward fused with the preceding layer's bias gradient: grad (the gradient of
  // the ReLU's output) is zeroed in place where output (the ReLU's output) is not > 0
  // (aten's threshold_backward, !(output <= 0): a NaN output passes its gradient), then
  // bias_grad[...] = sum over the last dim of the result, accumulated in float32 and rounded
  // to bfloat16 once. grad and output [..., B], bias_grad [...]; all bfloat16, contiguous.
  define(m, "relu_backward_bf16_(Tensor(a!) grad, Tensor output, Tensor(b!) bias_grad) -> ()");

  // CUDA toolkit version the extension was compiled with (major*1000 + minor*10), 0 if none.
  m.def("cuda_version() -> int", []() -> int64_t { return ONI_CUDA_VERSION; });
}
