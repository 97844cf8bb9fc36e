#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: the CUDA tests, correctness against references,
# and the GPU benchmarks; writes gpu-check/summary.json and gpu-check/summary.txt (a table).
#
#   bench/gpu_check.sh              # on the GPU machine (about 8 minutes at most)
#   bench/gpu_check.sh --dry-run    # the same Python entry points, tiny, on the CPU
#
# The GPU machine is offline with its own torch / transformers / triton: whatever Winnow needs
# beyond them is installed from bench/wheels (only modules that do not import already; torch is
# never touched).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-check}
DEVICE=cuda
DRY=()
SCALE=1  # time limits are sized for the GPU; a (shared) CPU gets more for the tiny dry run
if [[ "${1:-}" == "--dry-run" || "${1:-}" == "--cpu" ]]; then
    DEVICE=cpu
    DRY=(--dry-run)
    SCALE=${SCALE_DRY_RUN:-6}
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WINNOW_CACHE_DIR=${WINNOW_CACHE_DIR:-$OUT/cache}
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/*.rc

# module to import -> wheel file prefix in bench/wheels
install_missing() {
    local pairs=(
        "pytest:pytest" "pluggy:pluggy" "iniconfig:iniconfig" "pytest_asyncio:pytest_asyncio"
        "fastapi:fastapi" "starlette:starlette" "uvicorn:uvicorn" "h11:h11" "click:click"
        "anyio:anyio" "sniffio:sniffio" "idna:idna" "httpx:httpx" "httpcore:httpcore"
        "certifi:certifi" "prometheus_client:prometheus_client"
        "pydantic:pydantic-" "pydantic_core:pydantic_core" "annotated_types:annotated_types"
        "typing_inspection:typing_inspection" "jsonschema:jsonschema-"
        "jsonschema_specifications:jsonschema_specifications" "referencing:referencing"
        "rpds:rpds_py" "attrs:attrs" "llguidance:llguidance" "mistral_common:mistral_common"
        "sentencepiece:sentencepiece" "tiktoken:tiktoken" "PIL:pillow" "requests:requests"
        "urllib3:urllib3" "charset_normalizer:charset_normalizer" "pycountry:pycountry"
        "jinja2:jinja2" "markupsafe:markupsafe" "regex:regex"
    )
    local wheels=()
    for pair in "${pairs[@]}"; do
        local module=${pair%%:*} prefix=${pair#*:}
        if ! "$PYTHON" -c "import $module" 2>/dev/null; then
            local found=("$ROOT"/bench/wheels/"$prefix"*.whl)
            [[ -e "${found[0]}" ]] && wheels+=("${found[0]}")
        fi
    done
    if ((${#wheels[@]})); then
        echo "installing ${#wheels[@]} wheels from bench/wheels"
        "$PYTHON" -m pip install --no-index --no-deps --quiet "${wheels[@]}"
    fi
}

# run NAME LIMIT_S COMMAND...: one part, its log in $OUT/NAME.log; a failure does not stop the rest
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most $((limit * SCALE))s)"
    local start=$SECONDS
    timeout --kill-after=10 "$((limit * SCALE))" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$OUT/$name.rc"
    echo "   exit $rc after $((SECONDS - start))s (log: $OUT/$name.log)"
    [[ $rc -ne 0 ]] && tail -n 5 "$OUT/$name.log"
    return 0
}

if [[ $DEVICE == cuda ]]; then
    install_missing
    DEVICE_NAME=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())")
    "$PYTHON" -c "import torch, transformers, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| transformers', transformers.__version__, '| triton', triton.__version__)"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
else
    DEVICE_NAME="CPU dry run"
fi
CHECK=("$PYTHON" "$ROOT/bench/gpu/check.py")
SMALL=qwen2.5-0.5b
BIG=llama-3.1-8b
if [[ $DEVICE == cpu ]]; then SMALL=tiny; BIG=tiny; fi  # one tiny shape stands in for both

# the CUDA tests: every test that selects CUDA (they skip on a CPU)
if [[ $DEVICE == cuda ]]; then
    run tests 100 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/kernels \
        tests/models/test_attention_backend.py
    "$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = (out / "tests.log").read_text().strip().splitlines() or ["no output"]
rc = int((out / "tests.rc").read_text())
(out / "tests.json").write_text(json.dumps({"summary": lines[-1], "returncode": rc}))
PY
fi
run correctness 70 "${CHECK[@]}" correctness --shape "$SMALL" --device "$DEVICE" "${DRY[@]}" \
    --out "$OUT/correctness.json"
run sampler 30 "${CHECK[@]}" sampler --device "$DEVICE" "${DRY[@]}" --out "$OUT/sampler.json"
run speed-small 50 "${CHECK[@]}" speed --shape "$SMALL" --device "$DEVICE" "${DRY[@]}" \
    --out "$OUT/speed-small.json"
if [[ $BIG != "$SMALL" ]]; then
    run speed-big 110 "${CHECK[@]}" speed --shape "$BIG" --device "$DEVICE" "${DRY[@]}" \
        --out "$OUT/speed-big.json"
fi
run offline 100 "${CHECK[@]}" offline --shape "$SMALL" --device "$DEVICE" "${DRY[@]}" \
    --time-limit 40 --out "$OUT/offline.json"

"$PYTHON" "$ROOT/bench/gpu/report.py" "$OUT" "$DEVICE_NAME"
