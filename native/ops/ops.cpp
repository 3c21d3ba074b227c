#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <future>

#include "../core/error.h"
#include "../cpu/attention.h"
#include "../cpu/gemm.h"
#include "../cpu/norm.h"
#ifdef TUNEKIT_WITH_CUDA
#include "../cuda/attention_kernels.h"
#include "../cuda/device.h"
#include "../cuda/elementwise_kernels.h"
#include "../cuda/gemm_kernels.h"
#include "../cuda/linear_loss_kernels.h"
#include "../cuda/loss_kernels.h"
#include "../cuda/nf4_kernels.h"
#include "../cuda/norm_kernels.h"
#include "../cuda/ops_glue.h"
#include "../cuda/optim_kernels.h"
#include "../cuda/qlora_kernels.h"
// The CUDA column of a launch: `call` runs on the caller's thread and issues its work on the
// device queue's stream (named `stream` inside `call`).
#define TK_CUDA(call) [=](Queue& tk_queue) { void* stream = cuda::stream_of(tk_queue); call; }
// The CUDA column of a CPU-path launch whose CUDA work is issued by a separate branch of the op:
// it only tells the 'cuda-standin' device that the op exists on CUDA, and never runs.
#define TK_CUDA_ELSEWHERE [](Queue&) { fail("internal error: a CUDA-elsewhere column ran"); }
#else
#define TK_CUDA(call) nullptr
#define TK_CUDA_ELSEWHERE nullptr
#endif

namespace tk {

// ---- storage and tensors -------------------------------------------------------------------------

Storage::Storage(Device dev, size_t n, bool host_writes_now)
    : device(dev), bytes(n), ptr(Runtime::get().allocate(dev, n, host_writes_now)) {}
Storage::~Storage() { Runtime::get().release(device, ptr, bytes); }

Tensor::Tensor(std::shared_ptr<Storage> storage, DType dtype, std::vector<int64_t> shape)
    : storage_(std::move(storage)), dtype_(dtype), shape_(std::move(shape)) {
  Runtime::get().live(device()).tensors.fetch_add(1);
}

Tensor::~Tensor() { Runtime::get().live(device()).tensors.fetch_sub(1); }

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

TensorView Tensor::view() const { return make_view(storage_->ptr, dtype_, device(), shape_); }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string Tensor::describe() const {
  return shape_str(shape_) + " " + dtype_name(dtype_) + " on " + device().name();
}

void check_shape(const char* op, const std::vector<int64_t>& shape, DType dtype) {
  TK_CHECK(shape.size() <= size_t(kMaxDims), op, ": shape ", shape_str(shape), " has ", shape.size(),
           " dimensions; at most ", kMaxDims, " are supported");
  // Element counts stay below 2^53 so JavaScript numbers index them exactly.
  const int64_t limit = int64_t(1) << 53;
  int64_t n = 1;
  for (int64_t d : shape) {
    TK_CHECK(d >= 0, op, ": shape ", shape_str(shape), " has a negative size");
    if (d != 0 && n > limit / d) fail(op, ": shape ", shape_str(shape), " has too many elements");
    n *= d;
  }
  TK_CHECK(n <= limit / int64_t(dtype_size(dtype)), op, ": shape ", shape_str(shape), " is too large");
}

TensorPtr empty(const std::vector<int64_t>& shape, DType dtype, Device dev) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  auto storage = std::make_shared<Storage>(dev, size_t(n) * dtype_size(dtype));
  return std::make_unique<Tensor>(std::move(storage), dtype, shape);
}

namespace ops {

namespace {

// The kernels that serve one op call, one column per device type. An op without a kernel for
// a device says so by name instead of running something else.
struct DeviceKernels {
  std::function<void(ThreadPool&)> cpu;
  std::function<void(Queue&)> cuda;
};

void launch(const char* op, Device dev, DeviceKernels k) {
  Runtime& rt = Runtime::get();
  if (dev.is_cuda_standin())
    TK_CHECK(k.cuda, op, ": no CUDA kernel in this version of tunekit (seen on the 'cuda-standin' test device)");
  if (dev.type == DeviceType::CPU) {
    CpuQueue& q = rt.cpu();
    q.enqueue([&q, fn = std::move(k.cpu)] { fn(q.pool()); });
    return;
  }
  TK_CHECK(k.cuda, op, ": no CUDA kernel in this version of tunekit; move the tensors to the CPU with t.to('cpu')");
  Queue& q = rt.queue(dev);
  q.enqueue([&q, fn = std::move(k.cuda)] { fn(q); });
}

void same_device(const char* op, const Tensor& a, const Tensor& b) {
  TK_CHECK(a.device() == b.device(), op, ": operands are on different devices (", a.describe(), " and ",
           b.describe(), "); move one with t.to('", a.device().name(), "')");
}

void same_dtype(const char* op, const Tensor& a, const Tensor& b) {
  TK_CHECK(a.dtype() == b.dtype(), op, ": dtypes differ (", a.describe(), " and ", b.describe(),
           "); cast one with t.to('", dtype_name(a.dtype()), "')");
}

int normalize_axis(const char* op, int axis, int ndim, const std::vector<int64_t>& shape) {
  TK_CHECK(axis >= -ndim && axis < ndim, op, ": axis ", axis, " is out of range for shape ", shape_str(shape),
           " (valid: ", -ndim, " .. ", ndim - 1, ")");
  return axis < 0 ? axis + ndim : axis;
}

}  // namespace

TensorPtr from_host(const void* data, size_t bytes, const std::vector<int64_t>& shape, DType dtype, Device dev) {
  check_shape("tensor", shape, dtype);
  Runtime::get().check_device(dev);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  size_t want = size_t(n) * dtype_size(dtype);
  TK_CHECK(bytes == want, "tensor: shape ", shape_str(shape), " needs ", n, " ", dtype_name(dtype),
           " elements (", want, " bytes) but the data has ", bytes, " bytes");
  // On the CPU the copy happens now, so the block must be one no queued work still reads.
  auto storage = std::make_shared<Storage>(dev, want, /*host_writes_now=*/dev.type == DeviceType::CPU);
  TensorPtr t = std::make_unique<Tensor>(std::move(storage), dtype, shape);
  if (bytes == 0) return t;
  if (dev.type == DeviceType::CPU) {
    // Memory no queued work can touch: copy now, so the caller may reuse `data`.
    std::memcpy(t->storage()->ptr, data, bytes);
  } else {
#ifdef TUNEKIT_WITH_CUDA
    cuda::upload(Runtime::get().queue(dev), t->storage()->ptr, data, bytes);
#endif
  }
  return t;
}

TensorPtr full(const std::vector<int64_t>& shape, DType dtype, Device dev, double value) {
  check_shape("full", shape, dtype);
  Runtime::get().check_device(dev);
  TensorPtr t = empty(shape, dtype, dev);
  TensorView out = t->view();
  launch("full", dev, {[=](ThreadPool& pool) { fill_cpu(out, value, pool); }, TK_CUDA(fill_cuda(out, value, stream))});
  return t;
}

TensorPtr randn(const std::vector<int64_t>& shape, DType dtype, Device dev, uint64_t seed, float mean, float std) {
  check_shape("randn", shape, dtype);
  TK_CHECK(is_floating(dtype), "randn: dtype ", dtype_name(dtype), " is not a floating type; use f32, bf16 or f16");
  Runtime::get().check_device(dev);
  TensorPtr t = empty(shape, dtype, dev);
  TensorView out = t->view();
  launch("randn", dev, {[=](ThreadPool& pool) { randn_cpu(out, seed, mean, std, pool); }, TK_CUDA(randn_cuda(out, seed, mean, std, stream))});
  return t;
}

void read_async(const Tensor& t, std::shared_ptr<std::vector<uint8_t>> out, std::function<void(std::string)> done) {
  out->resize(t.nbytes());
  Queue& q = Runtime::get().queue(t.device());
  std::shared_ptr<Storage> keep = t.storage();  // the tensor may be disposed before the copy runs
  size_t bytes = t.nbytes();
  // Each completion drops its reference to the storage before reporting, so that when the read
  // resolves, tk.memory() no longer counts a tensor disposed while the read was queued.
  if (t.device().type == DeviceType::CPU) {
    q.enqueue([keep, out, bytes, &q, done = std::move(done)]() mutable {
      if (bytes) std::memcpy(out->data(), keep->ptr, bytes);
      keep.reset();
      done(q.take_error());
    });
    return;
  }
#ifdef TUNEKIT_WITH_CUDA
  void* src = keep->ptr;
  cuda::download(q, src, out->data(), bytes, [keep, out, &q, done = std::move(done)]() mutable {
    keep.reset();
    done(q.take_error());
  });
#endif
}

std::vector<uint8_t> read_sync(const Tensor& t) {
  auto out = std::make_shared<std::vector<uint8_t>>();
  std::promise<std::string> result;
  auto fut = result.get_future();
  read_async(t, out, [&result](std::string err) { result.set_value(std::move(err)); });
  std::string err = fut.get();
  if (!err.empty()) throw Error(err);
  return std::move(*out);
}

TensorPtr to_device(const Tensor& t, Device dev) {
  Runtime& rt = Runtime::get();
  rt.check_device(dev);
  if (dev == t.device()) return reshape(t, t.shape());
  // Only CPU <-> CUDA moves exist, and only in a CUDA build (check_device above has thrown otherwise).
  std::vector<uint8_t> host = read_sync(t);
  return from_host(host.data(), host.size(), t.shape(), t.dtype(), dev);
}

TensorPtr cast(const Tensor& t, DType dtype) {
  TensorPtr out = empty(t.shape(), dtype, t.device());
  TensorView src = t.view(), dst = out->view();
  launch("cast", t.device(), {[=](ThreadPool& pool) { copy_cpu(src, dst, pool); }, TK_CUDA(copy_cuda(src, dst, stream))});
  return out;
}

TensorPtr reshape(const Tensor& t, const std::vector<int64_t>& shape) {
  check_shape("reshape", shape, t.dtype());
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  TK_CHECK(n == t.numel(), "reshape: cannot view ", t.describe(), " (", t.numel(), " elements) as ",
           shape_str(shape), " (", n, " elements)");
  return std::make_unique<Tensor>(t.storage(), t.dtype(), shape);
}

TensorPtr permute(const Tensor& t, const std::vector<int>& perm) {
  int nd = int(t.shape().size());
  TK_CHECK(int(perm.size()) == nd, "permute: ", perm.size(), " axes given for ", t.describe(), " of rank ", nd);
  std::vector<bool> seen(size_t(nd), false);
  std::vector<int64_t> out_shape(static_cast<size_t>(nd));
  TensorView src = t.view();
  TensorView strided = src;
  for (int i = 0; i < nd; ++i) {
    int a = normalize_axis("permute", perm[size_t(i)], nd, t.shape());
    TK_CHECK(!seen[size_t(a)], "permute: axis ", a, " appears twice in the permutation");
    seen[size_t(a)] = true;
    out_shape[size_t(i)] = t.shape()[size_t(a)];
    strided.shape[i] = src.shape[a];
    strided.strides[i] = src.strides[a];
  }
  TensorPtr out = empty(out_shape, t.dtype(), t.device());
  TensorView dst = out->view();
  launch("permute", t.device(), {[=](ThreadPool& pool) { copy_cpu(strided, dst, pool); }, TK_CUDA(copy_cuda(strided, dst, stream))});
  return out;
}

TensorPtr concat(const std::vector<const Tensor*>& tensors, int axis) {
  const char* op = "concat";
  TK_CHECK(!tensors.empty(), op, ": needs at least one tensor");
  const Tensor& first = *tensors[0];
  const int nd = int(first.shape().size());
  TK_CHECK(nd > 0, op, ": cannot join scalars; reshape them to [1] first");
  const int a = normalize_axis(op, axis, nd, first.shape());
  std::vector<int64_t> out_shape = first.shape();
  out_shape[size_t(a)] = 0;
  std::vector<TensorView> views;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = *tensors[i];
    same_device(op, first, t);
    same_dtype(op, first, t);
    bool ok = int(t.shape().size()) == nd;
    for (int d = 0; ok && d < nd; ++d) ok = d == a || t.shape()[size_t(d)] == first.shape()[size_t(d)];
    TK_CHECK(ok, op, ": tensor ", i, " ", t.describe(), " does not match ", first.describe(), " off axis ", a);
    out_shape[size_t(a)] += t.shape()[size_t(a)];
    views.push_back(t.view());
  }
  check_shape(op, out_shape, first.dtype());
  TensorPtr out = empty(out_shape, first.dtype(), first.device());
  TensorView ov = out->view();
  launch(op, first.device(), {[=](ThreadPool& pool) {
                                concat_cpu(views.data(), int(views.size()), a, ov, pool);
                              },
                              TK_CUDA(concat_cuda(views.data(), int(views.size()), a, ov, stream))});
  return out;
}

