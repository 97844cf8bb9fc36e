#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: the CUDA tests, correctness against references,
# sampling, long-context decode and the GPU benchmarks; every part is reported PASS, FAIL (it
# crashed, ran over its budget or missed a check) or MISSING (the setup failed before it), in
# gpu-check/summary.txt and summary.json. Exits 0 only when every part passed.
#
#   bench/gpu/fetch_wheels.sh               # once, where there is network: the wheelhouse
#   bench/gpu_check.sh [--budget SECONDS]   # on the GPU machine
#   bench/gpu_check.sh --dry-run            # the same parts, tiny, on the CPU
#
# It makes its own venv (gpu-check/venv, seeing the host's site packages, so a torch already
# there is used) with whatever Python 3.10-3.13 the host has, and installs what is missing from
# bench/gpu/wheelhouse, or from the package index when there is no wheelhouse. PYTHON=... runs
# the parts with that interpreter as it is instead.
set -uo pipefail  # no -e: a failing part must not lose the others or the summary

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-check}
WHEELHOUSE=${WHEELHOUSE:-$ROOT/bench/gpu/wheelhouse}
TORCH_INDEX=https://download.pytorch.org/whl/cu126
DEVICE=cuda
DRY=()
BUDGET=2400  # seconds for all parts: room for ~32 cold Triton compiles of seconds each
while (($#)); do
    case $1 in
        --dry-run | --cpu) DEVICE=cpu; DRY=(--dry-run); BUDGET=${BUDGET_DRY_RUN:-900}; shift ;;
        --budget) BUDGET=$2; shift 2 ;;
        *) echo "usage: $0 [--dry-run] [--budget SECONDS]" >&2; exit 2 ;;
    esac
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WINNOW_CACHE_DIR=${WINNOW_CACHE_DIR:-$OUT/cache}
# Compiled Triton kernels survive between runs: a second run starts warm.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT/triton-cache}
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/*.rc "$OUT"/summary.txt

# run NAME SHARE COMMAND...: one part with SHARE percent of the budget (at least a minute), its
# output in $OUT/NAME.log and its exit status in $OUT/NAME.rc; a failure stops nothing.
run() {
    local name=$1 share=$2
    shift 2
    local limit=$((BUDGET * share / 100))
    ((limit < 60)) && limit=60
    echo "== $name (at most ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$OUT/$name.rc"
    echo "   exit $rc after $((SECONDS - start))s (log: $OUT/$name.log)"
    ((rc != 0)) && tail -n 5 "$OUT/$name.log"
    return 0
}

host_python() {
    local candidate
    for candidate in python3.12 python3.11 python3.13 python3.10 python3; do
        command -v "$candidate" >/dev/null || continue
        if "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))'
        then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# setup: the venv and what it lacks (torch only when no torch imports)
setup() {
    local host
    host=$(host_python) || { echo "no Python 3.10-3.13 on this host"; return 1; }
    echo "host Python: $host ($("$host" --version 2>&1))"
    "$host" -m venv --system-site-packages "$OUT/venv" || return 1
    local py=$OUT/venv/bin/python source=() torch_source=(--index-url "$TORCH_INDEX"
        --extra-index-url https://pypi.org/simple)
    if [[ -d $WHEELHOUSE ]]; then
        source=(--no-index --find-links "$WHEELHOUSE")
        torch_source=("${source[@]}")
        echo "installing from $WHEELHOUSE"
    else
        echo "no wheelhouse ($WHEELHOUSE): installing from the index"
    fi
    local pip=("$py" -m pip install --disable-pip-version-check --quiet --retries 2 --timeout 20)
    if ! "$py" -c 'import torch' 2>/dev/null; then
        "${pip[@]}" "${torch_source[@]}" -c "$ROOT/constraints.txt" torch || return 1
    fi
    pip+=("${source[@]}")
    mapfile -t requirements < <("$py" "$ROOT/bench/gpu/requirements.py")
    if ! "${pip[@]}" -c "$ROOT/constraints.txt" "${requirements[@]}"; then
        echo "the pinned versions cannot be installed; trying what the host already has"
        "${pip[@]}" "${requirements[@]}" || return 1
    fi
    "$py" -c "import torch, transformers, triton; print('torch', torch.__version__, 'CUDA', \
torch.version.cuda, '| transformers', transformers.__version__, '| triton', triton.__version__)"
}

PARTS=()
if [[ -n ${PYTHON:-} ]]; then
    echo "using $PYTHON as it is"
else
    PARTS+=(setup)
    export ROOT OUT WHEELHOUSE TORCH_INDEX
    export -f host_python setup
    run setup 10 bash -c setup
    cat "$OUT/setup.log"
    PYTHON=$OUT/venv/bin/python
fi
READY=1
if [[ -f $OUT/setup.rc && $(cat "$OUT/setup.rc") != 0 ]]; then READY=0; fi

if [[ $DEVICE == cuda ]]; then
    DEVICE_NAME=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null \
        || echo "no usable CUDA device")
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
    DEVICE_NAME="CPU dry run"
fi
CHECK=("$PYTHON" "$ROOT/bench/gpu/check.py")
SMALL=qwen2.5-0.5b
BIG=llama-3.1-8b
if [[ $DEVICE == cpu ]]; then SMALL=tiny; BIG=tiny; fi  # one tiny shape stands in for both

part() {  # part NAME SHARE ARGS...: a check.py part, or nothing when the setup failed
    local name=$1
    PARTS+=("$name")
    ((READY)) && run "$name" "$2" "${CHECK[@]}" "${@:3}" --device "$DEVICE" "${DRY[@]}" \
        --out "$OUT/$name.json"
}

if [[ $DEVICE == cuda ]]; then
    PARTS+=(tests)
    ((READY)) && run tests 15 "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels \
        tests/models/test_attention_backend.py tests/models/test_device.py
fi
part correctness 10 correctness --shape "$SMALL"
part sampler 5 sampler
part speed-small 10 speed --shape "$SMALL"
if [[ $BIG != "$SMALL" ]]; then
    part speed-big 15 speed --shape "$BIG"
fi
part long_context 15 long_context --shape "$SMALL"
part offline 15 offline --shape "$SMALL" --time-limit "$((BUDGET / 20 > 40 ? BUDGET / 20 : 40))"

REPORT_PYTHON=$PYTHON
"$REPORT_PYTHON" -c pass 2>/dev/null || REPORT_PYTHON=python3  # the venv may not have come up
exec "$REPORT_PYTHON" "$ROOT/bench/gpu/report.py" "$OUT" "$DEVICE_NAME" "${PARTS[@]}"
