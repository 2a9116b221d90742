"""Build the quantized fixtures in tests/fixtures/quantized/ with onnxruntime's
own quantizer, and measure what onnx-fc2conv does with them.

    python tools/make_quantized.py            # writes tests/fixtures/quantized/*.onnx, prints sizes
    python tools/make_quantized.py --out DIR  # the same, into DIR
    python tools/make_quantized.py --table    # converts every fixture (keep and dense) and prints the table

Sources: the samples ``models/lenet.onnx`` and ``models/vgg_small.onnx``,
and two real-exporter fixtures, ``tests/fixtures/vgg_narrow_dynbatch_op13_ts.onnx``
(TorchScript, Gemm head) and ``tests/fixtures/keras_flatten_dense_tf2onnx.onnx``
(tf2onnx, NHWC Transpose + Reshape, MatMul + Add head). Each is quantized

- ``quantize_static`` in QDQ format (int8 activations, int8 weights) and in
  QOperator format (uint8 activations, int8 weights), per tensor and per
  channel, calibrated by MinMax on 8 seeded standard-normal inputs of batch 1
  (``np.random.default_rng(0)``);
- ``quantize_dynamic`` (int8 weights), per tensor and per channel.

Two more: ``vgg_small`` converted to opset 21 first (onnx.version_converter)
then QDQ per channel, and ``lenet`` with only its Gemms quantized (QDQ, a
float trunk). onnxruntime.quantization is deterministic for these inputs: a
rerun writes the same bytes with the same onnxruntime version.

``--table`` converts each fixture with ``onnx_fc2conv.convert`` in keep mode,
checks it against onnxruntime on the original quantized model
(``onnx_fc2conv.check``, 3 seeded runs), then tries dense mode (convert +
check) and prints one markdown row per fixture: FCs converted, the dtype of
the converted FC kernels, file size before and after (the saved keep-mode
model), the largest difference in quantization steps of the output, and the
dense result (or the exact message that stops it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "quantized"
SOURCES = {
    "lenet": ROOT / "models" / "lenet.onnx",
    "vgg_small": ROOT / "models" / "vgg_small.onnx",
    "vgg_narrow_ts": ROOT / "tests" / "fixtures" / "vgg_narrow_dynbatch_op13_ts.onnx",
    "keras_dense_tf2onnx": ROOT / "tests" / "fixtures" / "keras_flatten_dense_tf2onnx.onnx",
}
# (suffix, format, per_channel): format "qdq" | "qop" | "dynamic"
VARIANTS = [("qdq", "qdq", False), ("qdq_pc", "qdq", True), ("qop", "qop", False), ("qop_pc", "qop", True),
            ("dynamic", "dynamic", False), ("dynamic_pc", "dynamic", True)]
# extra fixtures: name -> (source, format, per_channel, opset or None, op types to quantize or None)
EXTRAS = {
    "vgg_small_qdq_pc_op21": ("vgg_small", "qdq", True, 21, None),
    "lenet_qdq_head": ("lenet", "qdq", False, None, ["Gemm"]),
}
CALIBRATION_SAMPLES = 8


def fixtures() -> dict[str, tuple]:
    """Every fixture: name -> (source, format, per_channel, opset, op_types)."""
    out = {}
    for model in SOURCES:
        for suffix, fmt, pc in VARIANTS:
            out[f"{model}_{suffix}"] = (model, fmt, pc, None, None)
    out.update(EXTRAS)
    return out


class _Reader:
    """Seeded standard-normal calibration inputs, batch 1 (free dims set to 1)."""

    def __init__(self, model: onnx.ModelProto, n: int = CALIBRATION_SAMPLES, seed: int = 0):
        rng = np.random.default_rng(seed)
        inits = {t.name for t in model.graph.initializer}
        feeds = []
        for _ in range(n):
            feed = {}
            for i in model.graph.input:
                if i.name in inits:
                    continue
                dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                        for d in i.type.tensor_type.shape.dim]
                feed[i.name] = rng.standard_normal(dims).astype(np.float32)
            feeds.append(feed)
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # onnxruntime's CalibrationDataReader interface
        pass


def build(name: str, spec: tuple, out_dir: Path) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    source, fmt, pc, opset, op_types = spec
    model = onnx.load(str(SOURCES[source]))
    path = out_dir / f"{name}.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "source.onnx"
        if opset is not None:
            from onnx import version_converter

            model = version_converter.convert_version(model, opset)
        onnx.save(model, str(src))
        extra = {"op_types_to_quantize": op_types} if op_types else {}
        if fmt == "dynamic":
            quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8, per_channel=pc, **extra)
        else:
            quantize_static(str(src), str(path), _Reader(model),
                            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                            activation_type=QuantType.QInt8 if fmt == "qdq" else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=pc, **extra)
    return path


def describe(path: Path) -> dict:
    m = onnx.load(str(path))
    ops = {n.op_type for n in m.graph.node}
    return {"opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "fc_ops": sorted(ops & {"Gemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger"})}


def _kernel_dtypes(result) -> str:
    """The element types of the kernels the converted FCs read."""
    from onnx_fc2conv.graph import GraphIndex

    model = result.model
    idx = GraphIndex(model)
    converted = {layer.name for layer in result.layers if layer.converted}
    types = set()
    for node in model.graph.node:  # a converted FC's Conv keeps the FC node's name
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv") and node.name in converted:
            w = node.input[1] if node.op_type != "QLinearConv" else node.input[3]
            p = idx.producer.get(w)
            if p is not None and p.op_type == "DequantizeLinear":
                w = p.input[0]
            types.add(onnx.helper.tensor_dtype_to_string(idx.elem_type(w)).replace("TensorProto.", "").lower())
    return ", ".join(sorted(types)) or "-"


def measure(path: Path) -> dict:
    """Keep mode (convert, save, check against the original) and dense mode."""
    from onnx_fc2conv import check, convert
    from onnx_fc2conv.errors import Fc2ConvError
    from onnx_fc2conv.save import save

    row = {"file": path.name, "size_before": path.stat().st_size}
    result = convert(str(path))
    row["fcs"] = f"{result.converted}/{len(result.layers)}"
    row["ops"] = ", ".join(sorted({l.op for l in result.layers}))
    row["dtype"] = _kernel_dtypes(result)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        save(result.model, out)
        row["size_after"] = out.stat().st_size
        report = check(str(path), str(out))
    row["check"] = "PASSED" if report.ok else "FAILED: " + "; ".join(report.lines()[1:])
    row["steps"] = ", ".join(_steps(o) for o in report.outputs)
    try:
        dense = convert(str(path), dense=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / path.name
            save(dense.model, out)
            drep = check(str(path), str(out), dense=True)
        row["dense"] = "PASSED" if drep.ok else "check FAILED: " + " ".join(
            ln.strip() for ln in drep.lines()[1:] if "FAILED" in ln)[:300]
    except Fc2ConvError as exc:
        row["dense"] = f"refused: {exc}"
    return row


def _steps(o) -> str:
    steps = getattr(o, "steps", None)
    if steps is None:
        return f"{o.name}: max abs {o.max_abs:.3g} (float tolerance)"
    return f"{o.name}: {steps:g} step{'s' if steps != 1 else ''}"


def table(out_dir: Path) -> str:
    rows = []
    for name, spec in fixtures().items():
        path = out_dir / f"{name}.onnx"
        source, fmt, pc, _, op_types = spec
        row = measure(path)
        row.update(model=source, format={"qdq": "QDQ", "qop": "QOperator", "dynamic": "dynamic"}[fmt]
                   + (" (Gemm only)" if op_types else ""), pc="yes" if pc else "no", opset=describe(path)["opset"])
        rows.append(row)
    head = ("| file | model | format | per-channel | opset | FC ops | FCs converted | kernel dtype after | size before "
            "→ after | keep check: max error | dense |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| `{r['file']}` | {r['model']} | {r['format']} | {r['pc']} | {r['opset']} | {r['ops']} | "
                     f"{r['fcs']} | {r['dtype']} | {r['size_before']:,} → {r['size_after']:,} B "
                     f"({r['size_after'] / r['size_before']:.3f}×) | {r['check']}: {r['steps']} | {r['dense']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="folder to write (default tests/fixtures/quantized)")
    ap.add_argument("--table", action="store_true", help="measure the fixtures in --out instead of writing them")
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice to pre-process
    if args.table:
        print(table(args.out))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, spec in fixtures().items():
        path = build(name, spec, args.out)
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {path.stat().st_size:,} bytes, "
              f"{describe(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
