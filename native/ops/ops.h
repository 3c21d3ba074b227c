// The op table: every op the addon exposes, its shape/dtype/device checks, and which kernel
// serves which device. Checks run synchronously on the caller's thread and throw tk::Error with
// the op's name and the offending shapes; kernels are then enqueued on the device's queue, so a
// call returns before the work is done. Each op names its kernels per device (DeviceKernels):
// adding a backend fills a column there and touches no caller.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../core/runtime.h"
#include "../core/tensor.h"
#include "../cpu/distill.h"
#include "../cpu/elementwise.h"
#include "../cpu/linear_loss.h"
#include "../cpu/loss.h"
#include "../cpu/nf4.h"
#include "../cpu/optim.h"
#include "../cpu/qlora.h"
#include "../cpu/rope.h"

namespace tk {

// Device memory shared by tensors that view it (reshape shares, every other op allocates).
// Destroying the last reference enqueues the release on the device's queue.
struct Storage {
  // host_writes_now: the caller fills the memory before queueing anything (see CpuAllocator).
  Storage(Device dev, size_t bytes, bool host_writes_now = false);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  Device device;
  size_t bytes;
  void* ptr;
};

// A contiguous tensor: shape, dtype, device and its storage. Counted as live until destroyed.
class Tensor {
 public:
  Tensor(std::shared_ptr<Storage> storage, DType dtype, std::vector<int64_t> shape);
  ~Tensor();
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  const std::vector<int64_t>& shape() const { return shape_; }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_->device; }
  int64_t numel() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  TensorView view() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  std::string describe() const;  // "[2, 3] f32 on cpu"

 private:
  std::shared_ptr<Storage> storage_;
  DType dtype_;
  std::vector<int64_t> shape_;
};

using TensorPtr = std::unique_ptr<Tensor>;

std::string shape_str(const std::vector<int64_t>& shape);
// Validates a user-supplied shape (non-negative, element count and bytes within limits).
void check_shape(const char* op, const std::vector<int64_t>& shape, DType dtype);
TensorPtr empty(const std::vector<int64_t>& shape, DType dtype, Device dev);

namespace ops {

// A new tensor holding a copy of `bytes` host bytes (exactly numel * dtype size).
TensorPtr from_host(const void* data, size_t bytes, const std::vector<int64_t>& shape, DType dtype, Device dev);
TensorPtr full(const std::vector<int64_t>& shape, DType dtype, Device dev, double value);
TensorPtr randn(const std::vector<int64_t>& shape, DType dtype, Device dev, uint64_t seed, float mean, float std);
// Copies the values to host memory (exactly nbytes()), calling done(error) on a host thread
// (not the JavaScript thread) after all work queued before it; error is "" on success.
void read_async(const Tensor& t, std::shared_ptr<std::vector<uint8_t>> out, std::function<void(std::string)> done);
// Blocks until the values are ready; throws the device's deferred error, if any.
std::vector<uint8_t> read_sync(const Tensor& t);
TensorPtr to_device(const Tensor& t, Device dev);
TensorPtr cast(const Tensor& t, DType dtype);
TensorPtr reshape(const Tensor& t, const std::vector<int64_t>& shape);
TensorPtr permute(const Tensor& t, const std::vector<int>& perm);
// The tensors joined along `axis` (same dtype and device, equal sizes elsewhere).
TensorPtr concat(const std::vector<const Tensor*>& tensors, int axis);
// A copy of x[..., start:start+length, ...] along `axis`.
TensorPtr narrow(const Tensor& x, int axis, int64_t start, int64_t length);
// a [..., M, K] (transA: [..., K, M]), b [..., K, N] (transB: [..., N, K]) -> [..., M, N].
// Batch dims must be equal, or one operand 2-D (broadcast). f32 or bf16, fp32 accumulation.
TensorPtr matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b);
// Numpy broadcasting; operands share dtype and device.
TensorPtr binary(BinaryOp op, const Tensor& a, const Tensor& b);
TensorPtr scale(const Tensor& x, double alpha);
// x *= s in place, s one f32 value known only on the queue (an upstream gradient); returns a new
// handle on x's storage. Only for tensors nothing else reads (a backward rule's own saved result).
TensorPtr scale_by_inplace(const Tensor& x, const Tensor& s);
// Inverted dropout with drop probability p in [0, 1): the mask depends only on (seed, index).
TensorPtr dropout(const Tensor& x, double p, uint64_t seed);
// Sum over `axes` (negative counts from the end; empty = all axes).
TensorPtr sum(const Tensor& x, const std::vector<int>& axes, bool keepdim);
// x [..., D], weight [D] -> x * rsqrt(mean(x^2) + eps) * weight, computed in fp32. f32 or bf16.
TensorPtr rms_norm(const Tensor& x, const Tensor& weight, double eps);
// silu(gate) * up, same shapes and dtype (f32 or bf16).
TensorPtr swiglu(const Tensor& gate, const Tensor& up);
// ids [...] i32, table [V, D] -> [..., D]. Ids outside [0, V) fail the queued kernel with an
// error naming the id; it surfaces at the next read or synchronize.
TensorPtr embedding(const Tensor& ids, const Tensor& table);
// x [B, T, H, D] rotated by RoPE (Hugging Face half rotation). positions: null for 0..T-1, or
// i32 [T] (shared) or [B, T] (per batch row).
TensorPtr rope(const Tensor& x, const Tensor* positions, double theta, const RopeScaling& scaling);
// q [B, T, H, D], k and v [B, S, Hkv, D] -> [B, T, H, D]; fused (never the [T, S] scores).
// segment_ids: null, or i32 [B, T] (needs S == T): no attention across segments. scale <= 0
// means 1/sqrt(D).
// key_segment_ids: null, or i32 [B, S] with segment_ids given: keys carry their own ids (a KV
// cache of left-padded rows), and S may differ from T.
TensorPtr attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                    const Tensor* segment_ids, const Tensor* key_segment_ids = nullptr);
// logits [..., V], targets [...] i32 -> [] (mean over non-ignored, or sum) or [...] (none), f32.
TensorPtr cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index, LossReduction reduction);
// logits [B, T, V], targets [B, T] i32 -> [B] f32 sums of log p(target) over non-ignored positions.
TensorPtr sequence_logprobs(const Tensor& logits, const Tensor& targets, int32_t ignore_index);
struct DpoResult {
  TensorPtr loss, chosen_rewards, rejected_rewards;  // [] mean over pairs, [B], [B]
};
// Sequence log-probs [B] f32 of the policy and the reference on chosen and rejected answers.
DpoResult dpo_loss(const Tensor& policy_chosen, const Tensor& policy_rejected, const Tensor& ref_chosen,
                   const Tensor& ref_rejected, const DpoParams& params);