TensorPtr narrow(const Tensor& x, int axis, int64_t start, int64_t length) {
  const char* op = "narrow";
  const int nd = int(x.shape().size());
  TK_CHECK(nd > 0, op, ": x ", x.describe(), " has no axis to narrow");
  const int a = normalize_axis(op, axis, nd, x.shape());
  const int64_t size = x.shape()[size_t(a)];
  TK_CHECK(start >= 0 && length >= 0 && start + length <= size, op, ": [", start, ", ", start + length,
           ") is outside axis ", a, " of ", x.describe());
  std::vector<int64_t> out_shape = x.shape();
  out_shape[size_t(a)] = length;
  TensorView src = x.view();
  TensorView strided = src;
  strided.shape[a] = length;
  strided.data = static_cast<char*>(src.data) + size_t(start * src.strides[a]) * dtype_size(x.dtype());
  TensorPtr out = empty(out_shape, x.dtype(), x.device());
  TensorView dst = out->view();
  launch(op, x.device(), {[=](ThreadPool& pool) { copy_cpu(strided, dst, pool); }, TK_CUDA(copy_cuda(strided, dst, stream))});
  return out;
}

TensorPtr matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  const char* op = "matmul";
  same_device(op, a, b);
  same_dtype(op, a, b);
  TK_CHECK(a.dtype() == DType::F32 || a.dtype() == DType::BF16, op, ": dtype ", dtype_name(a.dtype()),
           " is not supported; use f32 or bf16 (cast with t.to('f32'))");
  const auto &as = a.shape(), &bs = b.shape();
  TK_CHECK(as.size() >= 2 && bs.size() >= 2, op, ": operands need at least 2 dimensions, got a ", a.describe(),
           " and b ", b.describe(), "; reshape vectors to [1, n] or [n, 1]");
  size_t ra = as.size(), rb = bs.size();
  int64_t M = trans_a ? as[ra - 1] : as[ra - 2];
  int64_t Ka = trans_a ? as[ra - 2] : as[ra - 1];
  int64_t Kb = trans_b ? bs[rb - 1] : bs[rb - 2];
  int64_t N = trans_b ? bs[rb - 2] : bs[rb - 1];
  TK_CHECK(Ka == Kb, op, ": inner dimensions differ: a ", shape_str(as), trans_a ? " (transposed)" : "", " has K=", Ka,
           ", b ", shape_str(bs), trans_b ? " (transposed)" : "", " has K=", Kb);
  std::vector<int64_t> batch_a(as.begin(), as.end() - 2), batch_b(bs.begin(), bs.end() - 2);
  TK_CHECK(batch_a == batch_b || batch_a.empty() || batch_b.empty(), op, ": batch dimensions of a ", shape_str(as),
           " and b ", shape_str(bs), " must be equal, or one operand must be 2-D");
  const std::vector<int64_t>& batch_shape = batch_a.empty() ? batch_b : batch_a;
  int64_t batch = 1;
  for (int64_t d : batch_shape) batch *= d;
  std::vector<int64_t> out_shape = batch_shape;
  out_shape.push_back(M);
  out_shape.push_back(N);
  TensorPtr out = empty(out_shape, a.dtype(), a.device());

  GemmParams p;
  p.batch = batch;
  p.M = M;
  p.N = N;
  p.K = Ka;
  p.ab_dtype = a.dtype();
  p.c_dtype = a.dtype();
  p.A = a.storage()->ptr;
  p.lda = as[ra - 1];
  p.batch_stride_a = batch_a.empty() ? 0 : as[ra - 1] * as[ra - 2];
  p.trans_a = trans_a;
  p.B = b.storage()->ptr;
  p.ldb = bs[rb - 1];
  p.batch_stride_b = batch_b.empty() ? 0 : bs[rb - 1] * bs[rb - 2];
  p.trans_b = trans_b;
  p.C = out->storage()->ptr;
  p.ldc = N;
  p.batch_stride_c = M * N;
  // A batch of row-major A against one shared B is a single taller GEMM: [batch*M, K] x B.
  if (!trans_a && batch > 1 && p.batch_stride_b == 0) {
    p.M = batch * M;
    p.batch = 1;
    p.batch_stride_a = p.batch_stride_c = 0;
  }
  launch(op, a.device(), {[=](ThreadPool& pool) { gemm_cpu(p, pool); }, TK_CUDA(gemm_cuda(p, stream))});
  return out;
}

TensorPtr binary(BinaryOp kind, const Tensor& a, const Tensor& b) {
  const char* op = kind == BinaryOp::Add ? "add" : kind == BinaryOp::Sub ? "sub" : "mul";
  same_device(op, a, b);
  same_dtype(op, a, b);
  TK_CHECK(a.dtype() != DType::U8, op, ": dtype u8 is not supported; cast with t.to('i32') or t.to('f32')");
  const auto &as = a.shape(), &bs = b.shape();
  size_t nd = std::max(as.size(), bs.size());
  std::vector<int64_t> out_shape(nd);
  TensorView av = a.view(), bv = b.view();
  TensorView ax = av, bx = bv;
  ax.ndim = bx.ndim = int(nd);
  for (size_t i = 0; i < nd; ++i) {
    // Align from the right; missing leading dims are size 1.
    int ia = int(i) - int(nd - as.size()), ib = int(i) - int(nd - bs.size());
    int64_t da = ia >= 0 ? as[size_t(ia)] : 1, db = ib >= 0 ? bs[size_t(ib)] : 1;
    TK_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", shape_str(as), " and ", shape_str(bs),
             " do not broadcast (dimension ", i, ": ", da, " vs ", db, ")");
    int64_t d = da == 1 ? db : da;
    out_shape[i] = d;
    ax.shape[i] = bx.shape[i] = d;
    ax.strides[i] = (ia >= 0 && da != 1) ? av.strides[ia] : 0;
    bx.strides[i] = (ib >= 0 && db != 1) ? bv.strides[ib] : 0;
  }
  TensorPtr out = empty(out_shape, a.dtype(), a.device());
  TensorView ov = out->view();
  launch(op, a.device(), {[=](ThreadPool& pool) { binary_cpu(kind, ax, bx, ov, pool); }, TK_CUDA(binary_cuda(kind, ax, bx, ov, stream))});
  return out;
}

