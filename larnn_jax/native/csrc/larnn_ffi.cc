// XLA FFI handlers of the native LARNN layer: larnn_forward, larnn_backward (the whole sequence of
// one layer, float32 or float64) and larnn_keep_mask (dropout decisions, for tests). The order
// of the buffers is larnn_jax/native/layer.py's; every buffer's size is checked.
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>

#include "backward.h"
#include "forward.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace larnn {
namespace {

// Forward arguments (the backward pass takes them too, then kBackwardArguments).
enum ForwardArgument : int {
  kSequence, kH0, kC0, kWindowKeys, kWindowValues, kCount, kMomentSums, kKeys, kLast,
  kQueryInputKernel, kQueryBias, kGateInputKernel, kGateBias, kQueryKernel, kHiddenKernel, kAttentionKernel, kKeyKernel, kKeyBias, kValueKernel,
  kValueBias, kOutputKernel, kOutputBias, kPositions, kNorms, kRunning, kForwardArguments
};
enum BackwardArgument : int {
  kOutputs = kForwardArguments, kCells, kResidual, kDOutputs, kDCells, kDFinalKeys,
  kDFinalValues, kDFinalSums, kBackwardArguments
};
enum ForwardResult : int {
  kROutputs, kRCells, kRFinalKeys, kRFinalValues, kRFinalSums, kRRunning, kRResidual,
  kForwardResults
};
enum BackwardResult : int {
  kRQuery, kRGates, kRAttention, kREntries, kRActivated, kRAttended, kRDropped, kRHidden,
  kRNorms, kRPositions, kRH0, kRC0, kRWindowKeys, kRWindowValues, kRMomentSums, kRScratch,
  kBackwardResults
};

struct Call {
  Shape shape;
  Options options;
};

ffi::ErrorOr<int64_t> int_attribute(const ffi::Dictionary& attrs, const char* name) {
  auto value = attrs.get<int64_t>(name);
  if (!value.has_value()) {
    return ffi::Unexpected(
        ffi::Error::InvalidArgument(std::string("missing integer attribute ") + name));
  }
  return *value;
}

ffi::ErrorOr<Call> decode_call(const ffi::Dictionary& attrs, const ffi::AnyBuffer& sequence,
                               bool training_needs_residuals) {
  Call call{};
  int64_t values[10];
  const char* names[10] = {"num_heads", "window_size", "training", "positional", "activation",
                           "save_residuals", "kv_levels", "attention_levels", "output_levels",
                           "threads"};
  for (int i = 0; i < 10; ++i) {
    auto value = int_attribute(attrs, names[i]);
    if (!value.has_value()) return ffi::Unexpected(value.error());
    values[i] = *value;
  }
  const auto dims = sequence.dimensions();
  if (dims.size() != 3) return ffi::Unexpected(ffi::Error::InvalidArgument("sequence: rank"));
  auto features = int_attribute(attrs, "features");
  if (!features.has_value()) return ffi::Unexpected(features.error());
  call.shape = Shape{dims[1], dims[0], *features, values[0], values[1], dims[2]};
  call.options.training = values[2] != 0;
  call.options.positional = values[3] != 0;
  call.options.activation = values[4] != 0;
  call.options.save_residuals = training_needs_residuals || values[5] != 0;
  const bool dropping = call.options.training;
  call.options.kv_levels = dropping ? uint32_t(values[6]) : kDropoutLevels;
  call.options.attention_levels = dropping ? uint32_t(values[7]) : kDropoutLevels;
  call.options.output_levels = dropping ? uint32_t(values[8]) : kDropoutLevels;
  call.options.threads = int(values[9]);
  const Shape& s = call.shape;
  if (s.num_heads < 1 || s.features < 1 || s.features % s.num_heads != 0 ||
      s.window_size < 1 || s.batch < 1 || s.steps < 1 || s.inputs < 1) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("inconsistent LARNN shape attributes"));
  }
  return call;
}

// Checks the element type and count of a buffer.
ffi::Error check(const ffi::AnyBuffer& buffer, ffi::DataType type, int64_t elements,
                 const char* name) {
  if (buffer.element_type() != type) {
    return ffi::Error::InvalidArgument(std::string(name) + ": unexpected element type");
  }
  if (int64_t(buffer.element_count()) != elements) {
    return ffi::Error::InvalidArgument(std::string(name) + ": expected " +
                                       std::to_string(elements) + " elements, got " +
                                       std::to_string(buffer.element_count()));
  }
  return ffi::Error::Success();
}

template <typename T>
struct Sizes {
  int64_t B, T_, H, k, S;
  Sizes(const Shape& s, const Options& o)
      : B(s.batch), T_(s.steps), H(s.features), k(s.window_size), S(o.carries_moments() ? 4 : 0) {}
};

