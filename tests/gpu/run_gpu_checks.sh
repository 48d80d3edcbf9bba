#!/usr/bin/env bash
# GPU checks in one command, from the repository root:
#
#     bash tests/gpu/run_gpu_checks.sh
#
# 1. the GPU tests (tests/gpu: cuda_ipc and nixl conformance on GPU memory, cuda_ipc across
#    processes, the csrc kernels),
# 2. the csrc gather/scatter kernels' bandwidth check,
# 3. the transfer benchmark on GPU memory: cuda_ipc against a device-to-device copy of the
#    same bytes, nixl (when installed) against raw NIXL on the same GPU memory, both measured
#    in the same run; tcp on host memory for reference,
# then a short table, last. Exit 0 only when every step passed and cuda_ipc moved at least
# 0.8x the bytes per second of the device-to-device copy at the largest size.
#
# Needs a CUDA GPU and cupy (pip install 'pdfabric[cuda]'); nixl rows need nixl. Every
# step runs under `timeout`; the whole script stays under 5 minutes. CI never runs it
# (.ci/run runs `make test`, where tests/gpu skips itself without a GPU).
# Environment: PYTHON (default .venv/bin/python), OUT_DIR (JSON results; default a
# folder under /tmp, printed at the end), SIZES (default 256MiB,2GiB).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/pdfabric-gpu-checks.XXXXXX")}
SIZES=${SIZES:-256MiB,2GiB}
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: >"$STEPS"

# step NAME SECONDS CMD...: run CMD under timeout, log its output, record pass/FAIL/TIMEOUT
step() {
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=${PIPESTATUS[0]}
  local verdict=pass
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict=TIMEOUT; elif [ "$rc" != 0 ]; then verdict="FAIL (exit $rc)"; fi
  printf '%s\t%s\t%ss\n' "$name" "$verdict" "$((SECONDS - t0))" >>"$STEPS"
}

reason=$("$PY" -c 'from pdfabric.transports.cuda_ipc import unavailable_reason; print(unavailable_reason())')
if [ -n "$reason" ]; then
  echo "GPU checks cannot run here: $reason" >&2
  exit 2
fi

step gpu-tests 130 "$PY" -m pytest -q -p no:cacheprovider -rs tests/gpu

# kernels: the csrc/ gather/scatter bandwidth (bytes read + written) against a device copy of the
# same bytes, flash/CPU/MLA layouts; exits 1 below --min-ratio (0.7)
step kernels 40 "$PY" -m pdfabric.kernels --bench --json "$OUT/kernels-bench.json"

GPU_TRANSPORTS=cuda_ipc
if "$PY" -c 'import nixl' 2>/dev/null; then GPU_TRANSPORTS=cuda_ipc,nixl; fi
step bench-gpu 80 "$PY" -m pdfabric.cli bench transfer --transport "$GPU_TRANSPORTS" --device cuda \
  --size "$SIZES" --block-size 2MiB --rounds 3 --latency-iters 50 --json "$OUT/bench-gpu.json"
step bench-tcp 30 "$PY" -m pdfabric.cli bench transfer --transport tcp --size 256MiB --block-size 2MiB \
  --rounds 3 --latency-iters 50 --json "$OUT/bench-tcp.json"

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines() if line]
rows = []
for name, memory in (("bench-gpu.json", "GPU"), ("bench-tcp.json", "host")):
    f = out / name
    if f.exists():
        rows += [dict(r, memory=memory) for r in json.loads(f.read_text())["results"] if r["workload"] != "latency"]

def size(n):
    return f"{n / 2**30:g}GiB" if n >= 2**30 else f"{n / 2**20:g}MiB"

try:
    import cupy

    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
except Exception as e:  # noqa: BLE001 - only a label
    gpu = f"GPU name unknown ({e})"
print(f"\npdfabric GPU checks on {gpu} (results in {out})")
print(f"{'check':<12} {'result':<16} time")
for name, verdict, secs in steps:
    print(f"{name:<12} {verdict:<16} {secs}")
print(f"\n{'transport':<10} {'memory':<6} {'total':>7} {'GB/s':>8} {'baseline':<10} {'base GB/s':>9} {'ratio':>6} {'ref':>6} {'vs d2d':>6} {'extra us':>9}")
for r in sorted(rows, key=lambda r: (r["memory"], r["transport"], r["total_bytes"])):
    extra = (r["total_bytes"] / r["gbps"] - r["total_bytes"] / r["baseline_gbps"]) / 1e3  # us per transfer over the baseline
    ref = "-" if r.get("ratio_reference") is None else f"{r['ratio_reference']:.2f}"
    d2d = "-" if r.get("ratio_to_d2d") is None else f"{r['ratio_to_d2d']:.2f}"
    print(f"{r['transport']:<10} {r['memory']:<6} {size(r['total_bytes']):>7} {r['gbps']:>8.1f} {r['baseline']:<10} "
          f"{r['baseline_gbps']:>9.1f} {r['ratio']:>6.2f} {ref:>6} {d2d:>6} {extra:>9.0f}")
ipc = [r for r in rows if r["transport"] == "cuda_ipc"]
ok = all(v == "pass" for _, v, _ in steps)
if ipc:
    top = max(ipc, key=lambda r: r["total_bytes"])
    good = top["ratio"] >= 0.8
    ok &= good
    print(f"\ncuda_ipc vs d2d_copy at {size(top['total_bytes'])}: {top['ratio']:.2f}x "
          f"({'PASS' if good else 'FAIL'}: target >= 0.80x)")
else:
    ok = False
    print("\ncuda_ipc vs d2d_copy: no result (see bench-gpu.log)")
print("ALL PASS" if ok else "SOME CHECKS FAILED")
sys.exit(0 if ok else 1)
EOF