TensorPtr scale(const Tensor& x, double alpha) {
  TK_CHECK(is_floating(x.dtype()), "scale: dtype ", dtype_name(x.dtype()),
           " is not a floating type; cast with t.to('f32')");
  TensorPtr out = empty(x.shape(), x.dtype(), x.device());
  TensorView xv = x.view(), ov = out->view();
  launch("scale", x.device(), {[=](ThreadPool& pool) { scale_cpu(xv, float(alpha), ov, pool); }, TK_CUDA(scale_cuda(xv, float(alpha), ov, stream))});
  return out;
}

TensorPtr scale_by_inplace(const Tensor& x, const Tensor& s) {
  const char* op = "scaleByInplace";
  TK_CHECK(is_floating(x.dtype()), op, ": x ", x.describe(), " must be floating");
  TK_CHECK(s.dtype() == DType::F32 && s.numel() == 1, op, ": the scale ", s.describe(), " must be one f32 value");
  same_device(op, x, s);
  TensorView xv = x.view();
  const float* sp = static_cast<const float*>(s.storage()->ptr);
  std::shared_ptr<Storage> keep = s.storage();  // the scale may be disposed before the kernel runs
  launch(op, x.device(), {[=](ThreadPool& pool) {
                            float value = *sp;
                            (void)keep;
                            scale_cpu(xv, value, xv, pool);
                          },
                          TK_CUDA((void)keep; scale_by_device_scalar_cuda(xv, sp, stream))});
  return reshape(x, x.shape());
}

TensorPtr dropout(const Tensor& x, double p, uint64_t seed) {
  TK_CHECK(is_floating(x.dtype()), "dropout: dtype ", dtype_name(x.dtype()), " is not a floating type; cast with t.to('f32')");
  TK_CHECK(p >= 0 && p < 1, "dropout: p must be in [0, 1), got ", p);
  TensorPtr out = empty(x.shape(), x.dtype(), x.device());
  TensorView xv = x.view(), ov = out->view();
  launch("dropout", x.device(), {[=](ThreadPool& pool) { dropout_cpu(xv, float(p), seed, ov, pool); }, TK_CUDA(dropout_cuda(xv, float(p), seed, ov, stream))});
  return out;
}

TensorPtr sum(const Tensor& x, const std::vector<int>& axes, bool keepdim) {
  const char* op = "sum";
  TK_CHECK(x.dtype() != DType::U8, op, ": dtype u8 is not supported; cast with t.to('i32')");
  int nd = int(x.shape().size());
  uint32_t mask = 0;
  if (axes.empty()) {
    mask = nd ? (uint32_t(1) << nd) - 1 : 0;
  } else {
    for (int axis : axes) {
      int a = normalize_axis(op, axis, nd, x.shape());
      TK_CHECK(!(mask & (1u << a)), op, ": axis ", a, " is listed twice");
      mask |= 1u << a;
    }
  }
  std::vector<int64_t> kept(x.shape()), out_shape;
  for (int i = 0; i < nd; ++i) {
    if (mask & (1u << i)) {
      kept[size_t(i)] = 1;
      if (keepdim) out_shape.push_back(1);
    } else {
      out_shape.push_back(x.shape()[size_t(i)]);
    }
  }
  TensorPtr out = empty(out_shape, x.dtype(), x.device());
  // The kernel writes the keepdim layout; the output shape without reduced axes has the same bytes.
  TensorView xv = x.view(), ov = make_view(out->storage()->ptr, x.dtype(), x.device(), kept);
  launch(op, x.device(), {[=](ThreadPool& pool) { sum_cpu(xv, mask, ov, pool); }, TK_CUDA(sum_cuda(xv, mask, ov, stream))});
  return out;
}

namespace {

void check_float_storage(const char* op, const char* name, const Tensor& t) {
  TK_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::BF16, op, ": ", name, " ", t.describe(),
           " must be f32 or bf16; cast with t.to('f32')");
}

}  // namespace

TensorPtr rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  // The saved 1/rms is dropped after use (its release is queued behind the kernel).
  return rms_norm_train(x, weight, eps).y;
}

RmsNormSaved rms_norm_train(const Tensor& x, const Tensor& weight, double eps) {
  const char* op = "rmsNorm";
  same_device(op, x, weight);
  same_dtype(op, x, weight);
  check_float_storage(op, "x", x);
  const auto& xs = x.shape();
  TK_CHECK(!xs.empty() && xs.back() > 0, op, ": x ", x.describe(), " needs a non-empty last axis to normalize");
  TK_CHECK(weight.shape().size() == 1 && weight.shape()[0] == xs.back(), op, ": weight ", weight.describe(),
           " must be [", xs.back(), "] to match the last axis of x ", x.describe());
  TK_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  RmsNormSaved r;
  r.y = empty(xs, x.dtype(), x.device());
  r.rstd = empty({x.numel() / xs.back()}, DType::F32, x.device());
  TensorView xv = x.view(), wv = weight.view(), ov = r.y->view(), rv = r.rstd->view();
  launch(op, x.device(), {[=](ThreadPool& pool) { rms_norm_forward_cpu(xv, wv, float(eps), ov, rv, pool); }, TK_CUDA(rms_norm_forward_cuda(xv, wv, float(eps), ov, rv, stream))});
  return r;
}

TensorPtr swiglu(const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu";
  same_device(op, gate, up);
  same_dtype(op, gate, up);
  check_float_storage(op, "gate", gate);
  TK_CHECK(gate.shape() == up.shape(), op, ": gate ", gate.describe(), " and up ", up.describe(),
           " must have the same shape");
  TensorPtr out = empty(gate.shape(), gate.dtype(), gate.device());
  TensorView gv = gate.view(), uv = up.view(), ov = out->view();
  launch(op, gate.device(), {[=](ThreadPool& pool) { swiglu_forward_cpu(gv, uv, ov, pool); }, TK_CUDA(swiglu_forward_cuda(gv, uv, ov, stream))});
  return out;
}

TensorPtr embedding(const Tensor& ids, const Tensor& table) {
  const char* op = "embedding";
  same_device(op, ids, table);
  TK_CHECK(ids.dtype() == DType::I32, op, ": ids ", ids.describe(), " must be i32");
  check_float_storage(op, "table", table);
  TK_CHECK(table.shape().size() == 2 && table.shape()[1] > 0, op, ": table ", table.describe(),
           " must be [V, D] with D > 0");
  std::vector<int64_t> out_shape = ids.shape();
  out_shape.push_back(table.shape()[1]);
  check_shape(op, out_shape, table.dtype());
  TensorPtr out = empty(out_shape, table.dtype(), table.device());
  TensorView iv = ids.view(), tv = table.view(), ov = out->view();
  launch(op, ids.device(), {[=](ThreadPool& pool) { embedding_forward_cpu(iv, tv, ov, pool); }, TK_CUDA(embedding_forward_cuda(iv, tv, ov, stream))});
  return out;
}

namespace {

// rope() and its transpose share everything but the sign of the angle.
TensorPtr rope_apply(const Tensor& x, const Tensor* positions, double theta, const RopeScaling& scaling, bool inverse) {
  const char* op = inverse ? "rope (backward)" : "rope";
  check_float_storage(op, "x", x);
  const auto& xs = x.shape();
  TK_CHECK(xs.size() == 4, op, ": x ", x.describe(), " must be [B, T, H, D]");
  const int64_t B = xs[0], T = xs[1], D = xs[3];
  TK_CHECK(D >= 2 && D % 2 == 0, op, ": the head dim of x ", x.describe(), " must be even (the rotation pairs i with i + D/2)");
  TK_CHECK(std::isfinite(theta) && theta > 1, op, ": theta must be a finite number > 1, got ", theta);
  // Checks the scaling parameters now, so that bad ones throw here rather than in the queue.
  RopeFrequencies freqs = rope_inv_freq(D, theta, scaling, T);
  TensorPtr default_positions;
  if (!positions) {
    std::vector<int32_t> seq(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) seq[size_t(t)] = int32_t(t);
    default_positions = from_host(seq.data(), seq.size() * sizeof(int32_t), {T}, DType::I32, x.device());
    positions = default_positions.get();
  }
  same_device(op, x, *positions);
  TK_CHECK(positions->dtype() == DType::I32, op, ": positions ", positions->describe(), " must be i32");
  const auto& ps = positions->shape();
  bool per_batch = ps.size() == 2;
  TK_CHECK((ps.size() == 1 && ps[0] == T) || (per_batch && ps[0] == B && ps[1] == T), op, ": positions ",
           positions->describe(), " must be [", T, "] or [", B, ", ", T, "] for x ", x.describe());
  TensorPtr out = empty(xs, x.dtype(), x.device());
  TensorView xv = x.view(), pv = positions->view(), ov = out->view();
  const bool dynamic = scaling.type == RopeScaling::Dynamic;
#ifdef TUNEKIT_WITH_CUDA
  if (x.device().type == DeviceType::CUDA) {
    // Dynamic NTK needs the longest position on the host: read the positions (this waits for the
    // work that produces them).
    RopeFrequencies f = freqs;
    if (dynamic) {
      std::vector<uint8_t> bytes = read_sync(*positions);
      const int32_t* p = reinterpret_cast<const int32_t*>(bytes.data());
      int64_t longest = 0;
      for (size_t i = 0; i < bytes.size() / 4; ++i) longest = std::max<int64_t>(longest, int64_t(p[i]) + 1);
      f = rope_inv_freq(D, theta, scaling, longest);
    }
    auto cuda_kernel = inverse ? rope_backward_cuda : rope_forward_cuda;
    launch(op, x.device(), {nullptr, TK_CUDA(cuda_kernel(xv, pv, per_batch, f.inv_freq, f.attention_factor, ov, stream))});
    return out;
  }
#endif
  auto kernel = inverse ? rope_backward_cpu : rope_forward_cpu;
  launch(op, x.device(), {[=, freqs = std::move(freqs)](ThreadPool& pool) {
                            if (!dynamic) return kernel(xv, pv, per_batch, freqs.inv_freq, freqs.attention_factor, ov, pool);
                            // Dynamic NTK depends on the longest position, known once the positions are.
                            const int32_t* p = pv.ptr<int32_t>();
                            int64_t n = pv.numel(), longest = 0;
                            for (int64_t i = 0; i < n; ++i) longest = std::max<int64_t>(longest, int64_t(p[i]) + 1);
                            RopeFrequencies f = rope_inv_freq(D, theta, scaling, longest);
                            kernel(xv, pv, per_batch, f.inv_freq, f.attention_factor, ov, pool);
                          },
                          TK_CUDA_ELSEWHERE});
  return out;
}

}  // namespace

