"""Heads that fork (find.Branch): a shared FC, then several FC branches
(MTCNN's R-Net/O-Net: face probability, box, landmarks; OverFeat's
classifier and box regressor). Every FC on every branch converts, in keep
mode and in dense mode, checked in onnxruntime against the original."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from helpers import assert_converts, feeds_for, ops, run
from onnx_fc2conv import check, convert, inspect


def _w(inits, rng, name, *shape, scale=0.3):
    inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
    return name


def rnet(size=24, ceil=1, outputs=3, batch="N", seed=0):
    """MTCNN R-Net/O-Net as facenet-pytorch exports it: Conv, PRelu, MaxPool
    (ceil_mode=1), Transpose(0,3,2,1), Flatten, Gemm, PRelu, then three Gemms
    (Softmax on the first)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    w = lambda *a, **k: _w(inits, rng, *a, **k)  # noqa: E731

    def conv(x, cin, cout, k, name):
        nodes.append(helper.make_node("Conv", [x, w(f"{name}.w", cout, cin, k, k), w(f"{name}.b", cout)],
                                      [f"{name}_out"], name=name))
        nodes.append(helper.make_node("PRelu", [f"{name}_out", w(f"{name}.a", cout, 1, 1, scale=0.1)],
                                      [f"{name}_act"], name=f"{name}/prelu"))
        return f"{name}_act"

    def pool(x, name):
        nodes.append(helper.make_node("MaxPool", [x], [f"{name}_out"], name=name,
                                      kernel_shape=[3, 3] if ceil else [2, 2], strides=[2, 2], ceil_mode=ceil))
        return f"{name}_out"

    h = pool(conv("input", 3, 4, 3, "conv1"), "pool1")
    h = pool(conv(h, 4, 6, 3, "conv2"), "pool2")
    h = conv(h, 6, 8, 2, "conv3")
    nodes.append(helper.make_node("Transpose", [h], ["perm"], name="/Transpose", perm=[0, 3, 2, 1]))
    nodes.append(helper.make_node("Flatten", ["perm"], ["flat"], name="/Flatten", axis=1))
    k = 8 * 3 * 3
    nodes.append(helper.make_node("Gemm", ["flat", w("d4.w", 16, k), w("d4.b", 16)], ["d4"], name="/dense4/Gemm",
                                  transB=1))
    nodes.append(helper.make_node("PRelu", ["d4", w("prelu4.a", 16, scale=0.1)], ["p4"], name="/prelu4/PRelu"))
    outs = []
    for name, m, out in (("5_1", 2, "logits"), ("5_2", 4, "box"), ("5_3", 10, "landmarks"))[:outputs]:
        nodes.append(helper.make_node("Gemm", ["p4", w(f"d{name}.w", m, 16), w(f"d{name}.b", m)], [out],
                                      name=f"/dense{name}/Gemm", transB=1))
        if out == "logits":
            nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], name="/softmax", axis=1))
            out = "prob"
        outs.append(helper.make_tensor_value_info(out, T.FLOAT, [batch, m]))
    graph = helper.make_graph(nodes, "rnet", [helper.make_tensor_value_info("input", T.FLOAT, [batch, 3, size, size])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def overfeat(shared_fc: bool, seed=1):
    """A classifier and a box regressor on one trunk map: either both read
    the one Flatten (``shared_fc=False``), or they share the first FC and
    split after its Relu; each branch has two FCs with a Relu between."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    w = lambda *a, **k: _w(inits, rng, *a, **k)  # noqa: E731
    nodes.append(helper.make_node("Conv", ["image", w("c.w", 6, 3, 3, 3), w("c.b", 6)], ["c"], name="conv"))
    nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
    nodes.append(helper.make_node("MaxPool", ["r"], ["pool5"], name="pool5", kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("Flatten", ["pool5"], ["flat"], name="flatten"))
    k = 6 * 4 * 4
    start = {"cls": "flat", "box": "flat"}
    kin = k
    if shared_fc:
        nodes.append(helper.make_node("Gemm", ["flat", w("fc6.w", k, 12), w("fc6.b", 12)], ["fc6"], name="fc6"))
        nodes.append(helper.make_node("Relu", ["fc6"], ["fc6r"], name="fc6_relu"))
        start = {"cls": "fc6r", "box": "fc6r"}
        kin = 12
    for branch, m in (("cls", 5), ("box", 4)):
        nodes.append(helper.make_node("Gemm", [start[branch], w(f"{branch}1.w", kin, 9), w(f"{branch}1.b", 9)],
                                      [f"{branch}1"], name=f"{branch}_fc1"))
        nodes.append(helper.make_node("Relu", [f"{branch}1"], [f"{branch}1r"], name=f"{branch}_relu"))
        nodes.append(helper.make_node("Gemm", [f"{branch}1r", w(f"{branch}2.w", 9, m), w(f"{branch}2.b", m)],
                                      [branch], name=f"{branch}_fc2"))
    graph = helper.make_graph(nodes, "overfeat", [helper.make_tensor_value_info("image", T.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("cls", T.FLOAT, ["N", 5]),
                               helper.make_tensor_value_info("box", T.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _dense_ok(model, result, skip_pixel_crops=False):
    report = check(model, result.model, dense=True)
    # Ceil-mode pools: a window of the map is not a crop of the input (the
    # classifier on its own input pools a partial window); the windows, the
    # native size and the shifts are what prove the dense map.
    judged = [o for o in report.outputs if not (skip_pixel_crops and "pixel crops" in o.name)]
    assert judged and all(o.passed for o in judged), "\n".join(report.lines())
    assert not report.errors, report.errors
    return report


@pytest.mark.parametrize("ceil", [0, 1])
def test_mtcnn_rnet_every_branch_converts_in_keep_mode(ceil):
    model = rnet(size=24 if ceil else 22, ceil=ceil)
    result = assert_converts(model, convs=4)
    assert [(l.name, l.converted, l.pattern) for l in result.layers] == [
        ("/dense4/Gemm", True, "Transpose+Flatten"), ("/dense5_1/Gemm", True, "branch"),
        ("/dense5_2/Gemm", True, "branch"), ("/dense5_3/Gemm", True, "branch")]
    assert result.heads == 1
    assert "Gemm" not in ops(result.model) and "Softmax" in ops(result.model)


def test_mtcnn_onet_like_two_outputs_and_batch_1():
    assert_converts(rnet(outputs=2, batch=1), convs=3, batch=1)


@pytest.mark.parametrize("ceil", [0, 1])
def test_mtcnn_rnet_dense_one_map_per_output_same_geometry(ceil):
    model = rnet(size=24 if ceil else 22, ceil=ceil)
    result = convert(model, dense=True)
    assert result.converted == 4 and "Gemm" not in ops(result.model)
    (geo,) = result.maps
    assert set(geo.outputs) == {"prob", "box", "landmarks"}
    for o in result.model.graph.output:
        assert len(o.type.tensor_type.shape.dim) == 4
    report = _dense_ok(model, result, skip_pixel_crops=bool(ceil))
    for name in ("prob", "box", "landmarks"):
        assert any(o.name.startswith(f"{name} @") and "windows" in o.name for o in report.outputs)


def test_dense_fork_maps_by_hand():
    """The dense maps of every branch at each position equal the original on
    the input crop that position sees (no ceil-mode pool: crops are windows)."""
    model = rnet(size=22, ceil=0)
    result = convert(model, dense=True)
    (geo,) = result.maps
    stride, rf = geo.axes[0].stride, geo.axes[0].receptive_field
    assert rf == 22
    x = np.random.default_rng(3).standard_normal((1, 3, 22 + 2 * stride, 22 + stride)).astype(np.float32)
    dense = dict(zip([o.name for o in result.model.graph.output], run(result.model, {"input": x})))
    for i in range(3):
        for j in range(2):
            crop = np.ascontiguousarray(x[:, :, i * stride:i * stride + rf, j * stride:j * stride + rf])
            for name, e in zip([o.name for o in model.graph.output], run(model, {"input": crop})):
                np.testing.assert_allclose(dense[name][..., i, j], e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared_fc", [False, True])
def test_overfeat_classifier_and_regressor(shared_fc):
    model = overfeat(shared_fc)
    n = 5 if shared_fc else 4
    result = assert_converts(model, convs=n)
    assert result.converted == n
    dense = convert(model, dense=True)
    assert dense.converted == n
    outputs = sorted(o for g in dense.maps for o in g.outputs)
    assert outputs == ["box", "cls"]
    assert len({(a.stride, a.receptive_field, a.offset) for g in dense.maps for a in g.axes}) == 1
    _dense_ok(model, dense)


def test_fork_output_also_read_and_branch_through_a_step():
    """The shared tensor is also a graph output, and one branch starts with a
    Relu before its FC: the output stays, the branch converts."""
    rng = np.random.default_rng(5)
    inits = []
    w = lambda *a, **k: _w(inits, rng, *a, **k)  # noqa: E731
    nodes = [helper.make_node("Flatten", ["x"], ["flat"]),
             helper.make_node("Gemm", ["flat", w("w1", 12, 8), w("b1", 8)], ["shared"], name="fc1"),
             helper.make_node("Relu", ["shared"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", w("w2", 8, 3)], ["a"], name="fc_a"),
             helper.make_node("Gemm", ["shared", w("w3", 8, 2)], ["b"], name="fc_b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, ["N", 3, 2, 2])],
                              [helper.make_tensor_value_info(n, T.FLOAT, ["N", m]) for n, m in
                               (("shared", 8), ("a", 3), ("b", 2))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = assert_converts(model, convs=3)
    assert [l.pattern for l in result.layers] == ["Flatten", "branch", "branch"]
    dense = convert(model, dense=True)
    assert set(dense.maps[0].outputs) == {"shared", "a", "b"}
    _dense_ok(model, dense)


def test_a_branch_without_fc_stays_and_refused_branch_is_named():
    """A consumer of the shared tensor that reaches no FC (an Identity to an
    output) stays as it was; keep mode converts the branch FCs beside it."""
    model = rnet()
    graph = model.graph
    graph.node.append(helper.make_node("Identity", ["p4"], ["features"], name="features"))
    graph.output.append(helper.make_tensor_value_info("features", T.FLOAT, ["N", 16]))
    result = assert_converts(model, convs=4)
    assert all(l.converted for l in result.layers)
    assert inspect(model).dense_reason is None


def test_without_fork_nothing_changes():
    """A head that does not fork gives the same layers as before: one chain."""
    model = rnet(outputs=1)
    result = assert_converts(model, convs=2)
    assert [l.pattern for l in result.layers] == ["Transpose+Flatten", "chain"]


def test_fork_with_fold_batch():
    model = rnet(size=22, ceil=0)
    result = convert(model, fold_batch=True)
    assert result.converted == 4
    feeds = feeds_for(model, 3)
    for e, a in zip(run(model, feeds), run(result.model, feeds)):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(e).max())))


def test_fork_dense_stride(tmp_path):
    """A finer map (à trous) of a forked head: every output, checked."""
    from onnx_fc2conv.api import check_result

    path = tmp_path / "rnet.onnx"
    onnx.save(rnet(size=22, ceil=0), path)
    result = convert(path, dense=True, dense_stride=2)
    (geo,) = result.maps
    assert set(geo.outputs) == {"prob", "box", "landmarks"} and geo.axes[0].stride == 2
    report = check_result(result, dense_stride=2)
    assert report.ok, "\n".join(report.lines())


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_quantized_fork_keeps_its_quantization(fmt, tmp_path):
    """onnxruntime's quantizer on the R-Net-like model: the shared QGemm (or
    QDQ Gemm) and its three branches convert, in keep and dense mode."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.data = iter([{"input": rng.standard_normal((1, 3, 22, 22)).astype(np.float32)} for _ in range(3)])

        def get_next(self):
            return next(self.data, None)

    onnx.save(rnet(size=22, ceil=0), tmp_path / "f.onnx")
    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(),
                    quant_format=getattr(QuantFormat, fmt))
    q = onnx.load(tmp_path / "q.onnx")
    keep = convert(q)
    assert [l.pattern for l in keep.layers][1:] == ["branch"] * 3 and all(l.converted for l in keep.layers)
    assert not {"Gemm", "QGemm"} & set(ops(keep.model))
    report = check(q, keep.model)
    assert report.ok, "\n".join(report.lines())
    dense = convert(q, dense=True)
    assert len(dense.maps[0].outputs) == 3
    _dense_ok(q, dense)