template <typename T>
constexpr ffi::DataType float_type() {
  return sizeof(T) == 4 ? ffi::DataType::F32 : ffi::DataType::F64;
}

// Decodes and checks the forward arguments into Inputs.
template <typename T>
ffi::ErrorOr<Inputs<T>> decode_inputs(const ffi::RemainingArgs& args, const Call& call) {
  const Sizes<T> z(call.shape, call.options);
  const int64_t B = z.B, Ts = z.T_, H = z.H, k = z.k, D = call.shape.inputs;
  struct Expect {
    int index;
    ffi::DataType type;
    int64_t elements;
    const char* name;
  };
  const ffi::DataType F = float_type<T>();
  const Expect expected[] = {
      {kSequence, F, Ts * B * D, "sequence"},
      {kH0, F, B * H, "h0"},
      {kC0, F, B * H, "c0"},
      {kWindowKeys, F, B * (k - 1) * H, "window keys"},
      {kWindowValues, F, B * (k - 1) * H, "window values"},
      {kCount, ffi::DataType::S32, B, "window count"},
      {kMomentSums, F, B * z.S * H, "moment sums"},
      {kKeys, ffi::DataType::U32, (Ts + 1) * 3 * 2, "dropout keys"},
      {kLast, ffi::DataType::S32, B, "last steps"},
      {kQueryInputKernel, F, D * H, "query input kernel"},
      {kQueryBias, F, H, "query bias"},
      {kGateInputKernel, F, D * 4 * H, "gate input kernel"},
      {kGateBias, F, 4 * H, "gate bias"},
      {kQueryKernel, F, H * H, "query kernel"},
      {kHiddenKernel, F, H * 4 * H, "hidden kernel"},
      {kAttentionKernel, F, H * 4 * H, "attention kernel"},
      {kKeyKernel, F, H * H, "key kernel"},
      {kKeyBias, F, H, "key bias"},
      {kValueKernel, F, H * H, "value kernel"},
      {kValueBias, F, H, "value bias"},
      {kOutputKernel, F, H * H, "output kernel"},
      {kOutputBias, F, H, "output bias"},
      {kPositions, F, 2 * k * H, "positions"},
      {kNorms, F, NormOffsets(H).size, "norms"},
      {kRunning, F, RunningOffsets(H).size, "running averages"},
  };
  const void* data[kForwardArguments];
  for (const Expect& e : expected) {
    auto buffer = args.get<ffi::AnyBuffer>(e.index);
    if (!buffer.has_value()) return ffi::Unexpected(buffer.error());
    ffi::Error error = check(*buffer, e.type, e.elements, e.name);
    if (error.failure()) return ffi::Unexpected(error);
    data[e.index] = buffer->untyped_data();
  }
  auto f = [&](int i) { return static_cast<const T*>(data[i]); };
  Inputs<T> in;
  in.sequence = f(kSequence);
  in.h0 = f(kH0);
  in.c0 = f(kC0);
  in.window_keys = f(kWindowKeys);
  in.window_values = f(kWindowValues);
  in.count = static_cast<const int32_t*>(data[kCount]);
  in.moment_sums = f(kMomentSums);
  in.keys = static_cast<const uint32_t*>(data[kKeys]);
  in.last = static_cast<const int32_t*>(data[kLast]);
  in.query_input_kernel = f(kQueryInputKernel);
  in.query_bias = f(kQueryBias);
  in.gate_input_kernel = f(kGateInputKernel);
  in.gate_bias = f(kGateBias);
  in.query_kernel = f(kQueryKernel);
  in.hidden_kernel = f(kHiddenKernel);
  in.attention_kernel = f(kAttentionKernel);
  in.key_kernel = f(kKeyKernel);
  in.key_bias = f(kKeyBias);
  in.value_kernel = f(kValueKernel);
  in.value_bias = f(kValueBias);
  in.output_kernel = f(kOutputKernel);
  in.output_bias = f(kOutputBias);
  in.positions = f(kPositions);
  in.norms = f(kNorms);
  in.running = f(kRunning);
  return in;
}

// Decodes buffers [first, first + count) of `list` (arguments or results), checking sizes.
template <typename T, typename List, typename Pointer>
ffi::Error decode_list(const List& list, const int64_t* sizes, const char* const* names,
                       int count, Pointer* out) {
  for (int i = 0; i < count; ++i) {
    auto buffer = list.template get<ffi::AnyBuffer>(i);
    if (!buffer.has_value()) return buffer.error();
    if constexpr (std::is_same_v<List, ffi::RemainingRets>) {
      ffi::Error error = check(**buffer, float_type<T>(), sizes[i], names[i]);
      if (error.failure()) return error;
      out[i] = static_cast<Pointer>((*buffer)->untyped_data());
    } else {
      ffi::Error error = check(*buffer, float_type<T>(), sizes[i], names[i]);
      if (error.failure()) return error;
      out[i] = static_cast<Pointer>(buffer->untyped_data());
    }
  }
  return ffi::Error::Success();
}