TensorPtr rope(const Tensor& x, const Tensor* positions, double theta, const RopeScaling& scaling) {
  return rope_apply(x, positions, theta, scaling, false);
}

TensorPtr rope_backward(const Tensor& dy, const Tensor* positions, double theta, const RopeScaling& scaling) {
  return rope_apply(dy, positions, theta, scaling, true);
}

TensorPtr attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                    const Tensor* segment_ids, const Tensor* key_segment_ids) {
  // The log-sum-exp a backward pass would reuse is released after the kernel, in queue order.
  return attention_train(q, k, v, causal, scale, segment_ids, key_segment_ids).out;
}

namespace {

void check_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                     const Tensor* segment_ids, const Tensor* key_segment_ids) {
  same_device(op, q, k);
  same_device(op, q, v);
  same_dtype(op, q, k);
  same_dtype(op, q, v);
  check_float_storage(op, "q", q);
  const auto &qs = q.shape(), &ks = k.shape();
  TK_CHECK(qs.size() == 4 && ks.size() == 4, op, ": q ", q.describe(), " must be [B, T, H, D] and k ", k.describe(),
           " [B, S, Hkv, D]");
  TK_CHECK(k.shape() == v.shape(), op, ": k ", k.describe(), " and v ", v.describe(), " must have the same shape");
  TK_CHECK(ks[0] == qs[0] && ks[3] == qs[3], op, ": q ", q.describe(), " and k ", k.describe(),
           " must agree on batch (axis 0) and head dim (axis 3)");
  TK_CHECK(ks[2] > 0 && qs[2] % ks[2] == 0, op, ": q's ", qs[2], " heads must be a multiple of k's ", ks[2],
           " heads (grouped-query attention)");
  TK_CHECK(std::isfinite(scale), op, ": scale must be finite");
  const int64_t B = qs[0], T = qs[1], S = ks[1];
  if (segment_ids) {
    same_device(op, q, *segment_ids);
    const std::vector<int64_t> want{B, T};
    TK_CHECK(segment_ids->dtype() == DType::I32 && segment_ids->shape() == want, op,
             ": segmentIds ", segment_ids->describe(), " must be i32 [", B, ", ", T, "]");
    if (key_segment_ids) {
      same_device(op, q, *key_segment_ids);
      const std::vector<int64_t> want_k{B, S};
      TK_CHECK(key_segment_ids->dtype() == DType::I32 && key_segment_ids->shape() == want_k, op, ": keySegmentIds ",
               key_segment_ids->describe(), " must be i32 [", B, ", ", S, "]");
    } else {
      TK_CHECK(S == T, op, ": segmentIds need as many keys as queries (S == T), got T = ", T, ", S = ", S,
               "; pass keySegmentIds for the keys");
    }
  } else {
    TK_CHECK(!key_segment_ids, op, ": keySegmentIds need segmentIds for the queries");
  }
}

}  // namespace

AttentionSaved attention_train(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                               const Tensor* segment_ids, const Tensor* key_segment_ids) {
  const char* op = "attention";
  check_attention(op, q, k, v, scale, segment_ids, key_segment_ids);
  const auto& qs = q.shape();
  AttentionSaved r;
  r.out = empty(qs, q.dtype(), q.device());
  r.lse = empty({qs[0], qs[2], qs[1]}, DType::F32, q.device());
  TensorView qv = q.view(), kv = k.view(), vv = v.view(), ov = r.out->view(), lv = r.lse->view();
  bool has_seg = segment_ids != nullptr, has_kseg = key_segment_ids != nullptr;
  TensorView sv = has_seg ? segment_ids->view() : TensorView{};
  TensorView ksv = has_kseg ? key_segment_ids->view() : TensorView{};
  AttentionOptions opt;
  opt.causal = causal;
  opt.scale = float(scale > 0 ? scale : 0.0);
  launch(op, q.device(), {[=](ThreadPool& pool) {
                            attention_forward_cpu(qv, kv, vv, has_seg ? &sv : nullptr, has_kseg ? &ksv : nullptr, opt, ov,
                                                  lv, pool);
                          },
                          TK_CUDA(attention_forward_cuda(qv, kv, vv, has_seg ? &sv : nullptr, has_kseg ? &ksv : nullptr, opt, ov, lv, stream))});
  return r;
}

namespace {

// Checks logits [..., V] against targets [...] and returns (rows N, vocabulary V).
std::pair<int64_t, int64_t> check_logits(const char* op, const Tensor& logits, const Tensor& targets) {
  same_device(op, logits, targets);
  check_float_storage(op, "logits", logits);
  TK_CHECK(targets.dtype() == DType::I32, op, ": targets ", targets.describe(), " must be i32");
  const auto& ls = logits.shape();
  TK_CHECK(!ls.empty() && ls.back() > 0, op, ": logits ", logits.describe(), " need a non-empty vocabulary axis");
  std::vector<int64_t> rows(ls.begin(), ls.end() - 1);
  TK_CHECK(targets.shape() == rows, op, ": targets ", targets.describe(), " must have logits' shape without the vocabulary axis, ",
           shape_str(rows));
  return {logits.numel() / ls.back(), ls.back()};
}

}  // namespace

TensorPtr cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index, LossReduction reduction) {
  return cross_entropy_train(logits, targets, ignore_index, reduction).loss;
}

LossSaved cross_entropy_train(const Tensor& logits, const Tensor& targets, int32_t ignore_index, LossReduction reduction) {
  const char* op = "crossEntropy";
  auto [N, V] = check_logits(op, logits, targets);
  (void)V;
  TensorPtr losses = empty(targets.shape(), DType::F32, logits.device());
  TensorPtr lse = empty({N}, DType::F32, logits.device());
  TensorPtr loss = reduction == LossReduction::None ? nullptr : empty({}, DType::F32, logits.device());
  TensorView lv = logits.view(), tv = targets.view(), losv = losses->view(), lsev = lse->view();
  TensorView outv = loss ? loss->view() : TensorView{};
  launch(op, logits.device(), {[=](ThreadPool& pool) {
                                 cross_entropy_forward_cpu(lv, tv, ignore_index, reduction, losv, lsev, outv, pool);
                               },
                               TK_CUDA(cross_entropy_forward_cuda(lv, tv, ignore_index, reduction, losv, lsev, outv, stream))});
  return {loss ? std::move(loss) : std::move(losses), std::move(lse)};
}

TensorPtr sequence_logprobs(const Tensor& logits, const Tensor& targets, int32_t ignore_index) {
  return sequence_logprobs_train(logits, targets, ignore_index).loss;
}

LossSaved sequence_logprobs_train(const Tensor& logits, const Tensor& targets, int32_t ignore_index) {
  const char* op = "sequenceLogprobs";
  TK_CHECK(logits.shape().size() == 3, op, ": logits ", logits.describe(), " must be [B, T, V]");
  auto [N, V] = check_logits(op, logits, targets);
  (void)V;
  TensorPtr out = empty({logits.shape()[0]}, DType::F32, logits.device());
  TensorPtr lse = empty({N}, DType::F32, logits.device());
  TensorView lv = logits.view(), tv = targets.view(), ov = out->view(), lsev = lse->view();
  launch(op, logits.device(), {[=](ThreadPool& pool) {
                                 sequence_logprobs_forward_cpu(lv, tv, ignore_index, ov, lsev, pool);
                               },
                               TK_CUDA(sequence_logprobs_forward_cuda(lv, tv, ignore_index, ov, lsev, stream))});
  return {std::move(out), std::move(lse)};
}

