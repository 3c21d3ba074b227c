// The N-API binding: marshals JavaScript values to core types and back, nothing more. The
// TypeScript layer (lib/) validates arguments first and gives the friendlier errors; checks here
// are the last line, so bad input from any caller becomes a JavaScript Error, never a crash.
// Reads resolve their promise through a thread-safe function called once the device queue has
// reached them, so `await t.toArray()` never blocks the event loop.
#include <napi.h>

#include <climits>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <future>
#include <memory>
#include <string>

#include "native/core/error.h"
#include "native/core/runtime.h"
#include "native/cpu/isa.h"
#include "native/cpu/probe.h"
#include "native/ops/ops.h"
#ifdef TUNEKIT_WITH_CUDA
#include "native/cuda/device.h"
#endif

namespace {

using tk::DType;
using tk::Device;
using tk::DeviceType;
using tk::TensorPtr;

// Runs fn, turning core errors into JavaScript Errors.
template <typename Fn>
auto guarded(const Napi::Env& env, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
}

DType arg_dtype(const Napi::Value& v) {
  if (!v.IsString()) tk::fail("dtype must be a string: 'f32', 'bf16', 'f16', 'i32' or 'u8'");
  std::string s = v.As<Napi::String>();
  DType t;
  if (!tk::parse_dtype(s, &t)) tk::fail("unknown dtype '", s, "': use 'f32', 'bf16', 'f16', 'i32' or 'u8'");
  return t;
}

Device arg_device(const Napi::Value& v) {
  if (!v.IsString()) tk::fail("device must be a string: 'cpu', 'cuda' or 'cuda:N'");
  std::string s = v.As<Napi::String>();
  if (s == "cpu") return Device{DeviceType::CPU, 0};
  if (s == "cuda") return Device{DeviceType::CUDA, 0};
  if (s == "cuda-standin") return Device{DeviceType::CPU, tk::kCudaStandinIndex};
  if (s.rfind("cuda:", 0) == 0 && s.size() > 5 && s.size() < 8 &&
      s.find_first_not_of("0123456789", 5) == std::string::npos)
    return Device{DeviceType::CUDA, std::stoi(s.substr(5))};
  tk::fail("unknown device '", s, "': use 'cpu', 'cuda' or 'cuda:N'");
}

int64_t arg_int(const Napi::Value& v, const char* what) {
  if (!v.IsNumber()) tk::fail(what, " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || std::floor(d) != d || std::fabs(d) > 9007199254740991.0)
    tk::fail(what, " must be an integer, got ", d);
  return int64_t(d);
}

double arg_number(const Napi::Value& v, const char* what) {
  if (!v.IsNumber()) tk::fail(what, " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

std::vector<int64_t> arg_shape(const Napi::Value& v) {
  if (!v.IsArray()) tk::fail("shape must be an array of non-negative integers");
  auto arr = v.As<Napi::Array>();
  std::vector<int64_t> shape;
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    int64_t d = arg_int(arr.Get(i), "shape entry");
    if (d < 0) tk::fail("shape entries must be non-negative, got ", d);
    shape.push_back(d);
  }
  return shape;
}

std::vector<int> arg_ints(const Napi::Value& v, const char* what) {
  if (!v.IsArray()) tk::fail(what, " must be an array of integers");
  auto arr = v.As<Napi::Array>();
  std::vector<int> out;
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    int64_t x = arg_int(arr.Get(i), what);
    if (x < -64 || x > 64) tk::fail(what, " entry ", x, " is out of range");
    out.push_back(int(x));
  }
  return out;
}

Napi::Array shape_to_js(Napi::Env env, const std::vector<int64_t>& shape) {
  Napi::Array a = Napi::Array::New(env, shape.size());
  for (size_t i = 0; i < shape.size(); ++i) a.Set(uint32_t(i), Napi::Number::New(env, double(shape[i])));
  return a;
}

// ---- NativeTensor --------------------------------------------------------------------------------

class NativeTensor : public Napi::ObjectWrap<NativeTensor> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeTensor",
                       {
                           InstanceAccessor<&NativeTensor::Shape>("shape"),
                           InstanceAccessor<&NativeTensor::DTypeName>("dtype"),
                           InstanceAccessor<&NativeTensor::DeviceName>("device"),
                           InstanceAccessor<&NativeTensor::Disposed>("disposed"),
                           InstanceMethod<&NativeTensor::Read>("read"),
                           InstanceMethod<&NativeTensor::ReadSync>("readSync"),
                           InstanceMethod<&NativeTensor::Dispose>("dispose"),
                       });
  }

  explicit NativeTensor(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeTensor>(info) {
    if (info.Length() != 1 || !info[0].IsExternal())
      throw Napi::TypeError::New(info.Env(), "NativeTensor is created by tunekit ops, not by `new`");
    tensor_.reset(info[0].As<Napi::External<tk::Tensor>>().Data());
  }

  static Napi::Object Wrap(Napi::Env env, TensorPtr t);
  static tk::Tensor& From(const Napi::Value& v, const char* what);

 private:
  tk::Tensor& live(Napi::Env env) {
    if (!tensor_) throw Napi::Error::New(env, "tensor has been disposed");
    return *tensor_;
  }
  Napi::Value Shape(const Napi::CallbackInfo& info) { return shape_to_js(info.Env(), live(info.Env()).shape()); }
  Napi::Value DTypeName(const Napi::CallbackInfo& info) {
    return Napi::String::New(info.Env(), tk::dtype_name(live(info.Env()).dtype()));
  }
  Napi::Value DeviceName(const Napi::CallbackInfo& info) {
    return Napi::String::New(info.Env(), live(info.Env()).device().name());
  }
  Napi::Value Disposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !tensor_); }
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value ReadSync(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<uint8_t> bytes = guarded(env, [&] { return tk::ops::read_sync(live(env)); });
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, bytes.size());
    if (!bytes.empty()) std::memcpy(ab.Data(), bytes.data(), bytes.size());
    return ab;
  }
  // Dropping the tensor enqueues its storage's release behind all work already queued.
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    tensor_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<tk::Tensor> tensor_;
};

