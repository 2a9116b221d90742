"""Quantized FCs (rules/quant.py, rules/fc.py): QDQ, QOperator and dynamic
quantization keep their integer weights as integer initializers, convert to
DequantizeLinear -> Conv / QLinearConv / ConvInteger, and match onnxruntime
on the original quantized model within one quantization step (check/compare.py).

The fixtures in tests/fixtures/quantized/ are onnxruntime.quantization's own
output (tools/fixtures/ort_quantizer.py); the tiny graphs below are written in ONNX
text for what the quantizer does not emit (opsets 19 and 21, transB=0,
uint8 weights, refusals)."""

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import parse, run
from onnx_fc2conv import check, convert, inspect
from onnx_fc2conv.errors import Fc2ConvError
from onnx_fc2conv.graph import GraphIndex
from onnx_fc2conv.rules import Context
from onnx_fc2conv.rules.steps import Step, match_step
from onnx_fc2conv.shapes import infer
from onnx_fc2conv.check.compare import compare, quant_steps

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "quantized").glob("*.onnx"))
FC_OPS = {"Gemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger"}
CONV_OPS = {"Conv", "QLinearConv", "ConvInteger"}
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
IR = {13: 8, 19: 9, 21: 10}
rng = np.random.default_rng(0)


def _qdq_steps() -> bool:
    """Whether per-tensor QuantizeLinear/DequantizeLinear are chain steps
    (ops.py / rules/steps.py): then the chain passes a Q/DQ pair that stands
    around another op (vgg_small's Dropout, a float Relu between quantized
    Gemms) and the dense trunk and tail accept them."""
    m = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 4] x) => (float[N, 4] y) { y = QuantizeLinear(x, s, z) }""",
              s=np.float32(0.1), z=np.int8(0))
    return isinstance(match_step(m.graph.node[0], "x", 4, 2, Context(GraphIndex(m), infer(m))), Step)


QDQ_STEPS = _qdq_steps()


def float_elements(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOATS)


def fc_kernels(model: onnx.ModelProto, names) -> dict:
    """The element type of the kernel each converted FC's Conv reads (through
    its DequantizeLinear for a QDQ Conv)."""
    idx = GraphIndex(model)
    out = {}
    for node in model.graph.node:
        if node.op_type in CONV_OPS and node.name in names:
            w = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
            p = idx.producer.get(w)
            if p is not None and p.op_type == "DequantizeLinear":
                w = p.input[0]
            out[node.name] = (node.op_type, idx.elem_type(w))
    return out


# -- onnxruntime's quantized fixtures -----------------------------------------

@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_keep_mode(path):
    """Every FC converts with an integer kernel, nothing becomes float, the
    file stays within 1.25x, and onnxruntime agrees within one step."""
    original = onnx.load(str(path))
    result = convert(str(path))
    out = result.model
    converted = [layer for layer in result.layers if layer.converted]
    assert converted
    for layer in result.layers:
        if not layer.converted:  # only FCs behind a Q/DQ pair around another op, until Q/DQ are steps
            assert not QDQ_STEPS, layer.reason
            assert re.search(r"(whose chain stops at|its input comes from) (Quantize|Dequantize)Linear '[^']+'",
                             layer.reason), layer.reason
    ops_after = [n.op_type for n in out.graph.node]
    assert sum(op in FC_OPS for op in ops_after) == len(result.layers) - len(converted)
    kernels = fc_kernels(out, {layer.name for layer in converted})
    assert len(kernels) == len(converted)
    assert all(elem == onnx.TensorProto.INT8 for _, elem in kernels.values()), kernels
    assert float_elements(out) <= float_elements(original)            # nothing dequantized
    assert out.ByteSize() <= 1.25 * original.ByteSize()
    report = check(str(path), out, runs=2)
    assert report.ok, report.lines()
    for o in report.outputs:
        assert o.steps is None or o.steps <= 1.0, o.line()


@pytest.mark.parametrize("name", ["lenet_qdq", "lenet_qop_pc", "keras_dense_tf2onnx_qdq_pc", "lenet_dynamic",
                                  "vgg_small_qop", "lenet_qdq_head"])
def test_fixture_dense_mode(name):
    path = Path(__file__).parent / "fixtures" / "quantized" / f"{name}.onnx"
    if "dynamic" in name:  # DynamicQuantizeLinear takes its scale over the whole tensor: not per position
        with pytest.raises(Fc2ConvError, match="DynamicQuantizeLinear"):
            convert(str(path), dense=True)
        return
    if not QDQ_STEPS:  # Q/DQ in the trunk (or between FCs) are not known to act per position yet
        with pytest.raises(Fc2ConvError, match="QuantizeLinear"):
            convert(str(path), dense=True)
        return
    result = convert(str(path), dense=True)
    if name.startswith("vgg_small_qop"):  # onnxruntime's QLinearSoftmax after the head acts on the class axis
        assert any(n.op_type == "QLinearSoftmax" for n in result.model.graph.node)
    report = check(str(path), result.model, dense=True)
    assert report.ok, report.lines()


def test_keras_nhwc_rows_are_permuted_integers():
    """tf2onnx's NHWC flatten: the integer rows are permuted into the kernel,
    as for float (QOperator: the Transpose acts on the uint8 map)."""
    path = Path(__file__).parent / "fixtures" / "quantized" / "keras_dense_tf2onnx_qop_pc.onnx"
    result = convert(str(path))
    first = result.layers[0]
    assert first.layout == "NHWC" and first.kernel == [8, 8] and first.in_channels == 16
    original = onnx.load(str(path))
    w = numpy_helper.to_array(next(t for t in original.graph.initializer
                                   if t.name == "functional_1/dense_1/Cast/ReadVariableOp:0_quantized"))
    conv = next(n for n in result.model.graph.node if n.op_type == "QLinearConv" and n.name == first.name)
    kernel = GraphIndex(result.model).value(conv.input[3])
    assert kernel.dtype == np.int8 and kernel.shape == (32, 16, 8, 8)
    # kernel[m, c, h, w] = W[h*8*16 + w*16 + c, m]
    np.testing.assert_array_equal(kernel, w.T.reshape(32, 8, 8, 16).transpose(0, 3, 1, 2))


def test_fold_batch_with_quantized_heads():
    for name in ("vgg_narrow_ts_qop_pc", "vgg_narrow_ts_dynamic", "vgg_narrow_ts_qdq_pc"):
        path = Path(__file__).parent / "fixtures" / "quantized" / f"{name}.onnx"
        result = convert(str(path), fold_batch=True)
        report = check(str(path), result.model, runs=1)
        assert report.ok, report.lines()


def test_cli_convert_check_reports_steps(tmp_path, capsys):
    from onnx_fc2conv.cli import main

    path = Path(__file__).parent / "fixtures" / "quantized" / "lenet_qop.onnx"
    assert main(["convert", str(path), "-o", str(tmp_path / "out.onnx"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "PASSED  logits [1,10] float32: max 0 quantization steps (at most 1 allowed)" in out
    assert [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node].count("QLinearConv") == 5


# -- tiny QDQ graphs: opsets, transB, per channel, dtypes ---------------------

def qdq_head(opset=13, trans_b=1, per_channel=False, wtype=np.int8, bias="dq", post_relu=False):
    """x [N,4,3,3] -> Flatten -> Q -> DQ -> Gemm(DQ(Wq), bias) -> y [N,5]."""
    m, k = 5, 36
    wq = rng.integers(-100, 100, (m, k) if trans_b else (k, m)).astype(wtype) if wtype == np.int8 else \
        rng.integers(0, 255, (m, k) if trans_b else (k, m)).astype(wtype)
    ws = (rng.uniform(0.001, 0.01, m) if per_channel else np.array(0.005)).astype(np.float32)
    wz = (np.zeros(m) if per_channel else np.array(0)).astype(wtype) if wtype == np.int8 else \
        (np.full(m, 128) if per_channel else np.array(128)).astype(wtype)
    axis = f"<axis={0 if trans_b else 1}>" if per_channel else ""
    inits = dict(xs=np.float32(0.02), xz=np.int8(3), wq=wq, ws=ws, wz=wz)
    bias_lines, c = "", ""
    if bias == "dq":
        inits.update(bq=rng.integers(-500, 500, m).astype(np.int32), bs=np.float32(0.02 * 0.005), bz=np.int32(0))
        bias_lines, c = "b = DequantizeLinear(bq, bs, bz)", ", b"
    elif bias == "float":
        inits.update(b=rng.standard_normal(m).astype(np.float32))
        c = ", b"
    text = f"""<ir_version: {IR[opset]}, opset_import: ["" : {opset}]>
        g (float[N, 4, 3, 3] x) => (float[N, 5] y) {{
          f = Flatten(x)
          q = QuantizeLinear(f, xs, xz)
          d = DequantizeLinear(q, xs, xz)
          w = DequantizeLinear{axis}(wq, ws, wz)
          {bias_lines}
          {"g" if post_relu else "y"} = Gemm<transB={trans_b}>(d, w{c})
          {"y = Relu(g)" if post_relu else ""}
        }}"""
    return parse(text, **inits)


def feeds(model, batch=2, seed=1):
    dims = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {model.graph.input[0].name: np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}


@pytest.mark.parametrize("opset", [13, 19, 21])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_gemm_becomes_dequantized_integer_conv(opset, trans_b, per_channel):
    model = qdq_head(opset, trans_b, per_channel, post_relu=True)
    out = convert(model).model
    ops = [n.op_type for n in out.graph.node]
    # the activation pair copied onto the map, the kernel's DequantizeLinear, the bias's as it was
    assert "Gemm" not in ops and ops.count("Conv") == 1 and ops.count("DequantizeLinear") == 3
    idx = GraphIndex(out)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    wdq = idx.producer[conv.input[1]]
    kernel = idx.value(wdq.input[0])
    assert kernel.dtype == np.int8 and kernel.shape == (5, 4, 3, 3)
    wq = idx.value("wq")
    assert wq is None  # the [M, K] integers are gone: the kernel holds them, reshaped
    assert [a.i for a in wdq.attribute if a.name == "axis"] == ([0] if per_channel else [])
    assert conv.input[2] == "b"  # the int32 bias keeps its DequantizeLinear, as the Conv's bias
    assert float_elements(out) == float_elements(model)
    x = feeds(model)
    np.testing.assert_allclose(run(out, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)


def test_qdq_uint8_weight_float_bias_and_no_activation_pair():
    """uint8 weights with zero point 128, a float bias, and a weight-only
    quantized FC (no Q/DQ on its input)."""
    model = qdq_head(13, 1, True, wtype=np.uint8, bias="float")
    out = convert(model).model
    kernel = GraphIndex(out).value(next(n for n in out.graph.node if n.op_type == "DequantizeLinear"
                                        and n.input[0].startswith("wq")).input[0])
    assert kernel.dtype == np.uint8 and kernel.shape == (5, 4, 3, 3)
    x = feeds(model)
    np.testing.assert_allclose(run(out, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)
    weight_only = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 4, 3, 3] x) => (float[N, 5] y) {
          f = Flatten(x)
          w = DequantizeLinear(wq, ws, wz)
          y = MatMul(f, w)
        }""", wq=rng.integers(-9, 9, (36, 5)).astype(np.int8), ws=np.float32(0.1), wz=np.int8(0))
    out = convert(weight_only).model
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Conv", "Flatten"]
    np.testing.assert_allclose(run(out, feeds(weight_only))[0], run(weight_only, feeds(weight_only))[0],
                               rtol=1e-5, atol=1e-5)


