"""Benchmark dense mode: one pass of the dense model on a large image against
the original classifier run on every window crop.

    python tools/bench_dense.py [--models vgg16 alexnet] [--sizes 256 320 448 512]
                                [--reps 3] [--threads 1] [--provider cpu|cuda] [--plot out.png]

For each model (torchvision's VGG16 / AlexNet layouts at 224x224, seeded
random weights, built by tools/make_models.py) it converts with
``onnx_fc2conv.convert(dense=True)`` and, per input size, in one process and
interleaved over ``--reps`` repetitions (medians reported), times:

- dense: one pass of the dense model on the [1, 3, S, S] image;
- (a) batched crops: the original on all P = map_h * map_w crops at the map's
  stride (offset 0, the native window size) as one batch;
- (b) crop loop: the same P crops as P batch-1 runs;
- native: one pass of the original at 224.

It prints the map size, the speed-up of dense vs (a) and (b), the MAC ratio
(crops' MACs / dense MACs, the most (a) can lose to dense), the efficiency =
speed-up vs (a) / MAC ratio, and "P x the output in T x the time of one
native pass" (Caffe's net_surgery headline: 64x the output in 3x the time on
CaffeNet at 451).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))


def macs(model: onnx.ModelProto, input_shape) -> int:
    """Multiply-accumulates of every Conv and Gemm/MatMul at an input shape."""
    from onnx_fc2conv.shapes import infer

    name = model.graph.input[0].name
    infos = infer(model, {name: list(input_shape)})
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            w = inits[n.input[1]]
            out = infos[n.output[0]].shape
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            total += int(np.prod(out)) * int(np.prod(w[1:])) * (1 if group else 1)
        elif n.op_type in ("Gemm", "MatMul"):
            w = inits[n.input[1]]
            out = infos[n.output[0]].shape
            total += int(np.prod(out)) * (w[1] if n.op_type == "Gemm" and any(
                a.name == "transB" and a.i for a in n.attribute) else w[0])
    return total


def session(model_or_path, threads: int, provider: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(src, opts, providers=providers)
    if provider == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit("CUDAExecutionProvider is not available: install onnxruntime-gpu on a machine with a GPU")
    return sess


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vgg16", "alexnet"], choices=["vgg16", "alexnet"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[256, 320, 448, 512])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--skip-loop", action="store_true", help="skip (b), the batch-1 crop loop")
    ap.add_argument("--plot", metavar="PNG", help="write a plot (needs matplotlib)")
    args = ap.parse_args(argv)

    import make_models
    from onnx_fc2conv import convert

    rows = []
    for name in args.models:
        original = {"vgg16": make_models.vgg16_layout, "alexnet": make_models.alexnet_layout}[name](batch=1)
        result = convert(original, dense=True)
        geo = result.geometry[0]["axes"]
        stride, window = geo[0]["stride"], 224
        s_orig = session(original, args.threads, args.provider)
        s_dense = session(result.model, args.threads, args.provider)
        s_batch = session(make_models_free_batch(original), args.threads, args.provider)
        del result
        native_macs = macs(original, [1, 3, 224, 224])
        rng = np.random.default_rng(0)
        x224 = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
        s_orig.run(None, {"input": x224})
        print(f"\n{name}: stride {stride}, window {window}, {args.threads} intra-op thread(s), {args.provider}")
        print(f"{'size':>5} {'map':>6} {'P':>4} {'dense ms':>9} {'crops ms':>9} {'loop ms':>9} {'vs crops':>9} "
              f"{'vs loop':>8} {'MAC ratio':>9} {'effic.':>7}  headline")
        for size in args.sizes:
            x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
            m = (size - window) // stride + 1
            crops = np.concatenate([x[:, :, i * stride:i * stride + window, j * stride:j * stride + window]
                                    for i in range(m) for j in range(m)], axis=0)
            p = m * m
            for _ in range(2):  # warm up: the arena grows to each size once
                s_dense.run(None, {"input": x})
                s_batch.run(None, {"input": crops})
            t_dense, t_crops, t_loop, t_native = [], [], [], []
            for _ in range(args.reps):
                t_native.append(timed(lambda: s_orig.run(None, {"input": x224})))
                t_dense.append(timed(lambda: s_dense.run(None, {"input": x})))
                t_crops.append(timed(lambda: s_batch.run(None, {"input": crops})))
                if not args.skip_loop:
                    t_loop.append(timed(lambda: [s_orig.run(None, {"input": crops[i:i + 1]}) for i in range(p)]))
            d, c, n = statistics.median(t_dense), statistics.median(t_crops), statistics.median(t_native)
            lp = statistics.median(t_loop) if t_loop else float("nan")
            mac_ratio = p * native_macs / dense_macs_of(name, original, size)
            eff = (c / d) / mac_ratio
            rows.append((name, size, m, p, d, c, lp, mac_ratio, eff, n))
            print(f"{size:>5} {m:>3}x{m:<2} {p:>4} {d * 1e3:>9.4g} {c * 1e3:>9.4g} {lp * 1e3:>9.4g} {c / d:>8.2f}x {lp / d:>7.2f}x "
                  f"{mac_ratio:>9.2f} {eff:>7.2f}  {p}x the output in {d / n:.1f}x the time of one 224 pass")
    if args.plot:
        plot(rows, args.plot)
    return 0


_DENSE_MACS: dict = {}


def dense_macs_of(name, original, size):
    key = (name, size)
    if key not in _DENSE_MACS:
        from onnx_fc2conv import convert
        dense = convert(original, dense=True).model
        _DENSE_MACS[key] = macs(dense, [1, 3, size, size])
    return _DENSE_MACS[key]


def make_models_free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The original with a free batch dim, to run all crops in one batch."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    d = m.graph.input[0].type.tensor_type.shape.dim[0]
    d.Clear()
    d.dim_param = "N"
    for o in m.graph.output:
        o.type.tensor_type.shape.dim[0].Clear()
        o.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    return m


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r[0] for r in rows}):
        rs = [r for r in rows if r[0] == name]
        ax.plot([r[1] for r in rs], [r[5] / r[4] for r in rs], "o-", label=f"{name}: speed-up vs batched crops")
        ax.plot([r[1] for r in rs], [r[7] for r in rs], "--", label=f"{name}: MAC ratio")
    ax.set_xlabel("input size (pixels)")
    ax.set_ylabel("x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