// Distillation loss of student against teacher logits [..., V] at a temperature, scaled by T^2,
// averaged over rows whose target (optional i32 [...]) is not ignore_index -> [] f32.
TensorPtr distill_loss(const Tensor& student, const Tensor& teacher, const Tensor* targets, const DistillParams& params);
// NF4 (QLoRA) storage of a weight: packed u8 codes [ceil(n/2)] and the absmax per block, either
// f32 [nblocks] or, with double quantization, u8 codes [nblocks] + f32 scales [ceil(nblocks/256)]
// + one f32 offset.
struct Nf4Tensors {
  TensorPtr packed, absmax, scale2, offset;  // scale2 and offset only with double quantization
};
Nf4Tensors nf4_quantize(const Tensor& w, int64_t block_size, bool double_quant);
// scale2 and offset: null without double quantization.
TensorPtr nf4_dequantize(const Tensor& packed, const Tensor& absmax, const Tensor* scale2, const Tensor* offset,
                         const std::vector<int64_t>& shape, int64_t block_size, bool double_quant, DType out_dtype);
// ---- training: what the autograd tape needs beyond the forward ops ------------------------------
// Forward variants that also return what their backward reads, and the backward ops. Each
// backward takes the upstream gradient first and returns gradients in the inputs' dtypes.

// x copied to `shape` with numpy broadcasting (the gradient of a sum over the broadcast axes).
TensorPtr broadcast_to(const Tensor& x, const std::vector<int64_t>& shape);
struct RmsNormSaved {
  TensorPtr y, rstd;  // rstd: f32 [rows]
};
RmsNormSaved rms_norm_train(const Tensor& x, const Tensor& weight, double eps);
struct Grads2 {
  TensorPtr a, b;
};
// -> dx (x's dtype), dweight (weight's dtype).
Grads2 rms_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd);
// -> dgate, dup.
Grads2 swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up);
// dout [..., D], ids [...] -> dtable [vocab, D] in `dtype` (rows summed over repeated ids).
TensorPtr embedding_backward(const Tensor& dout, const Tensor& ids, int64_t vocab, DType dtype);
// The transpose of rope(): rotation by the negated angles (same positions, theta and scaling).
TensorPtr rope_backward(const Tensor& dy, const Tensor* positions, double theta, const RopeScaling& scaling);
struct AttentionSaved {
  TensorPtr out, lse;  // lse: f32 [B, H, T]
};
AttentionSaved attention_train(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                               const Tensor* segment_ids, const Tensor* key_segment_ids = nullptr);
struct Grads3 {
  TensorPtr a, b, c;
};
// -> dq, dk, dv.
Grads3 attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                          const Tensor& lse, bool causal, double scale, const Tensor* segment_ids,
                          const Tensor* key_segment_ids = nullptr);