struct AddonData {
  Napi::FunctionReference tensor_ctor;
};

Napi::Object NativeTensor::Wrap(Napi::Env env, TensorPtr t) {
  auto* data = env.GetInstanceData<AddonData>();
  tk::Tensor* raw = t.release();
  try {
    return data->tensor_ctor.New({Napi::External<tk::Tensor>::New(env, raw)});
  } catch (...) {
    delete raw;
    throw;
  }
}

tk::Tensor& NativeTensor::From(const Napi::Value& v, const char* what) {
  Napi::Env env = v.Env();
  auto* data = env.GetInstanceData<AddonData>();
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(data->tensor_ctor.Value()))
    throw Napi::TypeError::New(env, std::string(what) + " must be a tunekit tensor");
  return ObjectWrap<NativeTensor>::Unwrap(v.As<Napi::Object>())->live(env);
}

// ---- asynchronous reads --------------------------------------------------------------------------

struct ReadJob {
  Napi::Promise::Deferred deferred;
  std::shared_ptr<std::vector<uint8_t>> bytes;
  std::string error;
};

void resolve_read(Napi::Env env, Napi::Function, std::nullptr_t*, ReadJob* job) {
  std::unique_ptr<ReadJob> owned(job);
  if (env == nullptr) return;  // environment is shutting down
  if (!job->error.empty()) {
    job->deferred.Reject(Napi::Error::New(env, job->error).Value());
    return;
  }
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, job->bytes->size());
  if (!job->bytes->empty()) std::memcpy(ab.Data(), job->bytes->data(), job->bytes->size());
  job->deferred.Resolve(ab);
}

using ReadTsfn = Napi::TypedThreadSafeFunction<std::nullptr_t, ReadJob, resolve_read>;

Napi::Value NativeTensor::Read(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  tk::Tensor& t = live(env);
  auto* job = new ReadJob{Napi::Promise::Deferred::New(env), std::make_shared<std::vector<uint8_t>>(), {}};
  Napi::Promise promise = job->deferred.Promise();
  // One thread-safe function per read: it keeps the event loop alive until the read resolves.
  ReadTsfn tsfn = ReadTsfn::New(env, "tunekit.read", 0, 1);
  try {
    tk::ops::read_async(t, job->bytes, [tsfn, job](std::string err) mutable {
      job->error = std::move(err);
      tsfn.BlockingCall(job);
      tsfn.Release();
    });
  } catch (const std::exception& e) {
    tsfn.Release();
    Napi::Error err = Napi::Error::New(env, e.what());
    delete job;
    throw err;
  }
  return promise;
}

// ---- ops -----------------------------------------------------------------------------------------

Napi::Value FromHost(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const void* data = nullptr;
    size_t bytes = 0;
    if (info[0].IsArrayBuffer()) {
      auto ab = info[0].As<Napi::ArrayBuffer>();
      data = ab.Data();
      bytes = ab.ByteLength();
    } else if (info[0].IsTypedArray()) {
      auto ta = info[0].As<Napi::TypedArray>();
      data = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
      bytes = ta.ByteLength();
    } else {
      tk::fail("tensor: data must be an ArrayBuffer or a typed array");
    }
    return NativeTensor::Wrap(env, tk::ops::from_host(data, bytes, arg_shape(info[1]), arg_dtype(info[2]),
                                                      arg_device(info[3])));
  });
}

Napi::Value Full(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::full(arg_shape(info[0]), arg_dtype(info[1]), arg_device(info[2]),
                                                 arg_number(info[3], "fill value")));
  });
}

Napi::Value Randn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    int64_t seed = arg_int(info[3], "seed");
    return NativeTensor::Wrap(env, tk::ops::randn(arg_shape(info[0]), arg_dtype(info[1]), arg_device(info[2]),
                                                  uint64_t(seed), float(arg_number(info[4], "mean")),
                                                  float(arg_number(info[5], "std"))));
  });
}

Napi::Value ToDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::to_device(NativeTensor::From(info[0], "tensor"), arg_device(info[1])));
  });
}

Napi::Value Cast(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::cast(NativeTensor::From(info[0], "tensor"), arg_dtype(info[1])));
  });
}

Napi::Value Reshape(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::reshape(NativeTensor::From(info[0], "tensor"), arg_shape(info[1])));
  });
}

Napi::Value Permute(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(
        env, tk::ops::permute(NativeTensor::From(info[0], "tensor"), arg_ints(info[1], "permutation")));
  });
}

Napi::Value Matmul(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::matmul(NativeTensor::From(info[0], "a"), NativeTensor::From(info[1], "b"),
                                                   info[2].ToBoolean(), info[3].ToBoolean()));
  });
}

