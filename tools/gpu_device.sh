#!/usr/bin/env bash
# Runs ON the lent device machine (see tools/gpu_carry.py for the sequence of calls).
#   bash tools/gpu_device.sh receive   # after a call that carried gpu-carry/partK: lists what has arrived
#   bash tools/gpu_device.sh check     # joins the parts, installs them, runs tools/gpu_check.py
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
have=$(ls gpu-carry/part*/ort.* 2>/dev/null | wc -l)
echo "parts here: $have $(ls gpu-carry 2>/dev/null | tr '\n' ' ')"
[ "${1:-}" = receive ] && exit 0
want=$(cat gpu-carry/small/ort.parts)
if [ "$have" -lt "$want" ]; then echo "missing parts: $have of $want (the machine went back between calls?)"; exit 3; fi
wheel=gpu-carry/$(cat gpu-carry/small/ort.name)
cat $(ls gpu-carry/part*/ort.* | sort -t. -k2) > "$wheel"
echo "$(cat gpu-carry/small/ort.sha256)  $wheel" | sha256sum -c - || exit 3
PY=${PY:-python3}
$PY -m pip install -q --no-index --no-deps --target gpu-carry/site "$wheel" gpu-carry/small/*.whl || exit 3
export PYTHONPATH=$PWD/gpu-carry/site:$PWD PYTHONUNBUFFERED=1
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY tools/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