struct LossSaved {
  TensorPtr loss, lse;  // lse: f32, one per row of logits
};
LossSaved cross_entropy_train(const Tensor& logits, const Tensor& targets, int32_t ignore_index, LossReduction reduction);
// dloss: f32 [] (mean, sum) or targets' shape (none) -> dlogits (logits' dtype).
TensorPtr cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                 int32_t ignore_index, LossReduction reduction);
LossSaved sequence_logprobs_train(const Tensor& logits, const Tensor& targets, int32_t ignore_index);
// dout: f32 [B] -> dlogits.
TensorPtr sequence_logprobs_backward(const Tensor& dout, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                     int32_t ignore_index);
// dloss: f32 [] (of the mean over pairs) -> d policyChosen, d policyRejected (f32 [B]).
Grads2 dpo_loss_backward(const Tensor& dloss, const Tensor& policy_chosen, const Tensor& policy_rejected,
                         const Tensor& ref_chosen, const Tensor& ref_rejected, const DpoParams& params);
// dloss: f32 [] -> dstudent (student's dtype).
TensorPtr distill_loss_backward(const Tensor& dloss, const Tensor& student, const Tensor& teacher, const Tensor* targets,
                                const DistillParams& params);

// Fused linear losses (never all [N, V] logits). The gradients asked for (of the loss, for an
// upstream gradient of 1) come back too, computed in the same pass; the autograd rule scales them.
struct LinearLossResult {
  TensorPtr loss, dhidden, dweight;  // dhidden / dweight null without want_grads
};
// hidden [..., D], weight [V, D] (one dtype), targets [...] i32 -> loss [] f32 (mean or sum).
LinearLossResult linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                      int32_t ignore_index, LossReduction reduction, bool want_dhidden,
                                      bool want_dweight);
// alpha * CE(student) + (1 - alpha) * distill(student, teacher) with the student's logits
// hidden [..., Ds] x weight [V, Ds]^T and the teacher's [..., Dt] x [V, Dt]^T; targets optional
// (needed when alpha > 0) -> loss [] f32; gradients for the student's hidden and weight.
LinearLossResult linear_distill(const Tensor& student_hidden, const Tensor& student_weight, const Tensor& teacher_hidden,
                                const Tensor& teacher_weight, const Tensor* targets, const DistillParams& params,
                                double alpha, bool want_dhidden, bool want_dweight);

// A frozen NF4 weight [out, in] as the op table sees it (the tensors of tk.nf4.quantize).
struct Nf4WeightRef {
  const Tensor* packed;
  const Tensor* absmax;
  const Tensor* scale2;  // double quantization only
  const Tensor* offset;  // double quantization only
  int64_t out, in, block_size;
  bool double_quant;
};
struct QloraSaved {
  TensorPtr y, xa;  // xa: f32 [..., r] = drop(x) A^T, what the backward pass reads
};
// y = x deq(W)^T + scale (drop(x) A^T) B^T, with W dequantized inside the GEMM. x [..., in] f32 or
// bf16; A [r, in], B [out, r] in x's dtype; dropout p in [0, 1) with its seed.
QloraSaved qlora_linear(const Tensor& x, const Nf4WeightRef& w, const Tensor& a, const Tensor& b, double scale,
                        double dropout, uint64_t seed);
// -> dx (null unless want_dx), dA, dB.
Grads3 qlora_linear_backward(const Tensor& dy, const Tensor& x, const Nf4WeightRef& w, const Tensor& a, const Tensor& b,
                             const Tensor& xa, double scale, double dropout, uint64_t seed, bool want_dx);

// One AdamW step over many parameters, in place, on the device queue: params (f32|bf16), grads
// (f32|bf16, same shapes), moments m and v (f32, same shapes). lr and the rest as AdamWParams.
void adamw_step(const std::vector<Tensor*>& params, const std::vector<const Tensor*>& grads,
                const std::vector<Tensor*>& m, const std::vector<Tensor*>& v, const AdamWParams& hp);
// Global L2 norm of all grads -> f32 []; with max_norm > 0 the grads are scaled in place by
// min(1, max_norm / (norm + 1e-6)) (torch.nn.utils.clip_grad_norm_), all on the queue.
TensorPtr clip_grad_norm(const std::vector<Tensor*>& grads, double max_norm);

void synchronize(Device dev);

}  // namespace ops
}  // namespace tk