Napi::Value Binary(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    std::string op = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
    tk::BinaryOp kind;
    if (op == "add") kind = tk::BinaryOp::Add;
    else if (op == "sub") kind = tk::BinaryOp::Sub;
    else if (op == "mul") kind = tk::BinaryOp::Mul;
    else tk::fail("unknown binary op '", op, "'");
    return NativeTensor::Wrap(env, tk::ops::binary(kind, NativeTensor::From(info[1], "a"), NativeTensor::From(info[2], "b")));
  });
}

Napi::Value Scale(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::scale(NativeTensor::From(info[0], "x"), arg_number(info[1], "scale")));
  });
}

Napi::Value ScaleByInplace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::scale_by_inplace(NativeTensor::From(info[0], "x"), NativeTensor::From(info[1], "scale")));
  });
}

Napi::Value Dropout(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    int64_t seed = arg_int(info[2], "seed");
    if (seed < 0) tk::fail("dropout: seed must be a non-negative integer, got ", seed);
    return NativeTensor::Wrap(env, tk::ops::dropout(NativeTensor::From(info[0], "x"), arg_number(info[1], "p"), uint64_t(seed)));
  });
}

Napi::Value Sum(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::sum(NativeTensor::From(info[0], "x"), arg_ints(info[1], "axes"),
                                                info[2].ToBoolean()));
  });
}

Napi::Value RmsNorm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::rms_norm(NativeTensor::From(info[0], "x"), NativeTensor::From(info[1], "weight"),
                                                     arg_number(info[2], "eps")));
  });
}

Napi::Value Swiglu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::swiglu(NativeTensor::From(info[0], "gate"), NativeTensor::From(info[1], "up")));
  });
}

Napi::Value Embedding(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::embedding(NativeTensor::From(info[0], "ids"), NativeTensor::From(info[1], "table")));
  });
}

// scaling: { type: 'none'|'linear'|'dynamic'|'yarn'|'llama3', factor, ... } with the camelCase
// names of Hugging Face's rope_scaling keys (validated in TypeScript first).
tk::RopeScaling arg_rope_scaling(const Napi::Value& v) {
  tk::RopeScaling s;
  if (!v.IsObject()) tk::fail("rope: scaling must be an object");
  Napi::Object o = v.As<Napi::Object>();
  std::string type = o.Get("type").IsString() ? o.Get("type").As<Napi::String>().Utf8Value() : "none";
  if (type == "none" || type == "default") s.type = tk::RopeScaling::None;
  else if (type == "linear") s.type = tk::RopeScaling::Linear;
  else if (type == "dynamic") s.type = tk::RopeScaling::Dynamic;
  else if (type == "yarn") s.type = tk::RopeScaling::Yarn;
  else if (type == "llama3") s.type = tk::RopeScaling::Llama3;
  else tk::fail("rope: unknown scaling type '", type, "': use linear, dynamic, yarn or llama3");
  auto num = [&](const char* key, float* out) {
    Napi::Value x = o.Get(key);
    if (!x.IsUndefined()) *out = float(arg_number(x, key));
  };
  auto integer = [&](const char* key, int* out) {
    Napi::Value x = o.Get(key);
    if (!x.IsUndefined()) *out = int(arg_int(x, key));
  };
  num("factor", &s.factor);
  integer("originalMaxPositionEmbeddings", &s.original_max_position_embeddings);
  integer("maxPositionEmbeddings", &s.max_position_embeddings);
  num("lowFreqFactor", &s.low_freq_factor);
  num("highFreqFactor", &s.high_freq_factor);
  num("betaFast", &s.beta_fast);
  num("betaSlow", &s.beta_slow);
  num("mscale", &s.mscale);
  num("mscaleAllDim", &s.mscale_all_dim);
  num("attentionFactor", &s.attention_factor);
  if (o.Has("truncate")) s.truncate = o.Get("truncate").ToBoolean();
  return s;
}

Napi::Value Rope(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const tk::Tensor* positions = info[1].IsNull() || info[1].IsUndefined() ? nullptr : &NativeTensor::From(info[1], "positions");
    return NativeTensor::Wrap(env, tk::ops::rope(NativeTensor::From(info[0], "x"), positions, arg_number(info[2], "theta"),
                                                 arg_rope_scaling(info[3])));
  });
}

Napi::Value Attention(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const tk::Tensor* seg = info[5].IsNull() || info[5].IsUndefined() ? nullptr : &NativeTensor::From(info[5], "segmentIds");
    const tk::Tensor* kseg = info[6].IsNull() || info[6].IsUndefined() ? nullptr : &NativeTensor::From(info[6], "keySegmentIds");
    return NativeTensor::Wrap(env, tk::ops::attention(NativeTensor::From(info[0], "q"), NativeTensor::From(info[1], "k"),
                                                      NativeTensor::From(info[2], "v"), info[3].ToBoolean(),
                                                      arg_number(info[4], "scale"), seg, kseg));
  });
}

tk::LossReduction arg_reduction(const Napi::Value& v) {
  std::string r = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (r == "mean") return tk::LossReduction::Mean;
  if (r == "sum") return tk::LossReduction::Sum;
  if (r == "none") return tk::LossReduction::None;
  tk::fail("crossEntropy: unknown reduction '", r, "': use 'mean', 'sum' or 'none'");
}

int32_t arg_ignore_index(const Napi::Value& v) {
  int64_t i = arg_int(v, "ignoreIndex");
  if (i < INT32_MIN || i > INT32_MAX) tk::fail("ignoreIndex must fit in int32, got ", i);
  return int32_t(i);
}

