# The CPU-only addon through node-gyp (`npm run build:native:gyp`). CMake (cmake-js) is the primary
# build and the only one with CUDA; the source list below must equal TUNEKIT_CPU_SOURCES plus
# TUNEKIT_ADDON_SOURCES in CMakeLists.txt (tests/build-sources.test.ts checks it).
{
  "targets": [
    {
      "target_name": "tunekit",
      "sources": [
        "native/core/allocator.cpp",
        "native/core/queue.cpp",
        "native/core/runtime.cpp",
        "native/core/thread_pool.cpp",
        "native/cpu/attention.cpp",
        "native/cpu/distill.cpp",
        "native/cpu/elementwise.cpp",
        "native/cpu/gemm.cpp",
        "native/cpu/gemm_kernels_avx2.cpp",
        "native/cpu/gemm_kernels_avx512.cpp",
        "native/cpu/gemm_kernels_portable.cpp",
        "native/cpu/isa.cpp",
        "native/cpu/linear_loss.cpp",
        "native/cpu/loss.cpp",
        "native/cpu/nf4.cpp",
        "native/cpu/norm.cpp",
        "native/cpu/optim.cpp",
        "native/cpu/probe.cpp",
        "native/cpu/qlora.cpp",
        "native/cpu/rope.cpp",
        "native/ops/ops.cpp",
        "native/addon/addon.cpp"
      ],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "."
      ],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-std=gnu++17", "-std=gnu++20"],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-fno-math-errno"],
      "xcode_settings": {
        "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
        "CLANG_CXX_LANGUAGE_STANDARD": "c++17"
      },
      "msvs_settings": {
        "VCCLCompilerTool": { "ExceptionHandling": 1, "AdditionalOptions": ["/std:c++17"] }
      }
    }
  ]
}
