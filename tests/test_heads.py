"""The heads today's models have (timm, ConvNeXt, MobileNetV3, keyword
spotting, tf2onnx): each converts in keep mode and, where the trunk acts per
position, in dense mode, proven in onnxruntime against the original; the
refusals that stay correct keep their messages. Real exporters' versions of
these heads are in tests/fixtures/heads (test_fixtures_heads below)."""

from pathlib import Path

import numpy as np
import pytest

from helpers import ops, parse
from onnx_fc2conv import Fc2ConvError, check, convert, inspect

HEADS = Path(__file__).parent / "fixtures" / "heads"
rng = np.random.default_rng(7)


def w(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


CONSTS = dict(cw=w(4, 3, 3, 3), ls=w(4) + 1, lb=w(4), fw=w(5, 4), fb=w(5), hw=w(6, 4, 1, 1), hb=w(6),
              fw6=w(5, 6), fw8=w(5, 8), gw=w(6, 64), gb=w(6), ls6=w(6) + 1, lb6=w(6), half=np.array(0.5, np.float32),
              bs=w(4) + 1, bb=w(4), bm=w(4), bv=np.abs(w(4)) + 1)

# head after c = Conv(x) [N,4,4,4]: lines, opset, pattern of the first FC, dense possible
CASES = {
    "pool -> LayerNorm -> Linear (ConvNeXt, flattened)": (
        "p = GlobalAveragePool(c)\n f = Flatten(p)\n n = LayerNormalization <axis=-1> (f, ls, lb)\n"
        " y = Gemm <transB=1> (n, fw, fb)", 17, "GlobalAveragePool+Flatten+LayerNormalization"),
    "pool -> LayerNorm2d -> Linear (timm ConvNeXt)": (
        "p = GlobalAveragePool(c)\n t = Transpose <perm=[0,2,3,1]> (p)\n n = LayerNormalization <axis=-1> (t, ls, lb)\n"
        " t2 = Transpose <perm=[0,3,1,2]> (n)\n f = Flatten(t2)\n y = Gemm <transB=1> (f, fw, fb)", 17,
        "GlobalAveragePool+LayerNormalization+Flatten"),
    "pool -> BatchNorm -> Linear": (
        "p = GlobalAveragePool(c)\n f = Flatten(p)\n n = BatchNormalization(f, bs, bb, bm, bv)\n"
        " y = Gemm <transB=1> (n, fw, fb)", 15, "GlobalAveragePool+Flatten+BatchNormalization"),
    "Linear -> LayerNorm -> ReLU -> Linear (keyword spotting)": (
        "f = Flatten(c)\n h = Gemm <transB=1> (f, gw, gb)\n n = LayerNormalization (h, ls6, lb6)\n r = Relu(n)\n"
        " y = Gemm <transB=1> (r, fw6, fb)", 17, "Flatten"),
    "pool -> conv_head -> HardSwish -> Linear (MobileNetV3)": (
        "p = GlobalAveragePool(c)\n h = Conv <kernel_shape=[1,1]> (p, hw, hb)\n a = HardSwish(h)\n f = Flatten(a)\n"
        " y = Gemm <transB=1> (f, fw6, fb)", 14, "HardSwish+Flatten"),
    "avgmax pool": (
        "p1 = GlobalAveragePool(c)\n p2 = GlobalMaxPool(c)\n s = Add(p1, p2)\n h = Mul(s, half)\n f = Flatten(h)\n"
        " y = Gemm <transB=1> (f, fw, fb)", 14, "Mul+Flatten"),
    "catavgmax pool": (
        "p1 = GlobalAveragePool(c)\n p2 = GlobalMaxPool(c)\n h = Concat <axis=1> (p1, p2)\n f = Flatten(h)\n"
        " y = Gemm <transB=1> (f, fw8, fb)", 14, "Flatten"),
    "Cast between pool and MatMul and between MatMul and Add (tf2onnx)": (
        "p = GlobalAveragePool(c)\n f = Flatten(p)\n k = Cast <to=1> (f)\n m = MatMul(k, fwt)\n k2 = Cast <to=1> (m)\n"
        " y = Add(k2, fb)", 13, "GlobalAveragePool+Flatten+Cast"),
}


def _model(lines, opset, **extra):
    return parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N,3,8,8] x) => (float[N,5] y) {{
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1], strides=[2,2]> (x, cw)
          {lines}
        }}""", **CONSTS, fwt=w(4, 5), **extra)


@pytest.mark.parametrize("name", list(CASES))
def test_head_converts_in_keep_and_dense_mode(name):
    lines, opset, pattern = CASES[name]
    model = _model(lines, opset)
    layers = inspect(model).layers
    assert all(layer.converted for layer in layers) and layers[0].pattern == pattern, [l.to_dict() for l in layers]
    keep = convert(model)
    assert not {"Gemm", "MatMul"} & set(ops(keep.model))
    assert check(model, keep.model)
    dense = convert(model, dense=True)
    assert not {"Gemm", "MatMul", "GlobalAveragePool", "GlobalMaxPool"} & set(ops(dense.model))
    report = check(model, dense.model, dense=True)
    assert report, "\n".join(report.lines())
    assert any("@shift" in o.name for o in report.outputs)


def test_layernorm_over_a_flattened_map_is_refused_naming_it():
    """A LayerNorm over C*H*W features is not a convolution of the map."""
    model = _model("f = Flatten(c)\n n = LayerNormalization(f, l64, b64)\n y = Gemm <transB=1> (n, f64, fb)", 17,
                   l64=w(64) + 1, b64=w(64), f64=w(5, 64))
    layer = inspect(model).layers[0]
    assert not layer.converted
    assert layer.reason.startswith("LayerNormalization 'n' before it acts on the flattened features of a 4x4 map")


def test_refused_fc_after_a_stopped_chain_names_the_blocker():
    model = _model("f = Flatten(c)\n h = Gemm <transB=1> (f, gw, gb)\n n = Softmax <axis=0> (h)\n"
                   " y = Gemm <transB=1> (n, fw6, fb)", 13)
    layers = inspect(model).layers
    assert layers[0].converted and not layers[1].converted
    assert "it follows FC 'h', whose chain stops at Softmax 'n' acts along axis 0" in layers[1].reason


def test_linear_over_channels_last_maps_become_1x1_convs():
    """ConvNeXt's block MLP: MatMuls over [N,H,W,C] are FCs over a map."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,8,8] x) => (float[N,5] y) {
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1], strides=[2,2]> (x, cw)
          t = Transpose <perm=[0,2,3,1]> (c)
          n = LayerNormalization <axis=-1> (t, ls, lb)
          l = MatMul(n, w1)
          la = Add(l, b1)
          g2 = Relu(la)
          l2 = MatMul(g2, w2)
          t2 = Transpose <perm=[0,3,1,2]> (l2)
          r = Add(c, t2)
          p = GlobalAveragePool(r)
          f = Flatten(p)
          y = Gemm <transB=1> (f, fw, fb)
        }""", **CONSTS, w1=w(4, 16), b1=w(16), w2=w(16, 4))
    layers = inspect(model).layers
    maps = [l for l in layers if l.pattern.startswith("map")]
    assert [(l.op, l.kernel, l.in_channels, l.out_channels) for l in maps] == [("MatMul+Add", [1, 1], 4, 16),
                                                                             ("MatMul", [1, 1], 16, 4)]
    keep = convert(model)
    assert "MatMul" not in ops(keep.model) and check(model, keep.model)
    dense = convert(model, dense=True)
    assert "MatMul" not in ops(dense.model) and check(model, dense.model, dense=True)


def test_token_sequences_stay_refused():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,7,6] x) => (float[N,7,3] y) { y = MatMul(x, w) }""", w=w(6, 3))
    layer = inspect(model).layers[0]
    assert not layer.converted and "has rank 3" in layer.reason
    with pytest.raises(Fc2ConvError, match="none of the 1 FC layer converts"):
        convert(model, dense=True)