const tk::Tensor* optional_tensor(const Napi::Value& v, const char* what) {
  return v.IsNull() || v.IsUndefined() ? nullptr : &NativeTensor::From(v, what);
}

Napi::Object pair_to_js(Napi::Env env, const char* a, TensorPtr ta, const char* b, TensorPtr tb) {
  Napi::Object out = Napi::Object::New(env);
  out.Set(a, NativeTensor::Wrap(env, std::move(ta)));
  out.Set(b, NativeTensor::Wrap(env, std::move(tb)));
  return out;
}

std::vector<tk::Tensor*> arg_tensors(const Napi::Value& v, const char* what) {
  if (!v.IsArray()) tk::fail(what, " must be an array of tensors");
  auto arr = v.As<Napi::Array>();
  std::vector<tk::Tensor*> out;
  for (uint32_t i = 0; i < arr.Length(); ++i) out.push_back(&NativeTensor::From(arr.Get(i), what));
  return out;
}

tk::DpoParams arg_dpo(const Napi::Value& beta, const Napi::Value& kind_v, const Napi::Value& smoothing) {
  tk::DpoParams p;
  p.beta = float(arg_number(beta, "beta"));
  std::string kind = kind_v.IsString() ? kind_v.As<Napi::String>().Utf8Value() : "";
  if (kind == "sigmoid") p.kind = tk::DpoKind::Sigmoid;
  else if (kind == "ipo") p.kind = tk::DpoKind::Ipo;
  else if (kind == "hinge") p.kind = tk::DpoKind::Hinge;
  else tk::fail("dpoLoss: unknown kind '", kind, "': use 'sigmoid', 'ipo' or 'hinge'");
  p.label_smoothing = float(arg_number(smoothing, "labelSmoothing"));
  return p;
}

tk::DistillParams arg_distill(const Napi::Value& kind_v, const Napi::Value& beta, const Napi::Value& temperature,
                              const Napi::Value& ignore_index) {
  tk::DistillParams p;
  std::string kind = kind_v.IsString() ? kind_v.As<Napi::String>().Utf8Value() : "";
  if (kind == "forward_kl") p.kind = tk::DistillKind::ForwardKl;
  else if (kind == "reverse_kl") p.kind = tk::DistillKind::ReverseKl;
  else if (kind == "jsd") p.kind = tk::DistillKind::Jsd;
  else tk::fail("distillLoss: unknown kind '", kind, "': use 'forward_kl', 'reverse_kl' or 'jsd'");
  p.beta = float(arg_number(beta, "beta"));
  p.temperature = float(arg_number(temperature, "temperature"));
  p.ignore_index = arg_ignore_index(ignore_index);
  return p;
}

Napi::Value CrossEntropy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::cross_entropy(NativeTensor::From(info[0], "logits"), NativeTensor::From(info[1], "targets"),
                                                          arg_ignore_index(info[2]), arg_reduction(info[3])));
  });
}

Napi::Value SequenceLogprobs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::sequence_logprobs(NativeTensor::From(info[0], "logits"),
                                                              NativeTensor::From(info[1], "targets"), arg_ignore_index(info[2])));
  });
}

Napi::Value DpoLoss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    tk::DpoParams p = arg_dpo(info[4], info[5], info[6]);
    tk::ops::DpoResult r = tk::ops::dpo_loss(NativeTensor::From(info[0], "policyChosen"), NativeTensor::From(info[1], "policyRejected"),
                                             NativeTensor::From(info[2], "refChosen"), NativeTensor::From(info[3], "refRejected"), p);
    Napi::Object out = Napi::Object::New(env);
    out.Set("loss", NativeTensor::Wrap(env, std::move(r.loss)));
    out.Set("chosenRewards", NativeTensor::Wrap(env, std::move(r.chosen_rewards)));
    out.Set("rejectedRewards", NativeTensor::Wrap(env, std::move(r.rejected_rewards)));
    return out;
  });
}

Napi::Value DistillLoss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    tk::DistillParams p = arg_distill(info[3], info[4], info[5], info[6]);
    const tk::Tensor* targets = optional_tensor(info[2], "targets");
    return NativeTensor::Wrap(env, tk::ops::distill_loss(NativeTensor::From(info[0], "student"), NativeTensor::From(info[1], "teacher"),
                                                         targets, p));
  });
}

// ---- training ops ----------------------------------------------------------------------------------

Napi::Value Concat(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto list = arg_tensors(info[0], "tensors");
    std::vector<const tk::Tensor*> tensors(list.begin(), list.end());
    return NativeTensor::Wrap(env, tk::ops::concat(tensors, int(arg_int(info[1], "axis"))));
  });
}

Napi::Value Narrow(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::narrow(NativeTensor::From(info[0], "x"), int(arg_int(info[1], "axis")),
                                                   arg_int(info[2], "start"), arg_int(info[3], "length")));
  });
}

Napi::Value BroadcastTo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::broadcast_to(NativeTensor::From(info[0], "x"), arg_shape(info[1])));
  });
}

Napi::Value RmsNormTrain(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto r = tk::ops::rms_norm_train(NativeTensor::From(info[0], "x"), NativeTensor::From(info[1], "weight"),
                                     arg_number(info[2], "eps"));
    return pair_to_js(env, "y", std::move(r.y), "rstd", std::move(r.rstd));
  });
}

