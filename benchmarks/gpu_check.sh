#!/usr/bin/env bash
# GPU check for the Triton kernels: one command, under 8 minutes, run from anywhere in the repository.
#
#   benchmarks/gpu_check.sh OUT_DIR          # or with $OUT set: benchmarks/gpu_check.sh
#   EMLLM_GPU_CHECK_TINY=1 benchmarks/gpu_check.sh /tmp/check    # dry run on CPU: interpreter, tiny model
#
# Stages, each under its own `timeout`, each recorded in OUT_DIR/stages.json as soon as it ends:
#   0 wheels   only if EMLLM_WHEELS names a folder (benchmarks/gpu_payload.sh fills one): installs its wheels,
#              no index, into a folder put first on PYTHONPATH (pydantic, the tested transformers)
#   1 env      versions of python, torch, CUDA, triton, transformers; nvidia-smi        -> env.json
#   2 tests    tests/test_kernels.py compiled on CUDA (no interpreter)                  -> kernel_tests.xml
#   3 bench    benchmarks/gpu_bench.py: 8B-shaped random model, micro-benchmarks        -> gpu.json
#              (rows are written as they are measured; copied to benchmarks/results/gpu.json at the end)
# The repository is used in place, not installed: PYTHONPATH=core:triton_kernels:.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-}}"
if [[ -z "$OUT_DIR" ]]; then
    echo "usage: benchmarks/gpu_check.sh OUT_DIR (or set \$OUT)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
TINY=()
[[ "${EMLLM_GPU_CHECK_TINY:-0}" == 1 ]] && TINY=(--tiny)
export PYTHONPATH="core:triton_kernels:.${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
TOTAL_S=470                      # the whole check stays under 8 minutes
START=$(date +%s)
STAGES="$OUT_DIR/stages.json"
echo "[]" > "$STAGES"

seconds_left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# record NAME RC SECONDS: append one stage's outcome to stages.json (rewritten whole, so always valid JSON)
record() {
    "$PY" - "$STAGES" "$1" "$2" "$3" <<'EOF'
import json, sys
path, name, rc, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stages = json.load(open(path))
status = "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")
stages.append({"stage": name, "status": status, "rc": rc, "seconds": seconds, "log": f"{name}.log"})
json.dump(stages, open(path, "w"), indent=1)
EOF
}

# stage NAME LIMIT_S COMMAND...: run under timeout (never past the overall budget), log to OUT_DIR/NAME.log
stage() {
    local name=$1 limit=$2 left
    shift 2
    left=$(( $(seconds_left) - 5 ))
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then
        echo "== $name: skipped, no time left"
        record "$name" 125 0
        return
    fi
    echo "== $name (at most ${limit}s)"
    local begin=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    record "$name" "$rc" $(( $(date +%s) - begin ))
    tail -n 5 "$OUT_DIR/$name.log"
}

if [[ -n "${EMLLM_WHEELS:-}" ]]; then
    # into a folder of their own, first on the path: the image's packages stay as they are
    SITE="${TMPDIR:-/tmp}/emllm-site"
    stage wheels 90 bash -c '
"$0" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$2" "$1"/*.whl || exit 1
PYTHONPATH="$2:$PYTHONPATH" "$0" -c "import transformers; print(\"transformers\", transformers.__version__)" && exit 0
echo "the carried transformers does not import here: falling back on the image'"'"'s own"
rm -rf "$2"/transformers "$2"/transformers-*.dist-info' "$PY" "$EMLLM_WHEELS" "$SITE"
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi

stage env 60 bash -c '
"$0" - <<EOF > "$1/env.json"
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for name in ("triton", "transformers", "pydantic", "pytest", "hypothesis"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
print(json.dumps(info, indent=1))
EOF
cat "$1/env.json"; nvidia-smi || true' "$PY" "$OUT_DIR"

XDIST=()  # the kernel tests compile dozens of variants: spread them over the cores where xdist is installed
[[ ${#TINY[@]} -eq 0 ]] && "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
stage tests 170 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests/test_kernels.py \
    --junitxml="$OUT_DIR/kernel_tests.xml"

BENCH_BUDGET=$(( $(seconds_left) - 25 ))
INTERPRET=()  # the dry run takes the kernel rows too, in Triton's interpreter
[[ ${#TINY[@]} -gt 0 ]] && INTERPRET=(env TRITON_INTERPRET=1)
stage bench $(( BENCH_BUDGET + 15 )) "${INTERPRET[@]}" "$PY" benchmarks/gpu_bench.py "${TINY[@]}" \
    --out "$OUT_DIR/gpu.json" --budget-s "$BENCH_BUDGET"
if [[ -s "$OUT_DIR/gpu.json" && ${#TINY[@]} -eq 0 ]]; then
    mkdir -p benchmarks/results && cp "$OUT_DIR/gpu.json" benchmarks/results/gpu.json
fi

echo "== done in $(( $(date +%s) - START ))s; stages: $STAGES"
cat "$STAGES"