def test_dequantize_linear_is_never_folded():
    """ops.FOLDABLE leaves DequantizeLinear out, on any opset: at opset 21
    onnx's reference evaluator would fold an int8 weight into float32."""
    for opset in (13, 21):
        model = qdq_head(opset)
        idx = GraphIndex(model)
        assert idx.value("w") is None and idx.value("wq") is not None


def test_qdq_dense_mode_on_a_float_trunk():
    """Dense mode: the activation Q/DQ pair acts on the map per position, the
    integer kernel slides over it."""
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 2, 8, 8] x) => (float[N, 5] y) {
          c = Conv<kernel_shape=[3, 3]>(x, cw, cb)
          r = Relu(c)
          f = Flatten(r)
          q = QuantizeLinear(f, xs, xz)
          d = DequantizeLinear(q, xs, xz)
          w = DequantizeLinear<axis=0>(wq, ws, wz)
          y = Gemm<transB=1>(d, w)
        }""", cw=rng.standard_normal((4, 2, 3, 3)).astype(np.float32), cb=np.zeros(4, np.float32),
        xs=np.float32(0.05), xz=np.uint8(0), wq=rng.integers(-90, 90, (5, 144)).astype(np.int8),
        ws=rng.uniform(0.001, 0.01, 5).astype(np.float32), wz=np.zeros(5, np.int8))
    result = convert(model, dense=True)
    assert [n.op_type for n in result.model.graph.node].count("QuantizeLinear") == 1
    report = check(model, result.model, dense=True)
    assert report.ok, report.lines()


# -- QOperator and dynamic, tiny ---------------------------------------------

def test_qlinear_matmul_per_column_scales():
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 2, 2] x) => (float[N, 6] y) {
          q = QuantizeLinear(x, xs, xz)
          f = Flatten(q)
          p = QLinearMatMul(f, xs, xz, wq, ws, wz, ys, yz)
          y = DequantizeLinear(p, ys, yz)
        }""", xs=np.float32(0.02), xz=np.uint8(128), wq=rng.integers(-120, 120, (12, 6)).astype(np.int8),
        ws=rng.uniform(0.001, 0.02, 6).astype(np.float32), wz=np.zeros(6, np.int8), ys=np.float32(0.01),
        yz=np.uint8(120))
    result = convert(model)
    out = result.model
    assert sorted(n.op_type for n in out.graph.node) == ["DequantizeLinear", "Flatten", "QLinearConv",
                                                           "QuantizeLinear"]
    conv = next(n for n in out.graph.node if n.op_type == "QLinearConv")
    assert list(conv.input[4:]) == ["ws", "wz", "ys", "yz"]  # the same scales and zero points
    report = check(model, out)
    assert report.ok and report.outputs[0].steps <= 1, report.lines()