Napi::Value RmsNormBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto g = tk::ops::rms_norm_backward(NativeTensor::From(info[0], "dy"), NativeTensor::From(info[1], "x"),
                                        NativeTensor::From(info[2], "weight"), NativeTensor::From(info[3], "rstd"));
    return pair_to_js(env, "dx", std::move(g.a), "dweight", std::move(g.b));
  });
}

Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto g = tk::ops::swiglu_backward(NativeTensor::From(info[0], "dout"), NativeTensor::From(info[1], "gate"),
                                      NativeTensor::From(info[2], "up"));
    return pair_to_js(env, "dgate", std::move(g.a), "dup", std::move(g.b));
  });
}

Napi::Value EmbeddingBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::embedding_backward(NativeTensor::From(info[0], "dout"), NativeTensor::From(info[1], "ids"),
                                                               arg_int(info[2], "vocab"), arg_dtype(info[3])));
  });
}

Napi::Value RopeBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::rope_backward(NativeTensor::From(info[0], "dy"), optional_tensor(info[1], "positions"),
                                                          arg_number(info[2], "theta"), arg_rope_scaling(info[3])));
  });
}

Napi::Value AttentionTrain(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto r = tk::ops::attention_train(NativeTensor::From(info[0], "q"), NativeTensor::From(info[1], "k"),
                                      NativeTensor::From(info[2], "v"), info[3].ToBoolean(), arg_number(info[4], "scale"),
                                      optional_tensor(info[5], "segmentIds"), optional_tensor(info[6], "keySegmentIds"));
    return pair_to_js(env, "out", std::move(r.out), "lse", std::move(r.lse));
  });
}

Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto g = tk::ops::attention_backward(NativeTensor::From(info[0], "dout"), NativeTensor::From(info[1], "q"),
                                         NativeTensor::From(info[2], "k"), NativeTensor::From(info[3], "v"),
                                         NativeTensor::From(info[4], "out"), NativeTensor::From(info[5], "lse"),
                                         info[6].ToBoolean(), arg_number(info[7], "scale"), optional_tensor(info[8], "segmentIds"),
                                         optional_tensor(info[9], "keySegmentIds"));
    Napi::Object out = Napi::Object::New(env);
    out.Set("dq", NativeTensor::Wrap(env, std::move(g.a)));
    out.Set("dk", NativeTensor::Wrap(env, std::move(g.b)));
    out.Set("dv", NativeTensor::Wrap(env, std::move(g.c)));
    return out;
  });
}

Napi::Value CrossEntropyTrain(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto r = tk::ops::cross_entropy_train(NativeTensor::From(info[0], "logits"), NativeTensor::From(info[1], "targets"),
                                          arg_ignore_index(info[2]), arg_reduction(info[3]));
    return pair_to_js(env, "loss", std::move(r.loss), "lse", std::move(r.lse));
  });
}

Napi::Value CrossEntropyBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::cross_entropy_backward(NativeTensor::From(info[0], "dloss"), NativeTensor::From(info[1], "logits"),
                                                                   NativeTensor::From(info[2], "targets"), NativeTensor::From(info[3], "lse"),
                                                                   arg_ignore_index(info[4]), arg_reduction(info[5])));
  });
}

Napi::Value SequenceLogprobsTrain(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto r = tk::ops::sequence_logprobs_train(NativeTensor::From(info[0], "logits"), NativeTensor::From(info[1], "targets"),
                                              arg_ignore_index(info[2]));
    return pair_to_js(env, "out", std::move(r.loss), "lse", std::move(r.lse));
  });
}

Napi::Value SequenceLogprobsBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::sequence_logprobs_backward(NativeTensor::From(info[0], "dout"), NativeTensor::From(info[1], "logits"),
                                                                       NativeTensor::From(info[2], "targets"), NativeTensor::From(info[3], "lse"),
                                                                       arg_ignore_index(info[4])));
  });
}

Napi::Value DpoLossBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto g = tk::ops::dpo_loss_backward(NativeTensor::From(info[0], "dloss"), NativeTensor::From(info[1], "policyChosen"),
                                        NativeTensor::From(info[2], "policyRejected"), NativeTensor::From(info[3], "refChosen"),
                                        NativeTensor::From(info[4], "refRejected"), arg_dpo(info[5], info[6], info[7]));
    return pair_to_js(env, "dChosen", std::move(g.a), "dRejected", std::move(g.b));
  });
}

Napi::Value DistillLossBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::distill_loss_backward(NativeTensor::From(info[0], "dloss"), NativeTensor::From(info[1], "student"),
                                                                  NativeTensor::From(info[2], "teacher"), optional_tensor(info[3], "targets"),
                                                                  arg_distill(info[4], info[5], info[6], info[7])));
  });
}

Napi::Object linear_result_to_js(Napi::Env env, tk::ops::LinearLossResult r) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("loss", NativeTensor::Wrap(env, std::move(r.loss)));
  if (r.dhidden) out.Set("dhidden", NativeTensor::Wrap(env, std::move(r.dhidden)));
  if (r.dweight) out.Set("dweight", NativeTensor::Wrap(env, std::move(r.dweight)));
  return out;
}

Napi::Value LinearCrossEntropy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return linear_result_to_js(env, tk::ops::linear_cross_entropy(NativeTensor::From(info[0], "hidden"), NativeTensor::From(info[1], "weight"),
                                                                  NativeTensor::From(info[2], "targets"), arg_ignore_index(info[3]),
                                                                  arg_reduction(info[4]), info[5].ToBoolean(), info[6].ToBoolean()));
  });
}