namespace {

void check_dpo(const char* op, const Tensor& policy_chosen, const Tensor& policy_rejected, const Tensor& ref_chosen,
               const Tensor& ref_rejected, const DpoParams& params) {
  const Tensor* all[] = {&policy_chosen, &policy_rejected, &ref_chosen, &ref_rejected};
  const char* names[] = {"policyChosen", "policyRejected", "refChosen", "refRejected"};
  for (int i = 0; i < 4; ++i) {
    same_device(op, policy_chosen, *all[i]);
    TK_CHECK(all[i]->dtype() == DType::F32 && all[i]->shape().size() == 1 && all[i]->shape() == policy_chosen.shape(),
             op, ": ", names[i], " ", all[i]->describe(), " must be f32 [B] like policyChosen ", policy_chosen.describe());
  }
  TK_CHECK(std::isfinite(params.beta) && params.beta > 0, op, ": beta must be a finite number > 0, got ", params.beta);
  TK_CHECK(params.label_smoothing >= 0 && params.label_smoothing <= 0.5, op,
           ": labelSmoothing must be in [0, 0.5], got ", params.label_smoothing);
  TK_CHECK(policy_chosen.shape()[0] > 0, op, ": needs at least one preference pair");
}

}  // namespace

DpoResult dpo_loss(const Tensor& policy_chosen, const Tensor& policy_rejected, const Tensor& ref_chosen,
                   const Tensor& ref_rejected, const DpoParams& params) {
  const char* op = "dpoLoss";
  check_dpo(op, policy_chosen, policy_rejected, ref_chosen, ref_rejected, params);
  const int64_t B = policy_chosen.shape()[0];
  TensorPtr losses = empty({B}, DType::F32, policy_chosen.device());
  DpoResult r;
  r.chosen_rewards = empty({B}, DType::F32, policy_chosen.device());
  r.rejected_rewards = empty({B}, DType::F32, policy_chosen.device());
  TensorView pc = policy_chosen.view(), pr = policy_rejected.view(), rc = ref_chosen.view(), rr = ref_rejected.view();
  TensorView lv = losses->view(), cv = r.chosen_rewards->view(), jv = r.rejected_rewards->view();
  launch(op, policy_chosen.device(), {[=](ThreadPool&) { dpo_loss_forward_cpu(pc, pr, rc, rr, params, lv, cv, jv); }, TK_CUDA(dpo_loss_forward_cuda(pc, pr, rc, rr, params, lv, cv, jv, stream))});
  TensorPtr total = sum(*losses, {}, false);
  r.loss = scale(*total, 1.0 / double(B));
  return r;
}

namespace {

void check_distill(const char* op, const Tensor& student, const Tensor& teacher, const Tensor* targets,
                   const DistillParams& params) {
  same_device(op, student, teacher);
  check_float_storage(op, "student", student);
  check_float_storage(op, "teacher", teacher);
  TK_CHECK(student.shape() == teacher.shape(), op, ": student ", student.describe(), " and teacher ", teacher.describe(),
           " must have the same shape (a teacher with another vocabulary cannot be distilled token by token)");
  TK_CHECK(!student.shape().empty() && student.shape().back() > 0, op, ": logits ", student.describe(),
           " need a non-empty vocabulary axis");
  TK_CHECK(std::isfinite(params.temperature) && params.temperature > 0, op, ": temperature must be a finite number > 0, got ",
           params.temperature);
  TK_CHECK(params.beta >= 0 && params.beta <= 1, op, ": beta must be in [0, 1], got ", params.beta);
  if (targets) check_logits(op, student, *targets);
}

}  // namespace

TensorPtr distill_loss(const Tensor& student, const Tensor& teacher, const Tensor* targets, const DistillParams& params) {
  const char* op = "distillLoss";
  check_distill(op, student, teacher, targets, params);
  const int64_t N = student.numel() / student.shape().back();
  TensorPtr losses = empty({N}, DType::F32, student.device());
  TensorPtr loss = empty({}, DType::F32, student.device());
  TensorView sv = student.view(), tv = teacher.view(), lv = losses->view(), ov = loss->view();
  TensorView gv = targets ? targets->view() : TensorView{};
  launch(op, student.device(), {[=](ThreadPool& pool) { distill_forward_cpu(sv, tv, gv, params, lv, ov, pool); }, TK_CUDA(distill_forward_cuda(sv, tv, gv, params, lv, ov, stream))});
  return loss;
}

Nf4Tensors nf4_quantize(const Tensor& w, int64_t block_size, bool double_quant) {
  const char* op = "nf4.quantize";
  check_float_storage(op, "w", w);
  TK_CHECK(block_size >= 2 && block_size <= (int64_t(1) << 24) && block_size % 2 == 0, op,
           ": blockSize must be an even number from 2 to 2^24, got ", block_size);
  TK_CHECK(w.numel() > 0, op, ": w ", w.describe(), " is empty");
  Nf4Layout L = nf4_layout(w.numel(), block_size, double_quant);
  Device dev = w.device();
  Nf4Tensors q;
  q.packed = empty({L.packed_bytes}, DType::U8, dev);
  q.absmax = double_quant ? empty({L.nblocks}, DType::U8, dev) : empty({L.nblocks}, DType::F32, dev);
  if (double_quant) {
    q.scale2 = empty({L.nblocks2}, DType::F32, dev);
    q.offset = empty({}, DType::F32, dev);
  }
  Nf4Out out{static_cast<uint8_t*>(q.packed->storage()->ptr),
             double_quant ? nullptr : static_cast<float*>(q.absmax->storage()->ptr),
             double_quant ? static_cast<uint8_t*>(q.absmax->storage()->ptr) : nullptr,
             double_quant ? static_cast<float*>(q.scale2->storage()->ptr) : nullptr,
             double_quant ? static_cast<float*>(q.offset->storage()->ptr) : nullptr};
  const void* src = w.storage()->ptr;
  DType dt = w.dtype();
  int64_t n = w.numel();
  launch(op, dev, {[=](ThreadPool& pool) { nf4_quantize_cpu(src, dt, n, block_size, double_quant, out, pool); }, TK_CUDA(nf4_quantize_cuda(src, dt, n, block_size, double_quant, out, stream))});
  return q;
}

TensorPtr nf4_dequantize(const Tensor& packed, const Tensor& absmax, const Tensor* scale2, const Tensor* offset,
                         const std::vector<int64_t>& shape, int64_t block_size, bool double_quant, DType out_dtype) {
  const char* op = "nf4.dequantize";
  check_shape(op, shape, out_dtype);
  TK_CHECK(out_dtype == DType::F32 || out_dtype == DType::BF16, op, ": dtype must be f32 or bf16");
  TK_CHECK(block_size >= 2 && block_size % 2 == 0, op, ": blockSize must be even, got ", block_size);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  TK_CHECK(n > 0, op, ": shape ", shape_str(shape), " is empty");
  Nf4Layout L = nf4_layout(n, block_size, double_quant);
  auto expect = [&](const Tensor* t, const char* name, DType dt, int64_t count) {
    TK_CHECK(t && t->dtype() == dt && t->numel() == count && t->device() == packed.device(), op, ": ", name, " ",
             t ? t->describe() : std::string("(missing)"), " does not fit a ", shape_str(shape), " weight with blockSize ",
             block_size, double_quant ? " and double quantization" : "", ": expected ", count, " ", dtype_name(dt));
  };
  expect(&packed, "packed", DType::U8, L.packed_bytes);
  expect(&absmax, "absmax", double_quant ? DType::U8 : DType::F32, L.nblocks);
  if (double_quant) {
    expect(scale2, "scale2", DType::F32, L.nblocks2);
    expect(offset, "offset", DType::F32, 1);
  }
  Device dev = packed.device();
  TensorPtr out = empty(shape, out_dtype, dev);
  Nf4In in{static_cast<const uint8_t*>(packed.storage()->ptr),
           double_quant ? nullptr : static_cast<const float*>(absmax.storage()->ptr),
           double_quant ? static_cast<const uint8_t*>(absmax.storage()->ptr) : nullptr,
           double_quant ? static_cast<const float*>(scale2->storage()->ptr) : nullptr,
           double_quant ? static_cast<const float*>(offset->storage()->ptr) : nullptr};
  void* dst = out->storage()->ptr;
  launch(op, dev, {[=](ThreadPool& pool) { nf4_dequantize_cpu(in, n, block_size, double_quant, dst, out_dtype, pool); }, TK_CUDA(nf4_dequantize_cuda(in, n, block_size, double_quant, dst, out_dtype, stream))});
  return out;
}

// ---- training ---------------------------------------------------------------------------------------

namespace {

// A gradient must come back in the shape, dtype and device of what it is the gradient of.
void check_grad(const char* op, const char* name, const Tensor& grad, const Tensor& like) {
  TK_CHECK(grad.shape() == like.shape() && grad.device() == like.device(), op, ": gradient ", name, " ",
           grad.describe(), " must match ", like.describe());
  TK_CHECK(grad.dtype() == like.dtype() || like.dtype() == DType::F32 || grad.dtype() == DType::F32, op,
           ": gradient ", name, " ", grad.describe(), " has the wrong dtype for ", like.describe());
}

// An f32 gradient in `dtype` (a no-op cast for f32: the same tensor comes back).
TensorPtr to_dtype(TensorPtr t, DType dtype) { return t->dtype() == dtype ? std::move(t) : cast(*t, dtype); }

void check_scalar_grad(const char* op, const Tensor& dloss) {
  TK_CHECK(dloss.dtype() == DType::F32 && dloss.numel() == 1, op, ": the upstream gradient ", dloss.describe(),
           " must be one f32 value");
}

}  // namespace