# file: (FCs, pattern of the last FC, dense refusal or None)
HEAD_FIXTURES = {
    "avgmax_ts.onnx": (1, "Mul+Flatten", None),
    "avgmax_dynamo.onnx": (1, "Mul+Reshape", None),
    "catavgmax_ts.onnx": (1, "Flatten", None),
    "catavgmax_dynamo.onnx": (1, "Reshape", None),
    "conv_head_ts.onnx": (1, "HardSwish+Flatten", None),
    "conv_head_dynamo.onnx": (1, "HardSwish+Reshape", None),
    "convnext_head_ts.onnx": (5, "GlobalAveragePool+LayerNormalization+Flatten", None),
    # dynamo writes the pooled map's view as a Gather over a flattened copy (as_strided):
    # an identity computed for the native size, which dense mode replaces by Identity
    "convnext_head_dynamo.onnx": (5, "LayerNormalization+Reshape", None),
    "mlp_ln_1d_ts.onnx": (2, "chain", None),
    "mlp_ln_1d_dynamo.onnx": (2, "chain", None),
    "keras_nhwc_gap_tf2onnx.onnx": (1, "ReduceMean(keepdims=0)", None),
    "keras_nhwc_gap_cast_tf2onnx.onnx": (1, "ReduceMean(keepdims=0)+Cast", None),
}


def test_every_heads_fixture_is_listed():
    assert sorted(p.name for p in HEADS.glob("*.onnx")) == sorted(HEAD_FIXTURES)


@pytest.mark.parametrize("name", sorted(HEAD_FIXTURES))
def test_fixtures_heads(name):
    """Both PyTorch exporters and tf2onnx: every FC converts and checks in
    keep mode; dense mode checks (window property, equivariance) or is
    refused with the reason."""
    path = HEADS / name
    fcs, pattern, refusal = HEAD_FIXTURES[name]
    keep = convert(path)
    assert keep.converted == len(keep.layers) == fcs
    if pattern:
        assert keep.layers[-1].pattern == pattern, [l.pattern for l in keep.layers]
    assert not {"Gemm", "MatMul"} & set(ops(keep.model))
    report = check(path, keep.model)
    assert report, "\n".join(report.lines())
    if refusal:
        with pytest.raises(Fc2ConvError, match=refusal):
            convert(path, dense=True)
        return
    dense = convert(path, dense=True)
    report = check(path, dense.model, dense=True)
    assert report, "\n".join(report.lines())
