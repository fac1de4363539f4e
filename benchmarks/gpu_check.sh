#!/usr/bin/env bash
# One-shot GPU check (a lent CUDA machine, < 8 minutes): build intro2llm._C with CUDA, run the op tests on the
# GPU (every op test runs on CUDA tensors when a GPU is visible, Triton compiled for real), run the kernel
# benchmarks, write JSON to $OUT (or ./gpu_results) and print a short table.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export INTRO2LLM_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
status=0
t0=$(date +%s)

echo "=== build ($(python -c 'import torch; print(torch.__version__, torch.version.cuda)'))"
pip install -q pytest pytest-benchmark hypothesis >/dev/null 2>&1
pip install -q --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { echo "build failed (see $OUT/build.log)"; tail -30 "$OUT/build.log"; exit 1; }
python -m intro2llm info | tee "$OUT/info.txt"

echo "=== op tests on the GPU"
# Op suites; each file runs its cases on CUDA tensors here. The list grows with every kernel.
OP_TESTS=$(ls tests/test_rms_norm.py tests/test_layer_norm.py tests/test_rope.py tests/test_swiglu.py \
  tests/test_cross_entropy.py tests/test_fused_linear_cross_entropy.py tests/test_flash_attention*.py \
  tests/test_nf4.py 2>/dev/null)
timeout 240 pytest $OP_TESTS -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" 2>&1 | tail -15 || status=1

echo "=== kernel benchmarks"
# nf4: Triton/CUDA nf4_matmul at 1/4/16 tokens vs dequantize + cuBLAS (dequant+linear) and bitsandbytes if present
for b in rms_norm rope swiglu cross_entropy fused_linear_cross_entropy attention nf4; do
  f=benchmarks/bench_$b.py
  [ -f "$f" ] || continue
  timeout 120 pytest "$f" -q -p no:cacheprovider --benchmark-only --benchmark-min-rounds=5 \
    --benchmark-json="$OUT/bench_$b.json" > "$OUT/bench_$b.log" 2>&1 || { echo "bench $b failed"; status=1; }
done

python - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows, summary = [], {}
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    for b in json.load(open(path))["benchmarks"]:
        info = b.get("extra_info", {})
        rows.append((b["group"] or "", b["name"], b["stats"]["min"] * 1e3, info.get("GB/s"), info.get("TFLOP/s")))
        summary.setdefault(b["group"] or "", {})[b["name"]] = {"min_ms": b["stats"]["min"] * 1e3, **info}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(f"{'group':<44} {'name':<58} {'min ms':>9} {'GB/s':>8} {'TFLOP/s':>8}")
for g, n, ms, gbs, tf in rows:
    print(f"{g:<44} {n:<58} {ms:9.3f} {gbs if gbs is not None else '':>8} {tf if tf is not None else '':>8}")
PY
echo "=== done in $(( $(date +%s) - t0 )) s, status $status"
exit $status