// linearDistillLoss(sh, sw, th, tw, targets | null, kind, beta, temperature, ignoreIndex, alpha, wantDhidden, wantDweight)
Napi::Value LinearDistillLoss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return linear_result_to_js(env, tk::ops::linear_distill(NativeTensor::From(info[0], "studentHidden"), NativeTensor::From(info[1], "studentWeight"),
                                                            NativeTensor::From(info[2], "teacherHidden"), NativeTensor::From(info[3], "teacherWeight"),
                                                            optional_tensor(info[4], "targets"), arg_distill(info[5], info[6], info[7], info[8]),
                                                            arg_number(info[9], "alpha"), info[10].ToBoolean(), info[11].ToBoolean()));
  });
}

// nf4: { packed, absmax, scale2?, offset?, out, in, blockSize, doubleQuant }
tk::ops::Nf4WeightRef arg_nf4(const Napi::Value& v) {
  if (!v.IsObject()) tk::fail("qloraLinear: the NF4 weight must be an object");
  Napi::Object o = v.As<Napi::Object>();
  tk::ops::Nf4WeightRef w;
  w.double_quant = o.Get("doubleQuant").ToBoolean();
  w.packed = &NativeTensor::From(o.Get("packed"), "packed");
  w.absmax = &NativeTensor::From(o.Get("absmax"), "absmax");
  w.scale2 = w.double_quant ? &NativeTensor::From(o.Get("scale2"), "scale2") : nullptr;
  w.offset = w.double_quant ? &NativeTensor::From(o.Get("offset"), "offset") : nullptr;
  w.out = arg_int(o.Get("out"), "out");
  w.in = arg_int(o.Get("in"), "in");
  w.block_size = arg_int(o.Get("blockSize"), "blockSize");
  return w;
}

uint64_t arg_seed(const Napi::Value& v) {
  int64_t seed = arg_int(v, "seed");
  if (seed < 0) tk::fail("seed must be a non-negative integer, got ", seed);
  return uint64_t(seed);
}

Napi::Value QloraLinear(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto r = tk::ops::qlora_linear(NativeTensor::From(info[0], "x"), arg_nf4(info[1]), NativeTensor::From(info[2], "loraA"),
                                   NativeTensor::From(info[3], "loraB"), arg_number(info[4], "scale"),
                                   arg_number(info[5], "dropout"), arg_seed(info[6]));
    return pair_to_js(env, "y", std::move(r.y), "xa", std::move(r.xa));
  });
}

Napi::Value QloraLinearBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    auto g = tk::ops::qlora_linear_backward(NativeTensor::From(info[0], "dy"), NativeTensor::From(info[1], "x"), arg_nf4(info[2]),
                                            NativeTensor::From(info[3], "loraA"), NativeTensor::From(info[4], "loraB"),
                                            NativeTensor::From(info[5], "xa"), arg_number(info[6], "scale"),
                                            arg_number(info[7], "dropout"), arg_seed(info[8]), info[9].ToBoolean());
    Napi::Object out = Napi::Object::New(env);
    if (g.a) out.Set("dx", NativeTensor::Wrap(env, std::move(g.a)));
    out.Set("dA", NativeTensor::Wrap(env, std::move(g.b)));
    out.Set("dB", NativeTensor::Wrap(env, std::move(g.c)));
    return out;
  });
}

// adamwStep(params, grads, m, v, { lr, beta1, beta2, eps, weightDecay, step, gradScale })
Napi::Value AdamwStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  guarded(env, [&] {
    auto params = arg_tensors(info[0], "params");
    auto grads_mut = arg_tensors(info[1], "grads");
    std::vector<const tk::Tensor*> grads(grads_mut.begin(), grads_mut.end());
    auto m = arg_tensors(info[2], "m");
    auto v = arg_tensors(info[3], "v");
    if (!info[4].IsObject()) tk::fail("adamw: hyperparameters must be an object");
    Napi::Object o = info[4].As<Napi::Object>();
    tk::AdamWParams hp;
    hp.lr = float(arg_number(o.Get("lr"), "lr"));
    hp.beta1 = float(arg_number(o.Get("beta1"), "beta1"));
    hp.beta2 = float(arg_number(o.Get("beta2"), "beta2"));
    hp.eps = float(arg_number(o.Get("eps"), "eps"));
    hp.weight_decay = float(arg_number(o.Get("weightDecay"), "weightDecay"));
    hp.step = arg_int(o.Get("step"), "step");
    hp.grad_scale = float(arg_number(o.Get("gradScale"), "gradScale"));
    tk::ops::adamw_step(params, grads, m, v, hp);
  });
  return env.Undefined();
}

Napi::Value ClipGradNorm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    return NativeTensor::Wrap(env, tk::ops::clip_grad_norm(arg_tensors(info[0], "grads"), arg_number(info[1], "maxNorm")));
  });
}

Napi::Value Nf4Quantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    tk::ops::Nf4Tensors q = tk::ops::nf4_quantize(NativeTensor::From(info[0], "w"), arg_int(info[1], "blockSize"),
                                                  info[2].ToBoolean());
    Napi::Object out = Napi::Object::New(env);
    out.Set("packed", NativeTensor::Wrap(env, std::move(q.packed)));
    out.Set("absmax", NativeTensor::Wrap(env, std::move(q.absmax)));
    if (q.scale2) out.Set("scale2", NativeTensor::Wrap(env, std::move(q.scale2)));
    if (q.offset) out.Set("offset", NativeTensor::Wrap(env, std::move(q.offset)));
    return out;
  });
}

