"""Benchmark: conversion speed and memory on VGG16-sized models, and keep-mode
latency, measured side by side in one run.

    python tools/bench_convert.py [--reps 3] [--big] [--keep-files DIR]

Generates torchvision's VGG16 layout (~528 MB, seeded random weights) and
AlexNet layout with tools/make_models.py, then, interleaved over ``--reps``
repetitions, each measurement in a fresh subprocess (so peak RSS is its own):

- onnx.load + onnx.save of the in-file model (the yardstick);
- our convert (load -> convert -> save, no check) of the same file:
  time ratio to load+save, and peak RSS / model size;
- our convert of the external-data copy into the same folder;
- keep-mode latency converted / original at batch 1 and 8 (onnxruntime CPU,
  1 intra-op thread, default graph optimisations), VGG16 and AlexNet layouts.

``--big`` adds a VGG-style model whose first FC is 25088x24000 (~2.4 GB,
external data) converted in keep and dense mode (needs ~10 GB of RAM).
Prints medians with min-max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

MEASURE = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import onnx
import onnx_fc2conv
from onnx_fc2conv import convert, save
kind, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if kind == "loadsave":
    m = onnx.load(src)
    onnx.save(m, dst)
elif kind == "loadsave_ext":
    m = onnx.load(src)
    onnx.save(m, dst, save_as_external_data=True, location=dst.split("/")[-1] + ".data")
else:
    dense = kind.endswith("dense")
    r = convert(src, dense=dense, fold_batch=kind.endswith("fold"))
    save(r.model, dst, external_data=True if kind.startswith("convert_ext") else None,
         share_data=kind.startswith("convert_ext_share"))
t = time.perf_counter() - t0
print(json.dumps({{"time": t, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def measure(kind, src, dst):
    code = MEASURE.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, kind, str(src), str(dst)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency(path, batch, reps=20):
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    sess.run(None, {name: x})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt(values):
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--latency-reps", type=int, default=10)
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=ROOT / "bench-out" if (ROOT / "bench-out").is_dir() else None) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        vgg = tmp / "vgg16.onnx"
        ext_dir = tmp / "ext"
        ext_dir.mkdir()
        vgg_ext = ext_dir / "vgg16.onnx"
        alex = tmp / "alexnet.onnx"
        # Built in a child process, so that the measured children (forked from
        # this one) do not inherit these models in their peak RSS.
        subprocess.run([sys.executable, "-c", "import sys, onnx; sys.path.insert(0, sys.argv[1]); import make_models; "
                        "make_models.save(make_models.vgg16_layout(), sys.argv[2]); "
                        "make_models.save(onnx.load(sys.argv[2]), sys.argv[3], external_data=True); "
                        "make_models.save(make_models.alexnet_layout(), sys.argv[4])",
                        str(ROOT / "tools"), str(vgg), str(vgg_ext), str(alex)], check=True)
        size = vgg.stat().st_size
        print(f"generated VGG16 layout {size / 2**20:.0f} MiB, AlexNet layout "
              f"{alex.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s")
        rows = {k: [] for k in ("loadsave", "convert", "convert_ext", "convert_share", "rss_ls", "rss_conv")}
        for _ in range(args.reps):
            a = measure("loadsave", vgg, tmp / "ls.onnx")
            b = measure("convert", vgg, tmp / "conv.onnx")
            c = measure("convert_ext", vgg_ext, ext_dir / "vgg16_conv.onnx")
            rows["loadsave"].append(a["time"])
            rows["convert"].append(b["time"])
            rows["convert_ext"].append(c["time"])
            rows["convert_share"].append(measure("convert_ext_share", vgg_ext, ext_dir / "vgg16_shared.onnx")["time"])
            rows["rss_ls"].append(a["rss"] / size)
            rows["rss_conv"].append(b["rss"] / size)
        ratio = [c / l for c, l in zip(rows["convert"], rows["loadsave"])]
        print(f"onnx load+save (in-file)        : {fmt(rows['loadsave'])} s, peak RSS {fmt(rows['rss_ls'])} x model size")
        print(f"onnx-fc2conv convert (in-file)  : {fmt(rows['convert'])} s, peak RSS {fmt(rows['rss_conv'])} x model size")
        print(f"  convert / load+save           : {fmt(ratio)}   (target <= 1.10)")
        print(f"  convert peak RSS / model size : {fmt(rows['rss_conv'])}   (target <= 3.2)")
        print(f"convert external-data, same dir : {fmt(rows['convert_ext'])} s (self-contained copy, the default)")
        print(f"  with --share-data             : {fmt(rows['convert_share'])} s   (target <= 0.5 + copy of changed data)")
        if not args.skip_latency:
            for name, path in (("VGG16", vgg), ("AlexNet", alex)):
                conv = tmp / f"{name}_conv.onnx"
                fold = tmp / f"{name}_fold.onnx"
                measure("convert", path, conv)
                measure("convert_fold", path, fold)
                for batch in (1, 8):
                    r, rf = [], []
                    for _ in range(3):
                        lo = latency(path, batch, args.latency_reps)
                        r.append(latency(conv, batch, args.latency_reps) / lo)
                        rf.append(latency(fold, batch, args.latency_reps) / lo)
                    print(f"keep-mode latency {name:7s} batch {batch}: converted/original {fmt(r)}, "
                          f"--fold-batch {fmt(rf)}   (target <= {'1.00' if batch == 1 else '1.10'})")
        if args.big:
            big_dir = tmp / "big"
            big_dir.mkdir()
            big = big_dir / "vgg_big.onnx"
            # Built in a child process: a measured process forked from one that
            # holds the big model would report that model in its peak RSS.
            subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import make_models; "
                            "make_models.save(make_models.vgg16_layout(fc_width=24000, num_classes=10), sys.argv[2], "
                            "external_data=True)", str(ROOT / "tools"), str(big)], check=True)
            for mode in ("convert_ext", "convert_ext_dense"):
                m = measure(mode, big, big_dir / f"out_{mode}.onnx")
                print(f"big model (25088x24000 FC, {sum(p.stat().st_size for p in big_dir.glob('vgg_big*')) / 2**30:.2f} GiB)"
                      f" {mode}: {m['time']:.1f} s, peak RSS {m['rss'] / 2**30:.1f} GiB")
    return 0



if __name__ == "__main__":
    sys.exit(main())