// How many threads a call uses: what the caller asked for, at most one per 16 samples (a function
// of the call alone, so that its results are too: team.h).
int team_size(const Call& call) {
  int64_t wanted = std::max(1, call.options.threads);
  wanted = std::min<int64_t>(wanted, (call.shape.batch + 15) / 16);
  return int(std::max<int64_t>(1, wanted));
}

template <typename T>
ffi::Error forward(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
                   const Call& call) {
  auto inputs = decode_inputs<T>(args, call);
  if (!inputs.has_value()) return inputs.error();
  const Model<T> model(call.shape, call.options, *inputs);
  const Layout<T>& L = model.layout;
  const int64_t sizes[kForwardResults] = {
      L.T_ * L.B * L.H, L.T_ * L.B * L.H, L.B * (L.k - 1) * L.H, L.B * (L.k - 1) * L.H,
      L.B * L.S * L.H, RunningOffsets(L.H).size, L.residual(call.options.save_residuals).size};
  const char* names[kForwardResults] = {"outputs", "cells", "final keys", "final values",
                                        "final sums", "running averages", "residual"};
  T* out[kForwardResults];
  ffi::Error error = decode_list<T>(rets, sizes, names, kForwardResults, out);
  if (error.failure()) return error;
  ForwardOutputs<T> outputs{out[kROutputs], out[kRCells], out[kRFinalKeys], out[kRFinalValues],
                            out[kRFinalSums], out[kRRunning], out[kRResidual]};
  std::unique_ptr<Forward<T>> pass;
  run_team(team_size(call), [&](int member, int members, Barrier& barrier) {
    if (member == 0) pass = std::make_unique<Forward<T>>(model, outputs, members, barrier);
    barrier.wait();
    pass->run(member);
  });
  return ffi::Error::Success();
}

template <typename T>
ffi::Error backward(const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
                    const Call& call) {
  auto inputs = decode_inputs<T>(args, call);
  if (!inputs.has_value()) return inputs.error();
  const Model<T> model(call.shape, call.options, *inputs);
  const Layout<T>& L = model.layout;
  const int64_t rows = L.T_ * L.B;
  const int64_t arg_sizes[kBackwardArguments - kForwardArguments] = {
      rows * L.H, rows * L.H, L.residual(true).size, rows * L.H, rows * L.H,
      L.B * (L.k - 1) * L.H, L.B * (L.k - 1) * L.H, L.B * L.S * L.H};
  const char* arg_names[kBackwardArguments - kForwardArguments] = {
      "outputs", "cells", "residual", "d outputs", "d cells", "d final keys", "d final values",
      "d final sums"};
  const T* a[kBackwardArguments - kForwardArguments];
  for (int i = 0; i < kBackwardArguments - kForwardArguments; ++i) {
    auto buffer = args.get<ffi::AnyBuffer>(kForwardArguments + i);
    if (!buffer.has_value()) return buffer.error();
    ffi::Error error = check(*buffer, float_type<T>(), arg_sizes[i], arg_names[i]);
    if (error.failure()) return error;
    a[i] = static_cast<const T*>(buffer->untyped_data());
  }
  const int64_t sizes[kBackwardResults] = {
      rows * L.H, rows * 4 * L.H, rows * L.H, rows * 2 * L.H, rows * L.H, rows * L.H,
      rows * L.H, rows * L.H, NormOffsets(L.H).size, 2 * L.k * L.H, L.B * L.H, L.B * L.H,
      L.B * (L.k - 1) * L.H, L.B * (L.k - 1) * L.H, L.B * L.S * L.H,
      L.backward_scratch_size()};
  const char* names[kBackwardResults] = {
      "d query", "d gates", "d attention", "d entries", "activated", "attended", "dropped",
      "hidden", "d norms", "d positions", "d h0", "d c0", "d window keys", "d window values",
      "d moment sums", "scratch"};
  T* out[kBackwardResults];
  ffi::Error error = decode_list<T>(rets, sizes, names, kBackwardResults, out);
  if (error.failure()) return error;
  const ForwardOutputs<T> forward{const_cast<T*>(a[0]), const_cast<T*>(a[1]), nullptr, nullptr,
                                  nullptr, nullptr, const_cast<T*>(a[2])};
  const Cotangents<T> d{a[3], a[4], a[5], a[6], a[7]};
  const BackwardOutputs<T> outputs{
      out[kRQuery], out[kRGates], out[kRAttention], out[kREntries], out[kRActivated],
      out[kRAttended], out[kRDropped], out[kRHidden], out[kRNorms], out[kRPositions], out[kRH0],
      out[kRC0], out[kRWindowKeys], out[kRWindowValues], out[kRMomentSums],
      out[kRScratch]};
  std::unique_ptr<Backward<T>> pass;
  run_team(team_size(call), [&](int member, int members, Barrier& barrier) {
    if (member == 0) {
      pass = std::make_unique<Backward<T>>(model, forward, d, outputs, members, barrier);
    }
    barrier.wait();
    pass->run(member);
  });
  return ffi::Error::Success();
}