Napi::Value Nf4Dequantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    bool dq = info[6].ToBoolean();
    const tk::Tensor* scale2 = dq ? &NativeTensor::From(info[2], "scale2") : nullptr;
    const tk::Tensor* offset = dq ? &NativeTensor::From(info[3], "offset") : nullptr;
    return NativeTensor::Wrap(env, tk::ops::nf4_dequantize(NativeTensor::From(info[0], "packed"), NativeTensor::From(info[1], "absmax"),
                                                           scale2, offset, arg_shape(info[4]), arg_int(info[5], "blockSize"), dq,
                                                           arg_dtype(info[7])));
  });
}

Napi::Value Synchronize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  guarded(env, [&] { tk::ops::synchronize(arg_device(info[0])); });
  return env.Undefined();
}

// ---- runtime -------------------------------------------------------------------------------------

Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  tk::Runtime& rt = tk::Runtime::get();
  Napi::Object out = Napi::Object::New(env);
  Napi::Object cpu = Napi::Object::New(env);
  tk::CpuIsa isa = tk::active_isa();
  cpu.Set("isa", tk::isa_name(isa == tk::CpuIsa::Avx512Bf16 ? tk::CpuIsa::Avx512 : isa));
  cpu.Set("bf16", isa == tk::CpuIsa::Avx512Bf16);
  cpu.Set("detected", tk::isa_name(tk::detected_isa()));
  cpu.Set("threads", rt.cpu().threads());
  out.Set("cpu", cpu);
  Napi::Object cuda = Napi::Object::New(env);
  cuda.Set("compiled", rt.cuda_compiled());
  Napi::Array devices = Napi::Array::New(env);
  bool cublas = false;
  std::string status = "this build of tunekit has no CUDA backend";
#ifdef TUNEKIT_WITH_CUDA
  cublas = tk::cuda::has_cublaslt();
  int n = rt.cuda_device_count();
  status = n > 0 ? "" : tk::cuda::driver_status();
  for (int i = 0; i < n; ++i) {
    tk::cuda::DeviceProps p = tk::cuda::device_props(i);
    Napi::Object d = Napi::Object::New(env);
    d.Set("index", i);
    d.Set("name", p.name);
    d.Set("computeCapability", std::to_string(p.major) + "." + std::to_string(p.minor));
    d.Set("multiprocessors", p.sm_count);
    d.Set("totalBytes", double(p.total_bytes));
    devices.Set(uint32_t(i), d);
  }
#endif
  cuda.Set("available", devices.Length() > 0);
  cuda.Set("devices", devices);
  cuda.Set("cublas", cublas);
  if (!status.empty()) cuda.Set("status", status);
  out.Set("cuda", cuda);
  return out;
}

Napi::Object device_memory(Napi::Env env, Device dev) {
  tk::Runtime& rt = tk::Runtime::get();
  tk::LiveStats& live = rt.live(dev);
  tk::AllocatorStats a = rt.allocator_stats(dev);
  Napi::Object o = Napi::Object::New(env);
  o.Set("tensors", double(live.tensors.load()));
  o.Set("bytes", double(live.bytes.load()));
  o.Set("allocatedBytes", double(a.allocated_bytes));
  o.Set("cachedBytes", double(a.cached_bytes));
  o.Set("peakAllocatedBytes", double(a.peak_allocated_bytes));
  return o;
}

Napi::Value Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    Napi::Object out = Napi::Object::New(env);
    out.Set("cpu", device_memory(env, Device{DeviceType::CPU, 0}));
    int n = tk::Runtime::get().cuda_device_count();
    for (int i = 0; i < n; ++i) out.Set("cuda:" + std::to_string(i), device_memory(env, Device{DeviceType::CUDA, i}));
    // The stand-in's tensors and bytes are its own; its allocator figures are the CPU's.
    const char* standin = std::getenv("TUNEKIT_CUDA_STANDIN");
    if (tk::Runtime::get().cuda_compiled() && standin && std::string(standin) == "1")
      out.Set("cuda-standin", device_memory(env, Device{DeviceType::CPU, tk::kCudaStandinIndex}));
    return out;
  });
}

Napi::Value ResetPeakMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  guarded(env, [&] { tk::Runtime::get().reset_peak(arg_device(info[0])); });
  return env.Undefined();
}

Napi::Value SetThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  guarded(env, [&] {
    int64_t n = arg_int(info[0], "threads");
    if (n < 1 || n > 1024) tk::fail("setThreads: threads must be between 1 and 1024, got ", n);
    tk::Runtime::get().cpu().set_threads(int(n));
  });
  return env.Undefined();
}

// Forces a CPU ISA level (capped at what the CPU has) and returns the level in effect.
Napi::Value SetIsa(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    std::string s = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
    tk::CpuIsa isa;
    if (!tk::parse_isa(s, &isa)) tk::fail("unknown ISA '", s, "': use portable, avx2, avx512 or avx512bf16");
    // Kernels already queued keep the level they were queued under only if we wait for them.
    tk::Runtime::get().cpu().synchronize();
    return Napi::String::New(env, tk::isa_name(tk::set_active_isa(isa)));
  });
}