TensorPtr broadcast_to(const Tensor& x, const std::vector<int64_t>& shape) {
  const char* op = "broadcastTo";
  check_shape(op, shape, x.dtype());
  const auto& xs = x.shape();
  TK_CHECK(xs.size() <= shape.size(), op, ": cannot broadcast ", x.describe(), " to the lower-rank ", shape_str(shape));
  TensorView src = x.view(), strided = make_view(nullptr, x.dtype(), x.device(), shape);
  strided.data = src.data;
  const size_t lead = shape.size() - xs.size();
  for (size_t i = 0; i < shape.size(); ++i) {
    int64_t d = i < lead ? 1 : xs[i - lead];
    TK_CHECK(d == shape[i] || d == 1, op, ": cannot broadcast ", x.describe(), " to ", shape_str(shape), " (dimension ",
             i, ": ", d, " vs ", shape[i], ")");
    strided.strides[i] = (i < lead || d == 1) ? 0 : src.strides[i - lead];
  }
  TensorPtr out = empty(shape, x.dtype(), x.device());
  TensorView dst = out->view();
  launch(op, x.device(), {[=](ThreadPool& pool) { copy_cpu(strided, dst, pool); }, TK_CUDA(copy_cuda(strided, dst, stream))});
  return out;
}

Grads2 rms_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd) {
  const char* op = "rmsNorm (backward)";
  check_grad(op, "dy", dy, x);
  TK_CHECK(dy.dtype() == x.dtype(), op, ": dy ", dy.describe(), " must have x's dtype");
  TK_CHECK(rstd.dtype() == DType::F32 && rstd.numel() * x.shape().back() == x.numel(), op, ": rstd ", rstd.describe(),
           " does not come from rmsNorm of ", x.describe());
  Grads2 g;
  g.a = empty(x.shape(), x.dtype(), x.device());
  TensorPtr dw = empty(weight.shape(), DType::F32, x.device());
  TensorView dyv = dy.view(), xv = x.view(), wv = weight.view(), rv = rstd.view(), dxv = g.a->view(), dwv = dw->view();
  launch(op, x.device(), {[=](ThreadPool& pool) { rms_norm_backward_cpu(dyv, xv, wv, rv, dxv, dwv, pool); }, TK_CUDA(rms_norm_backward_cuda(dyv, xv, wv, rv, dxv, dwv, stream))});
  g.b = to_dtype(std::move(dw), weight.dtype());
  return g;
}

Grads2 swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu (backward)";
  check_grad(op, "dout", dout, gate);
  TK_CHECK(dout.dtype() == gate.dtype(), op, ": dout ", dout.describe(), " must have gate's dtype");
  Grads2 g;
  g.a = empty(gate.shape(), gate.dtype(), gate.device());
  g.b = empty(up.shape(), up.dtype(), up.device());
  TensorView dv = dout.view(), gv = gate.view(), uv = up.view(), dgv = g.a->view(), duv = g.b->view();
  launch(op, gate.device(), {[=](ThreadPool& pool) { swiglu_backward_cpu(dv, gv, uv, dgv, duv, pool); }, TK_CUDA(swiglu_backward_cuda(dv, gv, uv, dgv, duv, stream))});
  return g;
}

TensorPtr embedding_backward(const Tensor& dout, const Tensor& ids, int64_t vocab, DType dtype) {
  const char* op = "embedding (backward)";
  same_device(op, dout, ids);
  check_float_storage(op, "dout", dout);
  TK_CHECK(ids.dtype() == DType::I32, op, ": ids ", ids.describe(), " must be i32");
  const auto& ds = dout.shape();
  TK_CHECK(!ds.empty() && ds.back() > 0 && dout.numel() == ids.numel() * ds.back(), op, ": dout ", dout.describe(),
           " must be ids' shape ", shape_str(ids.shape()), " plus the embedding dim");
  TK_CHECK(vocab > 0, op, ": the vocabulary must not be empty");
  TensorPtr dtable = empty({vocab, ds.back()}, DType::F32, dout.device());
  TensorView dv = dout.view(), iv = ids.view(), tv = dtable->view();
  launch(op, dout.device(), {[=](ThreadPool& pool) { embedding_backward_cpu(dv, iv, tv, pool); }, TK_CUDA(embedding_backward_cuda(dv, iv, tv, stream))});
  return to_dtype(std::move(dtable), dtype);
}

Grads3 attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                          const Tensor& lse, bool causal, double scale, const Tensor* segment_ids,
                          const Tensor* key_segment_ids) {
  const char* op = "attention (backward)";
  check_attention(op, q, k, v, scale, segment_ids, key_segment_ids);
  check_grad(op, "dout", dout, q);
  TK_CHECK(dout.dtype() == q.dtype() && out.shape() == q.shape() && out.dtype() == q.dtype(), op, ": dout ",
           dout.describe(), " and out ", out.describe(), " must match q ", q.describe());
  const auto& qs = q.shape();
  const std::vector<int64_t> lse_shape{qs[0], qs[2], qs[1]};
  TK_CHECK(lse.dtype() == DType::F32 && lse.shape() == lse_shape, op, ": lse ", lse.describe(), " must be f32 ",
           shape_str(lse_shape));
  Grads3 g;
  g.a = empty(q.shape(), q.dtype(), q.device());
  g.b = empty(k.shape(), k.dtype(), k.device());
  g.c = empty(v.shape(), v.dtype(), v.device());
  TensorView dov = dout.view(), qv = q.view(), kv = k.view(), vv = v.view(), ov = out.view(), lv = lse.view();
  TensorView dq = g.a->view(), dk = g.b->view(), dv = g.c->view();
  bool has_seg = segment_ids != nullptr, has_kseg = key_segment_ids != nullptr;
  TensorView sv = has_seg ? segment_ids->view() : TensorView{};
  TensorView ksv = has_kseg ? key_segment_ids->view() : TensorView{};
  AttentionOptions opt;
  opt.causal = causal;
  opt.scale = float(scale > 0 ? scale : 0.0);
  launch(op, q.device(), {[=](ThreadPool& pool) {
                            attention_backward_cpu(dov, qv, kv, vv, ov, lv, has_seg ? &sv : nullptr,
                                                   has_kseg ? &ksv : nullptr, opt, dq, dk, dv, pool);
                          },
                          TK_CUDA(attention_backward_cuda(dov, qv, kv, vv, ov, lv, has_seg ? &sv : nullptr, has_kseg ? &ksv : nullptr, opt, dq, dk, dv, stream))});
  return g;
}

TensorPtr cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                 int32_t ignore_index, LossReduction reduction) {
  const char* op = "crossEntropy (backward)";
  auto [N, V] = check_logits(op, logits, targets);
  (void)V;
  same_device(op, logits, dloss);
  if (reduction == LossReduction::None) {
    TK_CHECK(dloss.dtype() == DType::F32 && dloss.shape() == targets.shape(), op, ": the upstream gradient ",
             dloss.describe(), " must be f32 shaped like targets ", targets.describe());
  } else {
    check_scalar_grad(op, dloss);
  }
  TK_CHECK(lse.dtype() == DType::F32 && lse.numel() == N, op, ": lse ", lse.describe(), " must hold ", N, " f32 values");
  TensorPtr dlogits = empty(logits.shape(), logits.dtype(), logits.device());
  TensorView lv = logits.view(), tv = targets.view(), sv = lse.view(), dv = dloss.view(), gv = dlogits->view();
  launch(op, logits.device(), {[=](ThreadPool& pool) {
                                 cross_entropy_backward_cpu(lv, tv, sv, dv, ignore_index, reduction, gv, pool);
                               },
                               TK_CUDA(cross_entropy_backward_cuda(lv, tv, sv, dv, ignore_index, reduction, gv, stream))});
  return dlogits;
}

TensorPtr sequence_logprobs_backward(const Tensor& dout, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                     int32_t ignore_index) {
  const char* op = "sequenceLogprobs (backward)";
  auto [N, V] = check_logits(op, logits, targets);
  (void)V;
  same_device(op, logits, dout);
  TK_CHECK(logits.shape().size() == 3 && dout.dtype() == DType::F32 && dout.shape() == std::vector<int64_t>{logits.shape()[0]},
           op, ": the upstream gradient ", dout.describe(), " must be f32 [", logits.shape()[0], "]");
  TK_CHECK(lse.dtype() == DType::F32 && lse.numel() == N, op, ": lse ", lse.describe(), " must hold ", N, " f32 values");
  TensorPtr dlogits = empty(logits.shape(), logits.dtype(), logits.device());
  TensorView lv = logits.view(), tv = targets.view(), sv = lse.view(), dv = dout.view(), gv = dlogits->view();
  launch(op, logits.device(), {[=](ThreadPool& pool) {
                                 sequence_logprobs_backward_cpu(lv, tv, sv, dv, ignore_index, gv, pool);
                               },
                               TK_CUDA(sequence_logprobs_backward_cuda(lv, tv, sv, dv, ignore_index, gv, stream))});
  return dlogits;
}

Grads2 dpo_loss_backward(const Tensor& dloss, const Tensor& policy_chosen, const Tensor& policy_rejected,
                         const Tensor& ref_chosen, const Tensor& ref_rejected, const DpoParams& params) {
  const char* op = "dpoLoss (backward)";
  check_dpo(op, policy_chosen, policy_rejected, ref_chosen, ref_rejected, params);
  check_scalar_grad(op, dloss);
  same_device(op, policy_chosen, dloss);
  const int64_t B = policy_chosen.shape()[0];
  // The loss is the mean over pairs: each pair's upstream gradient is dloss / B.
  TensorPtr per_pair = scale(*broadcast_to(*reshape(dloss, {1}), {B}), 1.0 / double(B));
  Grads2 g;
  g.a = empty({B}, DType::F32, policy_chosen.device());
  g.b = empty({B}, DType::F32, policy_chosen.device());
  TensorView pc = policy_chosen.view(), pr = policy_rejected.view(), rc = ref_chosen.view(), rr = ref_rejected.view();
  TensorView dv = per_pair->view(), dc = g.a->view(), dr = g.b->view();
  launch(op, policy_chosen.device(), {[=](ThreadPool&) { dpo_loss_backward_cpu(pc, pr, rc, rr, params, dv, dc, dr); }, TK_CUDA(dpo_loss_backward_cuda(pc, pr, rc, rr, params, dv, dc, dr, stream))});
  return g;
}