REFUSED = {
    "along K": ("""w = DequantizeLinear<axis=0>(wq, ws, wz)
                   y = MatMul(f, w)""", dict(wq=(36, 5), ws=36),
                "its weight is quantized along the input features (axis 0 of [36, 5]): a Conv kernel keeps scales "
                "per output channel only"),
    "blocked": ("""w = DequantizeLinear<axis=0, block_size=12>(wq, ws, wz)
                   y = MatMul(f, w)""", dict(wq=(36, 5), ws=(3, 5)),
                "its DequantizeLinear 'w' is blocked (block_size 12): a Conv kernel cannot keep blocks along the "
                "input features"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_quantized_fc_stays_integer(case):
    body, shapes, reason = REFUSED[case]
    wq = rng.integers(-9, 9, shapes["wq"]).astype(np.int8)
    ws = rng.uniform(0.01, 0.1, shapes["ws"]).astype(np.float32)
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 4, 3, 3] x) => (float[N, 5] y) {{
          f = Flatten(x)
          {body}
        }}""", wq=wq, ws=ws, wz=np.zeros(ws.shape, np.int8))
    result = convert(model)
    assert [(layer.converted, layer.reason) for layer in result.layers] == [(False, reason)]
    assert result.model.SerializeToString() == model.SerializeToString()
    assert inspect(model).layers[0].reason == reason


def test_int4_weight_is_refused_not_repacked():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"]),
         helper.make_node("MatMul", ["f", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor("wq", onnx.TensorProto.INT4, [36, 5], rng.integers(-8, 8, 180).tolist()),
         numpy_helper.from_array(np.float32(0.1), "ws")]),
        opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    result = convert(model)
    assert result.layers[0].reason == ("its DequantizeLinear 'w' reads int4, which the rewrite does not carry "
                                       "(8-, 16- and 32-bit integers only)")
    assert result.heads == 0


def test_qgemm_with_a_float_output_is_left_with_the_reason():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("QuantizeLinear", ["f", "xs", "xz"], ["q"]),
         helper.make_node("QGemm", ["q", "xs", "xz", "wq", "ws", "wz"], ["y"], domain="com.microsoft", transB=1)],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v, k) for k, v in dict(
            xs=np.float32(0.1), xz=np.uint8(0), wq=rng.integers(-9, 9, (5, 36)).astype(np.int8),
            ws=np.float32(0.1), wz=np.int8(0)).items()]),
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    result = convert(model)
    assert result.layers[0].reason == ("it has no output scale and zero point (a float output): QLinearConv always "
                                       "requantizes, so the scales do not allow a QLinearConv")
    assert result.heads == 0


def _dynamic(zero_points):
    return parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 2, 6, 6] x) => (float[N, 5] y) {
          c = Conv<kernel_shape=[3, 3]>(x, cw)
          f = Flatten(c)
          q, s, z = DynamicQuantizeLinear(f)
          sc = Mul(s, ws)
          i = MatMulInteger(q, wq, z, wz)
          fl = Cast<to=1>(i)
          y = Mul(fl, sc)
        }""", cw=rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        wq=rng.integers(-100, 100, (64, 5)).astype(np.int8), ws=rng.uniform(0.001, 0.01, 5).astype(np.float32),
        wz=np.asarray(zero_points, np.int8))