ffi::Error forward_handler(ffi::RemainingArgs args, ffi::RemainingRets rets,
                           ffi::Dictionary attrs) {
  auto sequence = args.get<ffi::AnyBuffer>(kSequence);
  if (!sequence.has_value()) return sequence.error();
  auto call = decode_call(attrs, *sequence, false);
  if (!call.has_value()) return call.error();
  if (sequence->element_type() == ffi::DataType::F32) return forward<float>(args, rets, *call);
  if (sequence->element_type() == ffi::DataType::F64) return forward<double>(args, rets, *call);
  return ffi::Error::InvalidArgument("the native LARNN step takes float32 or float64");
}

ffi::Error backward_handler(ffi::RemainingArgs args, ffi::RemainingRets rets,
                            ffi::Dictionary attrs) {
  auto sequence = args.get<ffi::AnyBuffer>(kSequence);
  if (!sequence.has_value()) return sequence.error();
  auto call = decode_call(attrs, *sequence, true);
  if (!call.has_value()) return call.error();
  if (sequence->element_type() == ffi::DataType::F32) return backward<float>(args, rets, *call);
  if (sequence->element_type() == ffi::DataType::F64) {
    return backward<double>(args, rets, *call);
  }
  return ffi::Error::InvalidArgument("the native LARNN step takes float32 or float64");
}

// keep (n,) uint8: dropout_keep_mask(key, rate, (n,)) with levels = round((1 - rate) 2^16).
ffi::Error keep_mask_handler(ffi::Buffer<ffi::DataType::U32> key,
                             ffi::ResultBuffer<ffi::DataType::U8> keep, int64_t levels) {
  if (key.element_count() != 2) return ffi::Error::InvalidArgument("key: expected 2 words");
  const int64_t n = int64_t(keep->element_count());
  Array<uint32_t> words(n / 2 + 2 * kLanes<uint32_t>);
  const uint16_t* halves =
      random_halves(RandomKey{key.typed_data()[0], key.typed_data()[1]}, 0, n, words.data());
  for (int64_t i = 0; i < n; ++i) keep->typed_data()[i] = halves[i] < levels;
  return ffi::Error::Success();
}

}  // namespace
}  // namespace larnn

XLA_FFI_DEFINE_HANDLER_SYMBOL(larnn_forward, larnn::forward_handler,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attrs<ffi::Dictionary>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(larnn_backward, larnn::backward_handler,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attrs<ffi::Dictionary>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(larnn_keep_mask, larnn::keep_mask_handler,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::DataType::U32>>()
                                  .Ret<ffi::Buffer<ffi::DataType::U8>>()
                                  .Attr<int64_t>("levels"));

// Sizes of the buffers whose layout is internal, for the Python side (in elements).
extern "C" int64_t larnn_residual_size(int64_t batch, int64_t steps, int64_t features,
                                       int64_t num_heads, int64_t window_size,
                                       int64_t double_precision, int64_t positional,
                                       int64_t activation, int64_t full) {
  const larnn::Shape shape{batch, steps, features, num_heads, window_size};
  larnn::Options options{};
  options.positional = positional != 0;
  options.activation = activation != 0;
  if (double_precision) return larnn::Layout<double>(shape, options).residual(full != 0).size;
  return larnn::Layout<float>(shape, options).residual(full != 0).size;
}

extern "C" int64_t larnn_backward_scratch_size(int64_t batch, int64_t steps, int64_t features,
                                               int64_t num_heads, int64_t window_size,
                                               int64_t double_precision) {
  const larnn::Shape shape{batch, steps, features, num_heads, window_size};
  const larnn::Options options{};
  if (double_precision) return larnn::Layout<double>(shape, options).backward_scratch_size();
  return larnn::Layout<float>(shape, options).backward_scratch_size();
}

// Thread seconds per profile section (profile.h, in Section order) since the last read; resets.
extern "C" int64_t larnn_profile_read(double* seconds, int64_t capacity) {
  for (int64_t i = 0; i < larnn::kSections && i < capacity; ++i) {
    seconds[i] = 1e-9 * double(larnn::profile_nanoseconds()[i].exchange(0));
  }
  return larnn::kSections;
}