// Peak probes run on the CPU queue's pool after the queue drains; they block the caller and are
// meant for benchmarks.
Napi::Value Probe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    tk::CpuQueue& q = tk::Runtime::get().cpu();
    q.synchronize();
    Napi::Object out = Napi::Object::New(env);
    double seconds = arg_number(info[0], "seconds");
    int64_t bytes = arg_int(info[1], "bytes");
    tk::PeakFlops pf{};
    double read = 0, copy = 0;
    std::promise<void> done;
    q.enqueue([&] {
      pf = tk::probe_peak_flops(q.pool(), seconds);
      read = tk::probe_read_bandwidth(q.pool(), size_t(bytes));
      copy = tk::probe_copy_bandwidth(q.pool(), size_t(bytes));
      done.set_value();
    });
    done.get_future().wait();
    out.Set("fp32Gflops", pf.gflops);
    out.Set("bf16Gflops", pf.bf16_gflops);
    out.Set("isa", tk::isa_name(pf.isa));
    out.Set("threads", q.threads());
    out.Set("readGBs", read);
    out.Set("copyGBs", copy);
    return out;
  });
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  data->tensor_ctor = Napi::Persistent(NativeTensor::Define(env));
  env.SetInstanceData(data);
  exports.Set("NativeTensor", data->tensor_ctor.Value());
  exports.Set("fromHost", Napi::Function::New(env, FromHost));
  exports.Set("full", Napi::Function::New(env, Full));
  exports.Set("randn", Napi::Function::New(env, Randn));
  exports.Set("toDevice", Napi::Function::New(env, ToDevice));
  exports.Set("cast", Napi::Function::New(env, Cast));
  exports.Set("reshape", Napi::Function::New(env, Reshape));
  exports.Set("permute", Napi::Function::New(env, Permute));
  exports.Set("concat", Napi::Function::New(env, Concat));
  exports.Set("narrow", Napi::Function::New(env, Narrow));
  exports.Set("matmul", Napi::Function::New(env, Matmul));
  exports.Set("binary", Napi::Function::New(env, Binary));
  exports.Set("scale", Napi::Function::New(env, Scale));
  exports.Set("sum", Napi::Function::New(env, Sum));
  exports.Set("dropout", Napi::Function::New(env, Dropout));
  exports.Set("scaleByInplace", Napi::Function::New(env, ScaleByInplace));
  exports.Set("rmsNorm", Napi::Function::New(env, RmsNorm));
  exports.Set("swiglu", Napi::Function::New(env, Swiglu));
  exports.Set("embedding", Napi::Function::New(env, Embedding));
  exports.Set("rope", Napi::Function::New(env, Rope));
  exports.Set("attention", Napi::Function::New(env, Attention));
  exports.Set("crossEntropy", Napi::Function::New(env, CrossEntropy));
  exports.Set("sequenceLogprobs", Napi::Function::New(env, SequenceLogprobs));
  exports.Set("dpoLoss", Napi::Function::New(env, DpoLoss));
  exports.Set("distillLoss", Napi::Function::New(env, DistillLoss));
  exports.Set("broadcastTo", Napi::Function::New(env, BroadcastTo));
  exports.Set("rmsNormTrain", Napi::Function::New(env, RmsNormTrain));
  exports.Set("rmsNormBackward", Napi::Function::New(env, RmsNormBackward));
  exports.Set("swigluBackward", Napi::Function::New(env, SwigluBackward));
  exports.Set("embeddingBackward", Napi::Function::New(env, EmbeddingBackward));
  exports.Set("ropeBackward", Napi::Function::New(env, RopeBackward));
  exports.Set("attentionTrain", Napi::Function::New(env, AttentionTrain));
  exports.Set("attentionBackward", Napi::Function::New(env, AttentionBackward));
  exports.Set("crossEntropyTrain", Napi::Function::New(env, CrossEntropyTrain));
  exports.Set("crossEntropyBackward", Napi::Function::New(env, CrossEntropyBackward));
  exports.Set("sequenceLogprobsTrain", Napi::Function::New(env, SequenceLogprobsTrain));
  exports.Set("sequenceLogprobsBackward", Napi::Function::New(env, SequenceLogprobsBackward));
  exports.Set("dpoLossBackward", Napi::Function::New(env, DpoLossBackward));
  exports.Set("distillLossBackward", Napi::Function::New(env, DistillLossBackward));
  exports.Set("linearCrossEntropy", Napi::Function::New(env, LinearCrossEntropy));
  exports.Set("linearDistillLoss", Napi::Function::New(env, LinearDistillLoss));
  exports.Set("qloraLinear", Napi::Function::New(env, QloraLinear));
  exports.Set("qloraLinearBackward", Napi::Function::New(env, QloraLinearBackward));
  exports.Set("adamwStep", Napi::Function::New(env, AdamwStep));
  exports.Set("clipGradNorm", Napi::Function::New(env, ClipGradNorm));
  exports.Set("nf4Quantize", Napi::Function::New(env, Nf4Quantize));
  exports.Set("nf4Dequantize", Napi::Function::New(env, Nf4Dequantize));
  exports.Set("synchronize", Napi::Function::New(env, Synchronize));
  exports.Set("info", Napi::Function::New(env, Info));
  exports.Set("memory", Napi::Function::New(env, Memory));
  exports.Set("setThreads", Napi::Function::New(env, SetThreads));
  exports.Set("resetPeakMemory", Napi::Function::New(env, ResetPeakMemory));
  exports.Set("setIsa", Napi::Function::New(env, SetIsa));
  exports.Set("probe", Napi::Function::New(env, Probe));
  exports.Set("napiVersion", Napi::Number::New(env, NAPI_VERSION));
  return exports;
}

}  // namespace

NODE_API_MODULE(tunekit, Init)
