"""GPU check: convert the sample models and the VGG16 layout in keep and
dense mode, prove them on onnxruntime's CUDA execution provider, and run the
dense benchmark on CUDA. Prints one table. Needs an NVIDIA GPU and the
onnxruntime-gpu package (it exits 2 saying so elsewhere).

    python tools/gpu_check.py [--skip-bench] [--skip-scan] [--sizes 256 384 448 512] [--reps 10]
                              [--scan-size 8192]

The check runs with TF32 off (``use_tf32=0``) so float32 is compared as
float32; the script also reports what TF32 on would give for the VGG16 head.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 384, 448, 512])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-scan", action="store_true")
    ap.add_argument("--scan-size", type=int, default=8192, help="the scan row's image side")
    args = ap.parse_args(argv)
    try:
        import onnxruntime as ort
    except ImportError:
        print("gpu_check: onnxruntime is not installed", file=sys.stderr)
        return 2
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"gpu_check: needs an NVIDIA GPU and onnxruntime-gpu; this onnxruntime {ort.__version__} has "
              f"{', '.join(ort.get_available_providers())}", file=sys.stderr)
        return 2
    import numpy as np

    import make_models
    from onnx_fc2conv import check, convert
    from onnx_fc2conv.errors import Fc2ConvError

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    print(f"onnxruntime {ort.__version__} providers {ort.get_available_providers()}")
    models = {p.name: p for p in sorted((ROOT / "models").glob("*.onnx"))}
    fixtures = {p.name: p for p in sorted((ROOT / "tests" / "fixtures").glob("*.onnx"))}
    t0 = time.perf_counter()
    vgg = make_models.vgg16_layout(batch="N")
    tmp = ROOT / "bench-out"
    tmp.mkdir(exist_ok=True)
    make_models.save(vgg, tmp / "vgg16.onnx")
    del vgg
    models["vgg16_layout (528 MiB)"] = tmp / "vgg16.onnx"
    print(f"built VGG16 layout in {time.perf_counter() - t0:.1f} s")
    print(f"\n{'model':34} {'mode':5} {'result':7} {'max abs':>9} {'max rel':>9} {'min atol':>9}  outputs")
    failures = 0
    for name, path in list(models.items()) + list(fixtures.items()):
        for dense in (False, True):
            try:
                result = convert(path, dense=dense)
                report = check(path, result.model, provider="cuda", dense=dense)
            except Fc2ConvError as exc:
                print(f"{name:34} {'dense' if dense else 'keep':5} {'n/a':7} {str(exc)[:70]}")
                continue
            worst = max(report.outputs, key=lambda o: o.max_abs) if report.outputs else None
            failures += not report.ok
            print(f"{name:34} {'dense' if dense else 'keep':5} {'PASSED' if report.ok else 'FAILED':7} "
                  f"{worst.max_abs if worst else float('nan'):9.2e} {max(o.max_rel for o in report.outputs) if worst else float('nan'):9.2e} "
                  f"{max(o.min_atol for o in report.outputs) if worst else float('nan'):9.2e}  {len(report.outputs)}"
                  + ("" if report.ok else "  " + "; ".join(report.errors + [o.line() for o in report.outputs if not o.passed])[:300]))
    # TF32 on: what the check would see if it allowed it (VGG16 keep mode)
    import onnxruntime as ort
    path = models["vgg16_layout (528 MiB)"]
    conv = convert(path).model
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    outs = {}
    for tf32 in ("0", "1"):
        for tag, m in (("orig", str(path)), ("conv", conv.SerializeToString())):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            s = ort.InferenceSession(m, so, providers=[("CUDAExecutionProvider", {"use_tf32": tf32}), "CPUExecutionProvider"])
            outs[(tf32, tag)] = s.run(None, {"input": x})[0]
    for tf32 in ("0", "1"):
        d = np.abs(outs[(tf32, "orig")] - outs[(tf32, "conv")])
        print(f"VGG16 keep, use_tf32={tf32}: max abs {d.max():.3e}, max |out| {np.abs(outs[(tf32, 'orig')]).max():.3g}")
    d = np.abs(outs[("1", "orig")] - outs[("0", "orig")])
    print(f"VGG16 original, TF32 on vs off: max abs {d.max():.3e}")
    if not args.skip_scan:
        failures += scan_row(tmp, args.scan_size)
    if not args.skip_bench:
        import bench_dense
        bench_dense.main(["--provider", "cuda", "--reps", str(args.reps), "--sizes", *map(str, args.sizes)])
    return 1 if failures else 0


def scan_row(tmp: Path, size: int) -> int:
    """scan on CUDA (IO binding, the next tile read while the GPU runs this one): pixels/s against one pass of
    the dense model on the GPU at the largest size tried that fits, and the map against a CPU scan of a corner."""
    import numpy as np

    import bench_scan
    from onnx_fc2conv.scanning import engine, model as model_mod

    vgg = ROOT / "models" / "vgg_small.onnx"
    img = bench_scan.image(tmp, size)
    wall, _ = bench_scan.run_scan(vgg, img, tmp / "gpu.zarr", provider="cuda", tile=2048)
    rate = size * size / wall
    dense = model_mod.prepare(vgg)
    sess = engine.session(dense.data, "cuda", None)
    one = None
    for side in (8192, 6144, 4096, 2048):
        x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
        try:
            sess.run(None, {dense.input: x})
            t0 = time.perf_counter()
            sess.run(None, {dense.input: x})
            one = (side, side * side / (time.perf_counter() - t0))
            break
        except Exception:
            continue
    # the same map on the CPU: a 2048^2 corner scanned on both providers
    corner = np.load(img, mmap_mode="r")[:2048, :2048]
    bench_scan.run_scan(vgg, np.ascontiguousarray(corner), tmp / "c_gpu.zarr", provider="cuda", tile=1024)
    bench_scan.run_scan(vgg, np.ascontiguousarray(corner), tmp / "c_cpu.zarr", provider="cpu", tile=1024)
    import zarr

    a, b = (zarr.open_group(str(tmp / n), mode="r")["prob"][...] for n in ("c_gpu.zarr", "c_cpu.zarr"))
    d = float(np.abs(a - b).max())
    ok = d <= 1e-5 * float(np.abs(b).max())
    print(f"\nscan vgg_small {size}^2 on cuda: {rate / 1e6:.1f} Mpx/s (load included)"
          + (f"; one pass {one[0]}^2: {one[1] / 1e6:.1f} Mpx/s; scan / one pass {rate / one[1]:.2f}" if one else "")
          + f"; cuda vs cpu map on 2048^2: max |d| {d:.2e} {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
