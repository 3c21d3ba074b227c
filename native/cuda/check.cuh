// CUDA_CHECK(call): a failed CUDA runtime call becomes a tk::Error that names the call, the error
// (cudaGetErrorName and cudaGetErrorString) and the source line, so that a failure reported to
// JavaScript can be traced without a debugger. For the errors that poison the CUDA context
// (a kernel that faulted), the message says so and how to find the kernel, because every later
// call fails the same way and the first report is the one a user reads.
#pragma once
#include <cuda_runtime_api.h>

#include <cstring>
#include <string>

#include "../core/error.h"

namespace tk {
namespace cuda {

// "cudaErrorIllegalAddress (an illegal memory access was encountered)"
inline std::string error_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

// Errors after which the context is unusable for the rest of the process: the device reported
// an exception while running a kernel. Everything else (out of memory, a bad argument) is
// recoverable and leaves the context as it was.
inline bool is_sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorContained:
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchFailure:
      return true;
    default:
      return false;
  }
}

inline const char* sticky_hint(cudaError_t e) {
  return is_sticky(e) ? "; a kernel failed and the CUDA context can no longer be used by this process: restart it "
                        "(run with CUDA_LAUNCH_BLOCKING=1 to make the failing kernel report itself)"
                      : "";
}

namespace detail {
// "native/cuda/runtime.cu" rather than the build machine's absolute path.
inline const char* short_path(const char* file) {
  const char* p = std::strstr(file, "native/");
  return p ? p : file;
}
// "cudaMemcpyAsync" out of "cudaMemcpyAsync(dst, src, n, kind, stream)".
inline std::string call_name(const char* call) {
  const char* paren = std::strchr(call, '(');
  return paren ? std::string(call, size_t(paren - call)) : std::string(call);
}
}  // namespace detail

[[noreturn]] inline void throw_error(cudaError_t e, const char* call, const char* file, int line) {
  // A recoverable error is also latched as the thread's last error; clear it so the next
  // cudaGetLastError() (the queue checks it after every task) does not report it a second time.
  cudaGetLastError();
  fail(detail::call_name(call), " failed: ", error_text(e), " [", detail::short_path(file), ":", line, "]",
       sticky_hint(e));
}

}  // namespace cuda
}  // namespace tk

#define CUDA_CHECK(call)                                                           \
  do {                                                                             \
    cudaError_t tk_cuda_check_err_ = (call);                                       \
    if (tk_cuda_check_err_ != cudaSuccess)                                         \
      ::tk::cuda::throw_error(tk_cuda_check_err_, #call, __FILE__, __LINE__);      \
  } while (0)