TensorPtr distill_loss_backward(const Tensor& dloss, const Tensor& student, const Tensor& teacher, const Tensor* targets,
                                const DistillParams& params) {
  const char* op = "distillLoss (backward)";
  check_distill(op, student, teacher, targets, params);
  check_scalar_grad(op, dloss);
  same_device(op, student, dloss);
  TensorPtr dstudent = empty(student.shape(), student.dtype(), student.device());
  TensorView sv = student.view(), tv = teacher.view(), dv = dloss.view(), gv = dstudent->view();
  TensorView yv = targets ? targets->view() : TensorView{};
  launch(op, student.device(), {[=](ThreadPool& pool) { distill_backward_cpu(sv, tv, yv, params, dv, gv, pool); }, TK_CUDA(distill_backward_cuda(sv, tv, yv, params, dv, gv, stream))});
  return dstudent;
}

namespace {

// hidden [..., D] against weight [V, D]: returns the rows N.
int64_t check_linear_head(const char* op, const char* hname, const Tensor& hidden, const char* wname, const Tensor& weight) {
  same_device(op, hidden, weight);
  same_dtype(op, hidden, weight);
  check_float_storage(op, hname, hidden);
  const auto &hs = hidden.shape(), &ws = weight.shape();
  TK_CHECK(!hs.empty() && ws.size() == 2 && ws[1] == hs.back() && ws[0] > 0, op, ": ", wname, " ", weight.describe(),
           " must be [V, ", hs.empty() ? 0 : hs.back(), "] to project ", hname, " ", hidden.describe());
  return hidden.numel() / std::max<int64_t>(1, hs.back());
}

void check_row_targets(const char* op, const Tensor& hidden, const Tensor& targets) {
  same_device(op, hidden, targets);
  std::vector<int64_t> rows(hidden.shape().begin(), hidden.shape().end() - 1);
  TK_CHECK(targets.dtype() == DType::I32 && targets.shape() == rows, op, ": targets ", targets.describe(),
           " must be i32 ", shape_str(rows), " (hidden's shape without its last axis)");
}

}  // namespace

LinearLossResult linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                      int32_t ignore_index, LossReduction reduction, bool want_dhidden,
                                      bool want_dweight) {
  const char* op = "linearCrossEntropy";
  check_linear_head(op, "hidden", hidden, "weight", weight);
  check_row_targets(op, hidden, targets);
  TK_CHECK(reduction != LossReduction::None, op, ": reduction 'none' is not supported (per-row losses would need the rows' logits); use 'mean' or 'sum'");
  LinearLossResult r;
  const Device dev = hidden.device();
  r.loss = empty({}, DType::F32, dev);
  TensorPtr losses = empty(targets.shape(), DType::F32, dev);
  if (want_dhidden) r.dhidden = empty(hidden.shape(), hidden.dtype(), dev);
  if (want_dweight) r.dweight = empty(weight.shape(), weight.dtype(), dev);
  LinearCrossEntropyParams p;
  p.ignore_index = ignore_index;
  p.reduction = reduction;
  TensorView hv = hidden.view(), wv = weight.view(), tv = targets.view(), lv = r.loss->view(), sv = losses->view();
  TensorView dhv = r.dhidden ? r.dhidden->view() : TensorView{}, dwv = r.dweight ? r.dweight->view() : TensorView{};
  launch(op, dev, {[=](ThreadPool& pool) { linear_cross_entropy_cpu(hv, wv, tv, p, lv, sv, dhv, dwv, pool); }, TK_CUDA(linear_cross_entropy_cuda(hv, wv, tv, p, lv, sv, dhv, dwv, stream))});
  return r;
}

LinearLossResult linear_distill(const Tensor& student_hidden, const Tensor& student_weight, const Tensor& teacher_hidden,
                                const Tensor& teacher_weight, const Tensor* targets, const DistillParams& params,
                                double alpha, bool want_dhidden, bool want_dweight) {
  const char* op = "linearDistillLoss";
  const int64_t N = check_linear_head(op, "studentHidden", student_hidden, "studentWeight", student_weight);
  const int64_t Nt = check_linear_head(op, "teacherHidden", teacher_hidden, "teacherWeight", teacher_weight);
  same_device(op, student_hidden, teacher_hidden);
  TK_CHECK(N == Nt, op, ": studentHidden ", student_hidden.describe(), " and teacherHidden ", teacher_hidden.describe(),
           " must hold the same number of rows");
  TK_CHECK(student_weight.shape()[0] == teacher_weight.shape()[0], op, ": the student's vocabulary (",
           student_weight.shape()[0], ") differs from the teacher's (", teacher_weight.shape()[0],
           "); token-level distillation needs one vocabulary");
  TK_CHECK(std::isfinite(params.temperature) && params.temperature > 0, op, ": temperature must be a finite number > 0, got ",
           params.temperature);
  TK_CHECK(params.beta >= 0 && params.beta <= 1, op, ": beta must be in [0, 1], got ", params.beta);
  TK_CHECK(alpha >= 0 && alpha <= 1, op, ": alpha must be in [0, 1], got ", alpha);
  TK_CHECK(alpha == 0 || targets, op, ": alpha > 0 mixes in cross entropy, which needs targets");
  if (targets) check_row_targets(op, student_hidden, *targets);
  LinearLossResult r;
  const Device dev = student_hidden.device();
  r.loss = empty({}, DType::F32, dev);
  if (want_dhidden) r.dhidden = empty(student_hidden.shape(), student_hidden.dtype(), dev);
  if (want_dweight) r.dweight = empty(student_weight.shape(), student_weight.dtype(), dev);
  LinearDistillParams p;
  p.distill = params;
  p.alpha = float(alpha);
  TensorView sh = student_hidden.view(), sw = student_weight.view(), th = teacher_hidden.view(), tw = teacher_weight.view();
  TensorView yv = targets ? targets->view() : TensorView{}, lv = r.loss->view();
  TensorView dhv = r.dhidden ? r.dhidden->view() : TensorView{}, dwv = r.dweight ? r.dweight->view() : TensorView{};
  launch(op, dev, {[=](ThreadPool& pool) { linear_distill_cpu(sh, sw, th, tw, yv, p, lv, TensorView{}, dhv, dwv, pool); },
                   TK_CUDA(linear_distill_cuda(sh, sw, th, tw, yv, p, lv, TensorView{}, dhv, dwv, stream))});
  return r;
}

namespace {

QloraWeight check_qlora(const char* op, const Tensor& x, const Nf4WeightRef& w, const Tensor& a, const Tensor& b,
                        double scale, double dropout) {
  check_float_storage(op, "x", x);
  same_device(op, x, a);
  same_device(op, x, b);
  same_device(op, x, *w.packed);
  same_dtype(op, x, a);
  same_dtype(op, x, b);
  const auto& xs = x.shape();
  TK_CHECK(!xs.empty() && xs.back() == w.in, op, ": x ", x.describe(), " must end in W's input size ", w.in,
           " (W is [", w.out, ", ", w.in, "])");
  TK_CHECK(a.shape().size() == 2 && a.shape()[1] == w.in && a.shape()[0] >= 1, op, ": loraA ", a.describe(), " must be [r, ",
           w.in, "]");
  const int64_t r = a.shape()[0];
  TK_CHECK(b.shape() == std::vector<int64_t>({w.out, r}), op, ": loraB ", b.describe(), " must be [", w.out, ", ", r, "]");
  TK_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TK_CHECK(dropout >= 0 && dropout < 1, op, ": dropout must be in [0, 1), got ", dropout);
  Nf4Layout L = nf4_layout(w.out * w.in, w.block_size, w.double_quant);
  auto expect = [&](const Tensor* t, const char* name, DType dt, int64_t count) {
    TK_CHECK(t && t->dtype() == dt && t->numel() == count && t->device() == x.device(), op, ": NF4 ", name, " ",
             t ? t->describe() : std::string("(missing)"), " does not fit a [", w.out, ", ", w.in, "] weight: expected ",
             count, " ", dtype_name(dt));
  };
  expect(w.packed, "packed", DType::U8, L.packed_bytes);
  expect(w.absmax, "absmax", w.double_quant ? DType::U8 : DType::F32, L.nblocks);
  if (w.double_quant) {
    expect(w.scale2, "scale2", DType::F32, L.nblocks2);
    expect(w.offset, "offset", DType::F32, 1);
  }
  QloraWeight q;
  q.layout = L;
  q.out = w.out;
  q.in = w.in;
  q.q.packed = static_cast<const uint8_t*>(w.packed->storage()->ptr);
  if (w.double_quant) {
    q.q.qabsmax = static_cast<const uint8_t*>(w.absmax->storage()->ptr);
    q.q.scale2 = static_cast<const float*>(w.scale2->storage()->ptr);
    q.q.offset = static_cast<const float*>(w.offset->storage()->ptr);
  } else {
    q.q.absmax = static_cast<const float*>(w.absmax->storage()->ptr);
  }
  return q;
}

}  // namespace