def test_matmul_integer_per_channel_and_dense_refusal():
    model = _dynamic([0] * 5)
    result = convert(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert "ConvInteger" in ops and "MatMulInteger" not in ops
    conv = next(n for n in result.model.graph.node if n.op_type == "ConvInteger")
    assert GraphIndex(result.model).value(conv.input[3]).shape == ()  # equal per-channel zero points: one
    x = feeds(model)
    np.testing.assert_array_equal(run(result.model, x)[0], run(model, x)[0])
    with pytest.raises(Fc2ConvError, match="dense mode: FC .* quantizes its input with DynamicQuantizeLinear"):
        convert(model, dense=True)
    # one decision: inspect says what convert --dense does, with the same sentence
    reason = inspect(model).dense_reason
    assert reason is not None and "quantizes its input with DynamicQuantizeLinear" in reason
    with pytest.raises(Fc2ConvError) as refused:
        convert(model, dense=True)
    assert str(refused.value) == reason
    differing = convert(_dynamic([0, 1, 0, 0, 0]))
    assert differing.layers[0].reason == ("its weight zero points differ per output feature: ConvInteger "
                                          "(onnxruntime) takes one weight zero point")


# -- the check in quantization steps -------------------------------------------

def test_compare_in_quantization_steps():
    e = np.array([[10, -3, 127]], np.int8)
    one = compare("q", e, e + np.array([[1, 0, 0]], np.int8), onnx.TensorProto.INT8, None, None)
    two = compare("q", e, e + np.array([[0, 2, 0]], np.int8), onnx.TensorProto.INT8, None, None)
    assert one.passed and one.steps == 1 and not two.passed and two.steps == 2
    assert "max 2 quantization steps (at most 1 allowed)" in two.line()
    exact = compare("argmax", e.astype(np.int64), (e + 1).astype(np.int64), onnx.TensorProto.INT64, None, None)
    assert not exact.passed and exact.steps is None
    step = np.float32(0.05)
    f = np.array([[0.5, 1.0, -0.25]], np.float32)
    assert compare("y", f, f + np.float32([[0.05, 0, 0]]), onnx.TensorProto.FLOAT, None, None, step).passed
    bad = compare("y", f, f + np.float32([[0, 0.1, 0]]), onnx.TensorProto.FLOAT, None, None, step)
    assert not bad.passed and bad.steps == pytest.approx(2, abs=1e-3)
    assert not compare("y", f, f + np.float32([[0.05, 0, 0]]), onnx.TensorProto.FLOAT, None, None).passed


def test_quant_steps_through_the_final_flatten():
    """With the head's chain ending in the output's DequantizeLinear, keep
    mode writes the output with a Flatten of the map: still one step of it."""
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (uint8[N, 3, 1, 1] x) => (float[N, 3] y) {
          d = DequantizeLinear(x, s, zp)
          y = Flatten(d)
        }""", s=np.float32(0.25), zp=np.uint8(3))
    assert quant_steps(model)["y"] == 0.25


def test_quant_steps_per_axis():
    model = parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3] x) => (float[N, 3] y, float[N, 3] z) {
          q = QuantizeLinear<axis=1>(x, s, zp)
          y = DequantizeLinear<axis=1>(q, s, zp)
          z = Relu(x)
        }""", s=np.float32([0.1, 0.2, 0.4]), zp=np.zeros(3, np.int8))
    steps = quant_steps(model)
    assert set(steps) == {"y"} and steps["y"].shape == (1, 3)
    np.testing.assert_allclose(steps["y"].ravel(), [0.1, 0.2, 0.4], rtol=1e-6)


