"""Shapes that only the runtime knows (probe.py): onnxruntime's QOperator
models (contrib ops in com.microsoft) and MeanVarianceNormalization, whose
shapes ONNX inference leaves unknown, convert in keep mode with the
quantization kept, and in dense mode where the contrib ops act per position
or in windows; everything checked in onnxruntime against the original."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from helpers import ops
from onnx_fc2conv import check, convert, inspect
from onnx_fc2conv.errors import Fc2ConvError


def _w(inits, rng, name, *shape, scale=0.3):
    inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
    return name


def _model(nodes, inits, size, m, name):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", T.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["N", m])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def resnet_like(size=16, seed=0, concat=False, swish=False):
    """conv/relu/maxpool, a residual block (or two branches concatenated),
    GlobalAveragePool, Flatten, Gemm: torchvision's resnet18 in small."""
    rng = np.random.default_rng(seed)
    inits = []
    w = lambda *a, **k: _w(inits, rng, *a, **k)  # noqa: E731
    conv = lambda x, cin, cout, name, **kw: helper.make_node(  # noqa: E731
        "Conv", [x, w(f"{name}.w", cout, cin, 3, 3), w(f"{name}.b", cout)], [name], name=name, pads=[1, 1, 1, 1], **kw)
    nodes = [conv("input", 3, 8, "c1", strides=[2, 2]), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             conv("p1", 8, 8, "c2")]
    if swish:  # x * sigmoid(x), then a LeakyRelu: QLinearSigmoid, QLinearMul, QLinearLeakyRelu once quantized
        nodes += [helper.make_node("Sigmoid", ["c2"], ["sg"], name="sigmoid"),
                  helper.make_node("Mul", ["c2", "sg"], ["sw"], name="swish"),
                  helper.make_node("LeakyRelu", ["sw"], ["r2"], name="leaky", alpha=0.1)]
    else:
        nodes.append(helper.make_node("Relu", ["c2"], ["r2"], name="relu2"))
    nodes.append(conv("r2", 8, 8, "c3"))
    if concat:
        nodes.append(helper.make_node("Concat", ["c3", "p1"], ["s"], name="concat", axis=1))
    else:
        nodes.append(helper.make_node("Add", ["c3", "p1"], ["s"], name="add"))
    c = 16 if concat else 8
    nodes += [helper.make_node("Relu", ["s"], ["r3"], name="relu3"),
              helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", w("fc.w", 10, c), w("fc.b", 10)], ["logits"], name="fc", transB=1)]
    return _model(nodes, inits, size, 10, "resnet")


def alexnet_like(size=20, seed=1):
    """conv/relu/maxpool, an AveragePool in the trunk (QLinearAveragePool once
    quantized), Flatten, three Gemms with Relus: torchvision's alexnet in small."""
    rng = np.random.default_rng(seed)
    inits = []
    w = lambda *a, **k: _w(inits, rng, *a, **k)  # noqa: E731
    nodes = [helper.make_node("Conv", ["input", w("c1.w", 8, 3, 3, 3), w("c1.b", 8)], ["c1"], name="conv1",
                              strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Conv", ["p1", w("c2.w", 8, 8, 3, 3), w("c2.b", 8)], ["c2"], name="conv2",
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("AveragePool", ["r2"], ["avg"], name="avgpool", kernel_shape=[2, 2], strides=[1, 1]),
             helper.make_node("Flatten", ["avg"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", w("fc6.w", 16, 72), w("fc6.b", 16)], ["f6"], name="fc6", transB=1),
             helper.make_node("Relu", ["f6"], ["r6"], name="relu6"),
             helper.make_node("Gemm", ["r6", w("fc7.w", 16, 16), w("fc7.b", 16)], ["f7"], name="fc7", transB=1),
             helper.make_node("Relu", ["f7"], ["r7"], name="relu7"),
             helper.make_node("Gemm", ["r7", w("fc8.w", 5, 16), w("fc8.b", 5)], ["logits"], name="fc8", transB=1)]
    return _model(nodes, inits, size, 5, "alexnet")


def qoperator(model, per_channel: bool, size: int, seed: int = 0) -> onnx.ModelProto:
    """onnxruntime's own quantizer, QOperator format, calibrated on random data."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self.data = iter([{"input": rng.standard_normal((1, 3, size, size)).astype(np.float32)}
                              for _ in range(4)])

        def get_next(self):
            return next(self.data, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "float.onnx"), os.path.join(d, "q.onnx")
        onnx.save(model, src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QOperator, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(dst)


@pytest.fixture(scope="module")
def quantized():
    cache = {}

    def get(kind, per_channel):
        if (kind, per_channel) not in cache:
            build, size = {"resnet": (resnet_like, 16), "alexnet": (alexnet_like, 20),
                           "concat": (lambda: resnet_like(concat=True), 16),
                           "swish": (lambda: resnet_like(swish=True), 16)}[kind]
            cache[kind, per_channel] = qoperator(build() if kind in ("concat", "swish") else build(size),
                                                 per_channel, size)
        return cache[kind, per_channel]
    return get


def _domain_ops(model):
    return [(n.domain or "", n.op_type) for n in model.graph.node]


def _assert_passes(model, converted, dense=False):
    report = check(model, converted, dense=dense)
    assert report.ok, "\n".join(report.lines())
    return report


@pytest.mark.parametrize("per_channel", [False, True])
def test_qoperator_resnet_keep_and_dense(quantized, per_channel):
    q = quantized("resnet", per_channel)
    assert ("com.microsoft", "QLinearGlobalAveragePool") in _domain_ops(q)
    assert ("com.microsoft", "QGemm") in _domain_ops(q)
    info = inspect(q)
    assert info.probed["gap_quantized"] == ["N", 8, 1, 1]   # inference alone leaves it unknown
    assert info.dense_reason is None and len(info.layers) == 1 and info.layers[0].converted
    keep = convert(q)
    assert keep.probed == info.probed
    assert keep.converted == 1 and "QGemm" not in ops(keep.model) and "QLinearConv" in ops(keep.model)
    # the integer weights are kept: the new QLinearConv reads an int8 kernel
    inits = {t.name: t for t in keep.model.graph.initializer}
    fc_conv = [n for n in keep.model.graph.node if n.op_type == "QLinearConv"][-1]
    assert inits[fc_conv.input[3]].data_type == T.INT8
    _assert_passes(q, keep.model)
    dense = convert(q, dense=True)
    assert ("com.microsoft", "QLinearAveragePool") in _domain_ops(dense.model)
    assert "QLinearGlobalAveragePool" not in ops(dense.model)
    (geo,) = dense.maps
    assert geo.window == (4, 4) and geo.axes[0].stride == 4
    _assert_passes(q, dense.model, dense=True)


@pytest.mark.parametrize("per_channel", [False, True])
def test_qoperator_alexnet_keep_and_dense(quantized, per_channel):
    q = quantized("alexnet", per_channel)
    assert ("com.microsoft", "QLinearAveragePool") in _domain_ops(q)
    keep = convert(q)
    assert [l.converted for l in keep.layers] == [True, True, True]
    assert "avg_quantized" in keep.probed
    assert "QGemm" not in ops(keep.model)
    _assert_passes(q, keep.model)
    dense = convert(q, dense=True)
    assert dense.converted == 3
    _assert_passes(q, dense.model, dense=True)


def test_dense_check_fails_a_wrong_window_pool(quantized):
    """The dense check is not blind on QOperator models: a window pool with
    a kernel smaller than the head's window is a wrong model and fails."""
    q = quantized("resnet", False)
    dense = convert(q, dense=True).model
    pool = next(n for n in dense.graph.node if n.op_type == "QLinearAveragePool")
    for a in pool.attribute:
        if a.name == "kernel_shape":
            a.ints[:] = [3, 3]
    assert not check(q, dense, dense=True).ok


def test_qlinear_mul_sigmoid_leaky_relu_act_per_position(quantized):
    q = quantized("swish", True)
    contrib = {op for domain, op in _domain_ops(q) if domain == "com.microsoft"}
    assert {"QLinearSigmoid", "QLinearMul", "QLinearLeakyRelu", "QLinearAdd"} <= contrib
    keep = convert(q)
    assert keep.converted == 1
    _assert_passes(q, keep.model)
    dense = convert(q, dense=True)
    assert {"QLinearSigmoid", "QLinearMul", "QLinearLeakyRelu"} <= set(ops(dense.model))
    _assert_passes(q, dense.model, dense=True)


def test_qlinear_concat_keep_converts_dense_refused_naming_it(quantized):
    q = quantized("concat", False)
    assert ("com.microsoft", "QLinearConcat") in _domain_ops(q)
    keep = convert(q)
    assert keep.converted == 1
    _assert_passes(q, keep.model)
    with pytest.raises(Fc2ConvError, match="QLinearConcat"):
        convert(q, dense=True)
    assert "QLinearConcat" in inspect(q).dense_reason


def mvn_model():
    rng = np.random.default_rng(0)
    inits = []
    w = lambda *a, **k: _w(inits, rng, *a, **k)  # noqa: E731
    nodes = [helper.make_node("Conv", ["input", w("cw", 4, 3, 3, 3)], ["c"], name="conv"),
             helper.make_node("MeanVarianceNormalization", ["c"], ["mvn"], name="mvn"),
             helper.make_node("Relu", ["mvn"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", w("fw", 5, 64)], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu_fc"),
             helper.make_node("Gemm", ["hr", w("fw2", 3, 5)], ["logits"], name="fc2", transB=1)]
    return _model(nodes, inits, 6, 3, "mvn")


def test_mvn_default_axes_keep_converts_dense_refused():
    model = mvn_model()
    from onnx_fc2conv import shapes

    assert shapes.infer(model)["mvn"].shape is None   # what ONNX inference gives (opset 13)
    keep = convert(model)
    assert keep.converted == 2 and keep.probed["mvn"] == ["N", 4, 4, 4]
    assert "Gemm" not in ops(keep.model)
    _assert_passes(model, keep.model)
    with pytest.raises(Fc2ConvError, match="MeanVarianceNormalization 'mvn'"):
        convert(model, dense=True)


def test_probe_batch_and_inputs():
    """A free batch stays symbolic in the probed shapes; a fixed batch stays
    fixed; --inputs feeds the probe (its batch, its values)."""
    model = mvn_model()
    feeds = {"input": np.random.default_rng(1).standard_normal((3, 3, 6, 6)).astype(np.float32)}
    assert convert(model, inputs=feeds).probed["mvn"] == ["N", 4, 4, 4]
    fixed = mvn_model()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert convert(fixed).probed["mvn"] == [1, 4, 4, 4]
    with pytest.raises(Fc2ConvError, match="cannot run the model to read the shapes"):
        convert(model, inputs={"input": np.zeros((1, 3, 7, 7), np.float32)})


def test_no_probe_where_inference_knows(monkeypatch):
    """A model whose shapes ONNX inference knows never runs onnxruntime to
    convert, and says it read nothing from a probe."""
    from builders import head_model
    from onnx_fc2conv import probe

    def boom(*a, **k):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(probe, "probe", boom)
    result = convert(head_model(chain=("Relu",)))
    assert result.converted == 2 and result.probed == {} and result.to_dict()["probed_shapes"] == {}


def test_cli_inspect_names_probed_shapes(quantized, tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "q.onnx"
    onnx.save(quantized("resnet", False), path)
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv", "inspect", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("shapes from one onnxruntime run"))
    assert "gap_quantized [N,8,1,1]" in line
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv", "inspect", str(path), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert json.loads(r.stdout)["probed_shapes"]["gap_quantized"] == ["N", 8, 1, 1]
