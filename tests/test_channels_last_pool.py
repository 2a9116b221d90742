"""Global means on channels-last trunks (rules/collapse.py pooled_source,
spatial_axes): a ReduceMean/ReduceMax with keepdims=0 over exactly the
spatial axes of an NHWC map is a whole-map pool even with no Transpose right
before it (open_nsfw, a PyTorch NHWC port: ``ReduceMean(axes=[1,2],
keepdims=0)``, Casts around, then the FC). Keep mode and dense mode, checked
in onnxruntime against the original."""

import numpy as np
import pytest

from helpers import assert_converts, parse
from onnx_fc2conv import Fc2ConvError, check, convert, inspect, shapes
from onnx_fc2conv.graph import GraphIndex
from onnx_fc2conv.rules import Context
from onnx_fc2conv.rules.collapse import pooled_source, spatial_axes

rng = np.random.default_rng(0)


def w(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def nhwc_head(reduce="ReduceMean", axes="[1,2]", image="float[N,3,8,8] x", to_nchw=""):
    """Conv (NCHW) -> Transpose to NHWC -> a bias and Relu on the NHWC map ->
    Cast -> reduce(axes, keepdims=0) -> Cast -> Gemm."""
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g ({image}) => (float[N,5] y) {{
          {to_nchw or "xc = Identity(x)"}
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (xc, cw)
          t = Transpose <perm=[0,2,3,1]> (c)
          a = Add(t, cb)
          r = Relu(a)
          k = Cast <to=1> (r)
          m = {reduce} <axes={axes}, keepdims=0> (k)
          k2 = Cast <to=1> (m)
          y = Gemm <transB=1> (k2, w1, b1)
        }}""", cw=w(4, 3, 3, 3), cb=w(4), w1=w(5, 4), b1=w(5))


def ctx_of(model):
    return Context(GraphIndex(model), shapes.infer(model))


def node(model, out):
    return next(n for n in model.graph.node if out in n.output)


def test_spatial_axes_are_read_back_through_the_layout():
    model = nhwc_head()
    ctx = ctx_of(model)
    assert spatial_axes(ctx, "k") == {1, 2}          # NHWC after the Transpose, through Add/Relu/Cast
    assert spatial_axes(ctx, "c") == {2, 3}          # the Conv's own NCHW output
    assert spatial_axes(ctx, "xc") is None           # before any windowed op: not known
    assert pooled_source(ctx, node(model, "m")) == ("k", (0, 3, 1, 2))


def test_spatial_axes_through_a_channel_concat_and_a_pad():
    """An NHWC port's inception-like join (Concat along C) and a Pad keep the layout."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,5] y) {
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, cw)
          t = Transpose <perm=[0,2,3,1]> (c)
          j = Concat <axis=3> (t, t)
          q = Pad(j, pads)
          m = ReduceMean <axes=[1,2], keepdims=0> (q)
          y = Gemm <transB=1> (m, w1, b1)
        }""", cw=w(4, 3, 3, 3), pads=np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), w1=w(5, 8), b1=w(5))
    assert spatial_axes(ctx_of(model), "q") == {1, 2}
    assert_converts(model, convs=1)
    report = check(model, convert(model, dense=True).model, dense=True)
    assert report, "\n".join(report.lines())


@pytest.mark.parametrize("reduce", ["ReduceMean", "ReduceMax"])
@pytest.mark.parametrize("image", ["nchw", "nhwc"])
def test_channels_last_global_reduce_is_a_whole_map_pool(reduce, image):
    model = nhwc_head(reduce) if image == "nchw" else \
        nhwc_head(reduce, image="float[N,8,8,3] x", to_nchw="xc = Transpose <perm=[0,3,1,2]> (x)")
    result = assert_converts(model, convs=1)
    layer = result.layers[0]
    assert (layer.pattern, layer.layout) == (f"{reduce}(keepdims=0)+Cast", "NHWC")
    assert layer.becomes == "Conv 1x1, 4 -> 5 channels"
    dense = convert(model, dense=True)
    pool = {"ReduceMean": "AveragePool", "ReduceMax": "MaxPool"}[reduce]
    ops = [n.op_type for n in dense.model.graph.node]
    assert ops[ops.index(pool) - 1] == "Transpose" and reduce not in ops, ops
    assert [a["window"] for a in dense.geometry[0]["axes"]] == [8, 8]
    assert dense.geometry[0]["window_source"] == "k"
    report = check(model, dense.model, dense=True)
    assert report, "\n".join(report.lines())
    assert sum("windows" in o.name for o in report.outputs) == 2
    assert sum("@shift" in o.name for o in report.outputs) == 2
    assert inspect(model).dense_reason is None


def test_a_reduction_over_channels_and_height_is_no_pool():
    """ReduceMean over axes [1, 2] of an NCHW map (C and H, not the spatial
    axes): not a whole-map pool; the FC is refused as before."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,5] y) {
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, cw)
          m = ReduceMean <axes=[1,2], keepdims=0> (c)
          y = Gemm <transB=1> (m, w1, b1)
        }""", cw=w(4, 3, 3, 3), w1=w(5, 8), b1=w(5))
    assert pooled_source(ctx_of(model), node(model, "m")) is None
    result = convert(model)
    assert not result.layers[0].converted
    assert "not from a flattened spatial feature map" in result.layers[0].reason
    with pytest.raises(Fc2ConvError, match="none of the 1 FC layer converts"):
        convert(model, dense=True)


def test_global_average_pool_after_a_transpose_with_casts_around():
    """An NHWC trunk that turns channels-first only for its pool:
    ``Transpose(0,3,1,2) -> Cast -> GlobalAveragePool -> Cast -> Flatten -> Gemm``."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,8,8,3] x) => (float[N,5] y) {
          xc = Transpose <perm=[0,3,1,2]> (x)
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (xc, cw)
          t = Transpose <perm=[0,2,3,1]> (c)
          r = Relu(t)
          back = Transpose <perm=[0,3,1,2]> (r)
          k = Cast <to=1> (back)
          p = GlobalAveragePool(k)
          k2 = Cast <to=1> (p)
          f = Flatten(k2)
          y = Gemm <transB=1> (f, w1, b1)
        }""", cw=w(4, 3, 3, 3), w1=w(5, 4), b1=w(5))
    result = assert_converts(model, convs=1)
    assert result.layers[0].pattern == "GlobalAveragePool+Cast+Flatten"
    dense = convert(model, dense=True)
    assert dense.geometry[0]["window_source"] == "k"
    report = check(model, dense.model, dense=True)
    assert report, "\n".join(report.lines())