def _requantized_head():
    return parse("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 2, 8, 8] x) => (float[N, 5] y) {
          c = Conv<kernel_shape=[3, 3]>(x, cw, cb)
          r = Relu(c)
          f = Flatten(r)
          g = Gemm<transB=1>(f, w)
          q = QuantizeLinear(g, ys, yz)
          y = DequantizeLinear(q, ys, yz)
        }""", cw=rng.standard_normal((4, 2, 3, 3)).astype(np.float32), cb=np.zeros(4, np.float32),
        w=(rng.standard_normal((5, 144)) * 0.1).astype(np.float32), ys=np.float32(0.05), yz=np.uint8(128))


@pytest.mark.parametrize("steps, ok", [(0, True), (1, True), (2, False)])
def test_dense_check_allows_one_quantization_step(steps, ok):
    """The dense check compares a requantized output as the keep check does:
    a dense model whose integer output is off by one step everywhere (a sum in
    another order may cross a rounding boundary) passes, by two fails."""
    model = _requantized_head()
    dense = convert(model, dense=True).model
    dq = next(n for n in dense.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "y")
    q = dq.input[0]
    dense.graph.initializer.extend([numpy_helper.from_array(np.int32(steps), "k"),
                                    numpy_helper.from_array(np.int32(255), "top")])
    dense.graph.node.extend([helper.make_node("Cast", [q], ["q32"], to=TensorProto.INT32),
                             helper.make_node("Add", ["q32", "k"], ["q32k"]),
                             helper.make_node("Min", ["q32k", "top"], ["q32m"]),   # no wrap-around at 255
                             helper.make_node("Cast", ["q32m"], ["qk"], to=TensorProto.UINT8)])
    dq.input[0] = "qk"
    sorted_nodes = [n for n in dense.graph.node if n is not dq] + [dq]
    del dense.graph.node[:]
    dense.graph.node.extend(sorted_nodes)
    report = check(model, dense, dense=True)
    assert report.ok == ok, "\n".join(report.lines())
    lines = [o for o in report.outputs if "windows" in o.name]
    assert lines and all(o.steps is not None for o in lines)
