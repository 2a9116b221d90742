#!/usr/bin/env bash
# scan at scale: a 20000x20000 tiled RGB TIFF (tools/make_scene_tiff.py) with models/vgg_small.onnx:
# a clean run with its peak RSS, a run killed with kill -9 and resumed, a run on a local dask
# scheduler with two worker processes, and the three maps compared bit for bit. About 3 minutes
# on 2 cores; needs the scan extra and ~3 GB free. Usage: bash tools/scan_at_scale.sh [SIZE]
set -u
cd "$(dirname "$0")/.."
SIZE=${1:-20000}
IMG=bench-out/scene$SIZE.tif
[ -f $IMG ] || python tools/make_scene_tiff.py --size $SIZE -o $IMG
M=models/vgg_small.onnx
echo "== 1. clean scan (in this process), peak RSS"
rm -rf bench-out/clean.zarr
/usr/bin/time -f "wall %e s, peak RSS %M KiB" python -m onnx_fc2conv scan $M $IMG -o bench-out/clean.zarr 2>&1 | tr '\r' '\n' | grep -v "^scan: .*%|" ; 
echo "== 2. killed with kill -9 after 12 s, then --resume --check (sampled regions vs one pass)"
rm -rf bench-out/kill.zarr
python -m onnx_fc2conv scan $M $IMG -o bench-out/kill.zarr -q & P=$!
sleep 12; kill -9 $P; wait $P; echo "killed: exit $?"
python - <<'PY'
import zarr; g=zarr.open_group("bench-out/kill.zarr", mode="r"); f=g["tiles_done"][...]; print(f"after kill -9: {int(f.sum())} of {f.size} tiles flagged done")
PY
echo "-- without --resume (must be refused):"; python -m onnx_fc2conv scan $M $IMG -o bench-out/kill.zarr; echo "exit $?"
/usr/bin/time -f "wall %e s, peak RSS %M KiB" python -m onnx_fc2conv scan $M $IMG -o bench-out/kill.zarr --resume --check 2>&1 | tr '\r' '\n' | grep -v "^scan: .*%|"
echo "== 3. a local dask scheduler and two worker processes"
rm -rf bench-out/dask.zarr
PORT=8799
dask scheduler --host 127.0.0.1 --port $PORT --no-dashboard > bench-out/scheduler.log 2>&1 & S=$!
sleep 3
dask worker tcp://127.0.0.1:$PORT --nworkers 2 --nthreads 1 --no-dashboard > bench-out/workers.log 2>&1 & W=$!
sleep 5
/usr/bin/time -f "wall %e s, peak RSS (client) %M KiB" python -m onnx_fc2conv scan $M $IMG -o bench-out/dask.zarr --scheduler tcp://127.0.0.1:$PORT 2>&1 | tr '\r' '\n' | grep -v "^scan: .*%|"
kill $W; sleep 2; kill $S; wait
echo "== 4. the maps compared"
python - <<'PY'
import numpy as np, zarr
a = zarr.open_group("bench-out/clean.zarr", mode="r")["prob"][...]
for name in ("kill", "dask"):
    try:
        b = zarr.open_group(f"bench-out/{name}.zarr", mode="r")["prob"][...]
    except Exception as e:
        print(name, "missing", e); continue
    print(f"{name}.zarr vs clean.zarr: shape {b.shape}, NaN {int(np.isnan(b).sum())}, identical {np.array_equal(a, b)}, max |d| {np.nanmax(np.abs(a - b)):.3g}")
PY