QloraSaved qlora_linear(const Tensor& x, const Nf4WeightRef& w, const Tensor& a, const Tensor& b, double scale,
                        double dropout, uint64_t seed) {
  const char* op = "qloraLinear";
  QloraWeight q = check_qlora(op, x, w, a, b, scale, dropout);
  std::vector<int64_t> y_shape = x.shape(), xa_shape = x.shape();
  y_shape.back() = w.out;
  xa_shape.back() = a.shape()[0];
  QloraSaved r;
  r.y = empty(y_shape, x.dtype(), x.device());
  r.xa = empty(xa_shape, DType::F32, x.device());
  QloraOptions opt{float(scale), float(dropout), seed};
  TensorView xv = x.view(), av = a.view(), bv = b.view(), yv = r.y->view(), xav = r.xa->view();
  // The NF4 buffers must outlive the kernel even if the weight is disposed meanwhile.
  std::vector<std::shared_ptr<Storage>> keep{w.packed->storage(), w.absmax->storage()};
  if (w.double_quant) keep.insert(keep.end(), {w.scale2->storage(), w.offset->storage()});
  launch(op, x.device(), {[=](ThreadPool& pool) {
                            (void)keep;
                            qlora_forward_cpu(xv, q, av, bv, opt, yv, xav, pool);
                          },
                          TK_CUDA((void)keep; qlora_forward_cuda(xv, q, av, bv, opt, yv, xav, stream))});
  return r;
}

Grads3 qlora_linear_backward(const Tensor& dy, const Tensor& x, const Nf4WeightRef& w, const Tensor& a, const Tensor& b,
                             const Tensor& xa, double scale, double dropout, uint64_t seed, bool want_dx) {
  const char* op = "qloraLinear (backward)";
  QloraWeight q = check_qlora(op, x, w, a, b, scale, dropout);
  std::vector<int64_t> y_shape = x.shape(), xa_shape = x.shape();
  y_shape.back() = w.out;
  xa_shape.back() = a.shape()[0];
  TK_CHECK(dy.shape() == y_shape && dy.dtype() == x.dtype(), op, ": dy ", dy.describe(), " must be ", shape_str(y_shape), " ",
           dtype_name(x.dtype()));
  TK_CHECK(xa.shape() == xa_shape && xa.dtype() == DType::F32, op, ": xa ", xa.describe(), " must be f32 ", shape_str(xa_shape));
  Grads3 g;
  if (want_dx) g.a = empty(x.shape(), x.dtype(), x.device());
  g.b = empty(a.shape(), a.dtype(), a.device());
  g.c = empty(b.shape(), b.dtype(), b.device());
  QloraOptions opt{float(scale), float(dropout), seed};
  TensorView dyv = dy.view(), xv = x.view(), av = a.view(), bv = b.view(), xav = xa.view();
  TensorView dxv = want_dx ? g.a->view() : TensorView{}, dav = g.b->view(), dbv = g.c->view();
  std::vector<std::shared_ptr<Storage>> keep{w.packed->storage(), w.absmax->storage()};
  if (w.double_quant) keep.insert(keep.end(), {w.scale2->storage(), w.offset->storage()});
  launch(op, x.device(), {[=](ThreadPool& pool) {
                            (void)keep;
                            qlora_backward_cpu(dyv, xv, q, av, bv, xav, opt, dxv, dav, dbv, pool);
                          },
                          TK_CUDA((void)keep; qlora_backward_cuda(dyv, xv, q, av, bv, xav, opt, dxv, dav, dbv, stream))});
  return g;
}

void adamw_step(const std::vector<Tensor*>& params, const std::vector<const Tensor*>& grads,
                const std::vector<Tensor*>& m, const std::vector<Tensor*>& v, const AdamWParams& hp) {
  const char* op = "adamw";
  TK_CHECK(grads.size() == params.size() && m.size() == params.size() && v.size() == params.size(), op, ": ",
           params.size(), " params need as many grads, m and v (got ", grads.size(), ", ", m.size(), ", ", v.size(), ")");
  TK_CHECK(std::isfinite(hp.lr) && hp.lr >= 0, op, ": lr must be finite and >= 0, got ", hp.lr);
  TK_CHECK(hp.beta1 >= 0 && hp.beta1 < 1 && hp.beta2 >= 0 && hp.beta2 < 1, op, ": betas must be in [0, 1), got ",
           hp.beta1, ", ", hp.beta2);
  TK_CHECK(hp.eps > 0 && std::isfinite(hp.weight_decay) && hp.weight_decay >= 0, op,
           ": eps must be > 0 and weightDecay finite and >= 0");
  TK_CHECK(hp.step >= 1, op, ": step counts from 1, got ", hp.step);
  if (params.empty()) return;
  const Device dev = params[0]->device();
  std::vector<AdamWTensor> list;
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor &p = *params[i], &g = *grads[i], &mi = *m[i], &vi = *v[i];
    std::string at = "parameter " + std::to_string(i) + " " + p.describe();
    TK_CHECK(p.device() == dev && g.device() == dev && mi.device() == dev && vi.device() == dev, op, ": ", at,
             ": every tensor must be on ", dev.name());
    check_float_storage(op, "parameter", p);
    check_float_storage(op, "gradient", g);
    TK_CHECK(g.shape() == p.shape(), op, ": ", at, " has a gradient of shape ", shape_str(g.shape()));
    TK_CHECK(mi.dtype() == DType::F32 && vi.dtype() == DType::F32 && mi.shape() == p.shape() && vi.shape() == p.shape(),
             op, ": ", at, ": its moments must be f32 of the same shape, got ", mi.describe(), " and ", vi.describe());
    AdamWTensor t;
    t.param = p.storage()->ptr;
    t.grad = g.storage()->ptr;
    t.m = static_cast<float*>(mi.storage()->ptr);
    t.v = static_cast<float*>(vi.storage()->ptr);
    t.n = p.numel();
    t.param_dtype = p.dtype();
    t.grad_dtype = g.dtype();
    list.push_back(t);
  }
#ifdef TUNEKIT_WITH_CUDA
  if (dev.type == DeviceType::CUDA) check_adamw_list_cuda(list.data(), int64_t(list.size()));
#endif
  launch(op, dev, {[=](ThreadPool& pool) { adamw_step_multi_cpu(list.data(), int64_t(list.size()), hp, pool); },
                   TK_CUDA({
                     // The kernels read the tensor list from device memory, uploaded per step.
                     const size_t bytes = list.size() * sizeof(AdamWTensor);
                     void* dlist = cuda::allocate(dev.index, bytes);
                     cuda::upload(tk_queue, dlist, list.data(), bytes);
                     adamw_step_multi_cuda(static_cast<const AdamWTensor*>(dlist), int64_t(list.size()), hp, nullptr, stream);
                     tk_queue.release(dlist);
                   })});
}

TensorPtr clip_grad_norm(const std::vector<Tensor*>& grads, double max_norm) {
  const char* op = "clipGradNorm";
  TK_CHECK(!grads.empty(), op, ": no gradients given");
  TK_CHECK(std::isfinite(max_norm) && max_norm >= 0, op, ": maxNorm must be finite and >= 0 (0: only measure), got ",
           max_norm);
  const Device dev = grads[0]->device();
  std::vector<GradTensor> list;
  for (Tensor* g : grads) {
    TK_CHECK(g->device() == dev, op, ": gradient ", g->describe(), " is not on ", dev.name());
    check_float_storage(op, "gradient", *g);
    list.push_back(GradTensor{g->storage()->ptr, g->numel(), g->dtype()});
  }
  TensorPtr norm = empty({}, DType::F32, dev);
  float* out = static_cast<float*>(norm->storage()->ptr);
  // Both columns capture `list` by copy (a braced list initializes left to right: a move into the
  // first would leave the second empty).
  launch(op, dev, {[=](ThreadPool& pool) {
                     double total = std::sqrt(grad_norm_sq_cpu(list.data(), int64_t(list.size()), pool));
                     *out = float(total);
                     if (max_norm > 0) {
                       float coef = clip_coefficient(total, max_norm);
                       if (coef < 1.0f || std::isnan(coef)) scale_grads_cpu(list.data(), int64_t(list.size()), coef, pool);
                     }
                   },
                   TK_CUDA({
                     // Norm, clip coefficient and scaling all stay on the device: no host sync.
                     const size_t bytes = list.size() * sizeof(GradTensor);
                     char* scratch = static_cast<char*>(cuda::allocate(dev.index, bytes + 16));
                     cuda::upload(tk_queue, scratch + 16, list.data(), bytes);
                     auto* dlist = reinterpret_cast<const GradTensor*>(scratch + 16);
                     auto* norm_sq = reinterpret_cast<double*>(scratch);
                     auto* coef = reinterpret_cast<float*>(scratch + 8);
                     grad_norm_sq_cuda(dlist, int64_t(list.size()), norm_sq, max_norm > 0 ? coef : nullptr, max_norm, stream);
                     norm_from_square_cuda(norm_sq, out, stream);
                     if (max_norm > 0) scale_grads_cuda(dlist, int64_t(list.size()), coef, stream);
                     tk_queue.release(scratch);
                   })});
  return norm;
}

void synchronize(Device dev) { Runtime::get().queue(dev).synchronize(); }

}  // namespace ops
}  // namespace tk
