#!/usr/bin/env bash
# Download, once, every wheel bench/gpu_check.sh needs into bench/gpu/wheelhouse (ignored by
# git), for a Python version and Linux x86_64: run it on a machine with network access, then
# carry the folder to an offline GPU host.
#
#   bench/gpu/fetch_wheels.sh                      # for this host's python3
#   bench/gpu/fetch_wheels.sh --python-version 3.12
#   bench/gpu/fetch_wheels.sh --torch-index https://download.pytorch.org/whl/cu126
#
# torch comes from PyTorch's CUDA 12.6 index by default (drivers >= 525.60.13, as the Docker
# image); the rest from the default index, at constraints.txt's versions.
set -uo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
WHEELHOUSE=${WHEELHOUSE:-$ROOT/bench/gpu/wheelhouse}
PYTHON=${PYTHON:-python3}
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
TORCH_INDEX=https://download.pytorch.org/whl/cu126
while (($#)); do
    case $1 in
        --python-version) PY_VERSION=$2; shift 2 ;;
        --torch-index) TORCH_INDEX=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

mkdir -p "$WHEELHOUSE"
# Binary wheels for the target interpreter, whatever runs this script.
TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform linux_x86_64)
REQUIREMENTS=$("$PYTHON" "$ROOT/bench/gpu/requirements.py")
echo "downloading wheels for Python $PY_VERSION into $WHEELHOUSE"
"$PYTHON" -m pip download --quiet -d "$WHEELHOUSE" -c "$ROOT/constraints.txt" "${TARGET[@]}" \
    --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple torch || exit 1
# shellcheck disable=SC2086  # one requirement per word
"$PYTHON" -m pip download --quiet -d "$WHEELHOUSE" -c "$ROOT/constraints.txt" "${TARGET[@]}" \
    --extra-index-url "$TORCH_INDEX" $REQUIREMENTS || exit 1
echo "$(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
