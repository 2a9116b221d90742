"""Region steps (rules/steps.py): per-position subgraphs with one input and
one output, whatever their fan-out inside, written as the exporters write
them (TorchScript's GELU, GELU tanh, SiLU, Mish, Hardswish below opset 14,
decomposed LayerNorm and RMSNorm). Each is carried to the map before the
first FC, between FCs and after the last, in keep and dense mode, and checked
in onnxruntime against the original; in the trunk (geometry.py) a reduction
along the channels is per position and one along a spatial axis is refused
by name."""

import re

import numpy as np
import onnx
import pytest

from helpers import assert_converts, parse
from onnx_fc2conv import Fc2ConvError, check, convert, inspect, shapes
from onnx_fc2conv.graph import GraphIndex
from onnx_fc2conv.rules import Context, Refusal
from onnx_fc2conv.rules.steps import Region, match_region

rng = np.random.default_rng(0)
M = 8   # the width every region sees: the trunk's channels and both FCs' outputs


def w(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def const(name, value):
    return f"{name} = Constant <value = float {{{value}}}> ()"


# Each region reads X and writes Y (placeholders), as the exporter writes it:
# (lines, opset, constants, the ops in the region)
GELU = ("\n".join([const("Xsq", 1.4142135), "Xd = Div(X, Xsq)", "Xe = Erf(Xd)", const("Xone", 1.0),
                   "Xa = Add(Xe, Xone)", "Xm = Mul(X, Xa)", const("Xhalf", 0.5), "Y = Mul(Xm, Xhalf)"]),
        17, {}, "Div, Erf, Add, Mul, Mul")
GELU_TANH = ("\n".join(["Xsq = Mul(X, X)", "Xcube = Mul(X, Xsq)", const("Xk", 0.044715), "Xkc = Mul(Xk, Xcube)",
                        "Xin = Add(X, Xkc)", const("Xb", 0.7978845608), "Xinner = Mul(Xb, Xin)", "Xt = Tanh(Xinner)",
                        const("Xone", 1.0), "Xa = Add(Xone, Xt)", "Xm = Mul(X, Xa)", const("Xhalf", 0.5),
                        "Y = Mul(Xhalf, Xm)"]),
             17, {}, "Mul, Mul, Mul, Add, Mul, Tanh, Add, Mul, Mul")
SILU = ("Xs = Sigmoid(X)\nY = Mul(X, Xs)", 17, {}, "Sigmoid, Mul")
MISH = ("Xp = Softplus(X)\nXt = Tanh(Xp)\nY = Mul(X, Xt)", 17, {}, "Softplus, Tanh, Mul")
HARDSWISH = ("Xh = HardSigmoid <alpha = 0.16666667> (X)\nY = Mul(X, Xh)", 13, {}, "HardSigmoid, Mul")
LAYERNORM = ("\n".join(["Xmu = ReduceMean <axes = [-1]> (X)", "Xc = Sub(X, Xmu)", const("Xtwo", 2.0),
                        "Xp = Pow(Xc, Xtwo)", "Xvar = ReduceMean <axes = [-1]> (Xp)", const("Xeps", 1e-5),
                        "Xve = Add(Xvar, Xeps)", "Xsd = Sqrt(Xve)", "Xn = Div(Xc, Xsd)", "Xg = Mul(Xn, Xgamma)",
                        "Y = Add(Xg, Xbeta)"]),
             16, {"Xgamma": w(M) + 1, "Xbeta": w(M)}, "ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add")
# opset 18: ReduceMean's axes are an input
LAYERNORM_18 = (LAYERNORM[0].replace("ReduceMean <axes = [-1]> (X)", "ReduceMean(X, Xaxes)")
                .replace("ReduceMean <axes = [-1]> (Xp)", "ReduceMean(Xp, Xaxes)"),
                18, dict(LAYERNORM[2], Xaxes=np.array([-1], np.int64)), LAYERNORM[3])
RMSNORM = ("\n".join([const("Xtwo", 2.0), "Xp = Pow(X, Xtwo)", "Xms = ReduceMean <axes = [1]> (Xp)",
                      const("Xeps", 1e-6), "Xe = Add(Xms, Xeps)", "Xr = Sqrt(Xe)", "Xi = Reciprocal(Xr)",
                      "Xn = Mul(X, Xi)", "Y = Mul(Xn, Xgamma)"]),
           13, {"Xgamma": w(M) + 1}, "Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul")


def _then(first, second):
    """``second`` reading what ``first`` writes: one region."""
    text = re.sub(r"\bX(\w+)", r"XL\1", second[0])
    text = re.sub(r"\bX\b", "Xmid", text)
    consts = {re.sub(r"^X", "XL", k): v for k, v in second[2].items()}
    return (first[0].replace("Y = ", "Xmid = ") + "\n" + text, max(first[1], second[1]), dict(first[2], **consts),
            first[3] + ", " + second[3])


GELU_LN = _then(GELU, LAYERNORM)
NORM_ONLY = ("\n".join(LAYERNORM[0].splitlines()[:-2]).replace("Xn = Div", "Y = Div"), 16, {},
             "ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div")

REGIONS = {"GELU (erf)": GELU, "GELU (tanh)": GELU_TANH, "SiLU": SILU, "Mish": MISH, "Hardswish opset 13": HARDSWISH,
           "LayerNorm": LAYERNORM, "LayerNorm opset 18": LAYERNORM_18, "RMSNorm": RMSNORM,
           "GELU then LayerNorm": GELU_LN, "LayerNorm without affine": NORM_ONLY}


def region(name, x, y, prefix):
    """The region's lines reading ``x`` and writing ``y``, its tensors and
    constants renamed with ``prefix``; and its constants."""
    lines, opset, consts, _ = REGIONS[name]
    text = re.sub(r"\bY = ", f"{y} = ", lines)
    text = re.sub(r"\bX(\w+)", rf"{prefix}_\1", text)
    text = re.sub(r"\bX\b", x, text)
    return text, opset, {re.sub(r"^X", f"{prefix}_", k): v for k, v in consts.items()}


def head(name, where):
    """x [N,3,6,6] -> Conv 3x3 (8 channels, a 4x4 map) -> ... -> y [N,8], with
    the region before the first FC (after a global pool), between the FCs, or
    after the last FC."""
    head_lines = {
        "before": ["p = GlobalAveragePool(c)", "f = Flatten(p)", "R(f, h)", "y = Gemm <transB=1> (h, w1, b1)"],
        "between": ["f = Flatten(c)", "h = Gemm <transB=1> (f, w0, b0)", "R(h, g)", "y = Gemm <transB=1> (g, w1, b1)"],
        "after": ["f = Flatten(c)", "h = Gemm <transB=1> (f, w0, b0)", "g = Relu(h)",
                  "k = Gemm <transB=1> (g, w1, b1)", "R(k, y)"],
    }[where]
    lines, opsets, inits = [], [], dict(cw=w(M, 3, 3, 3), w0=w(M, M * 16), b0=w(M), w1=w(M, M), b1=w(M))
    for line in head_lines:
        if line.startswith("R("):
            x, y = line[2:-1].split(", ")
            text, opset, consts = region(name, x, y, "r")
            lines.append(text)
            opsets.append(opset)
            inits.update(consts)
        else:
            lines.append(line)
    body = "\n".join(lines)
    return parse(f"""
        <ir_version: 8, opset_import: ["" : {max(opsets)}]>
        g (float[N,3,6,6] x) => (float[N,{M}] y) {{
          c = Conv <kernel_shape=[3,3]> (x, cw)
          {body}
        }}""", **inits)


@pytest.mark.parametrize("where", ["before", "between", "after"])
@pytest.mark.parametrize("name", list(REGIONS))
def test_region_converts_in_keep_and_dense_mode(name, where):
    model = head(name, where)
    fcs = 1 if where == "before" else 2
    result = assert_converts(model, convs=fcs)
    assert all(layer.converted for layer in result.layers)
    dense = convert(model, dense=True)
    report = check(model, dense.model, dense=True)
    assert report, "\n".join(report.lines())
    assert any("windows" in o.name for o in report.outputs)
    found = inspect(model)
    ops_list = REGIONS[name][3]
    if where == "before":
        assert found.layers[0].pattern == f"GlobalAveragePool+Flatten+region({ops_list.replace(', ', ',')})"
    else:
        assert f"region ({ops_list})" in found.heads[0], found.heads


def test_inspect_names_each_region_step():
    model = head("GELU (erf)", "between")
    found = inspect(model)
    assert found.heads == ["Flatten -> Gemm 'h' -> region (Div, Erf, Add, Mul, Mul) -> Gemm 'y'"]
    assert found.to_dict()["heads"] == found.heads


def test_cli_inspect_prints_the_head_line(tmp_path, capsys):
    from onnx_fc2conv.cli import main

    path = tmp_path / "gelu.onnx"
    onnx.save(head("GELU (erf)", "between"), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "head 0: Flatten -> Gemm 'h' -> region (Div, Erf, Add, Mul, Mul) -> Gemm 'y'" in out, out


def ctx_of(model):
    return Context(GraphIndex(model), shapes.infer(model))


def test_region_on_the_map_reduces_along_the_channel_axis():
    """keep mode: ReduceMean axes=[-1] on [N, M] becomes axes=[1] on [N, M, 1, 1];
    opset 18: the axes input becomes [1]."""
    for name in ("LayerNorm", "LayerNorm opset 18"):
        out = convert(head(name, "between")).model
        idx = GraphIndex(out)
        means = [n for n in out.graph.node if n.op_type == "ReduceMean"]
        assert len(means) == 2
        for n in means:
            axes = [a.ints for a in n.attribute if a.name == "axes"]
            axes = list(axes[0]) if axes else [int(v) for v in idx.value(n.input[1])]
            assert axes == [1], (name, axes)


def test_a_region_with_two_non_constant_inputs_is_not_one_step():
    """``h * s + h`` where ``s`` is a second graph input: not a region; the
    second FC says why, naming the node."""
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,6,6] x, float[N,{M}] s) => (float[N,{M}] y) {{
          c = Conv <kernel_shape=[3,3]> (x, cw)
          f = Flatten(c)
          h = Gemm <transB=1> (f, w0, b0)
          u = Mul(h, s)
          v = Add(u, h)
          y = Gemm <transB=1> (v, w1, b1)
        }}""", cw=w(M, 3, 3, 3), w0=w(M, M * 16), b0=w(M), w1=w(M, M), b1=w(M))
    got = match_region("h", M, 2, ctx_of(model))
    assert isinstance(got, Refusal) and got.reason == "combines the features with another tensor"
    assert got.node.output[0] == "u"
    result = convert(model)
    assert [layer.converted for layer in result.layers] == [True, False]
    assert "whose chain stops at Mul 'u' combines the features with another tensor" in result.layers[1].reason
    with pytest.raises(Fc2ConvError, match="FC 'y' is not converted"):
        convert(model, dense=True)


def test_a_region_reducing_along_the_batch_is_refused_by_name():
    """x - mean over the batch (ReduceMean axes=[0]) mixes samples: refused, named."""
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,6,6] x) => (float[N,{M}] y) {{
          c = Conv <kernel_shape=[3,3]> (x, cw)
          f = Flatten(c)
          h = Gemm <transB=1> (f, w0, b0)
          mu = ReduceMean <axes = [0]> (h)
          v = Sub(h, mu)
          y = Gemm <transB=1> (v, w1, b1)
        }}""", cw=w(M, 3, 3, 3), w0=w(M, M * 16), b0=w(M), w1=w(M, M), b1=w(M))
    result = convert(model)
    assert not result.layers[1].converted
    assert "ReduceMean 'mu' acts along axis 0, not the feature axis" in result.layers[1].reason


def test_a_region_on_a_flattened_map_may_not_reduce_along_its_features():
    """Before the first FC, on a flattened 4x4 map (not pooled), GELU is element-wise
    and converts; a LayerNorm would normalise the whole map's features at once,
    which no convolution of the map does: refused, named."""
    def flat_head(name):
        text, opset, consts = region(name, "f", "h", "r")
        if "r_gamma" in consts:
            consts = {k: np.resize(v, M * 16).astype(np.float32) for k, v in consts.items()}
        return parse(f"""
            <ir_version: 8, opset_import: ["" : {opset}]>
            g (float[N,3,6,6] x) => (float[N,{M}] y) {{
              c = Conv <kernel_shape=[3,3]> (x, cw)
              f = Flatten(c)
              {text}
              y = Gemm <transB=1> (h, w1, b1)
            }}""", cw=w(M, 3, 3, 3), w1=w(M, M * 16), b1=w(M), **consts)

    gelu = flat_head("GELU (erf)")
    result = assert_converts(gelu, convs=1)
    assert result.layers[0].pattern == "Flatten+region(Div,Erf,Add,Mul,Mul)"
    assert check(gelu, convert(gelu, dense=True).model, dense=True)
    affine = convert(flat_head("LayerNorm"))
    assert affine.layers[0].reason == "Mul 'r_g' uses a constant of shape [128] that is not per feature before it"
    norm = convert(flat_head("LayerNorm without affine"))
    assert not norm.layers[0].converted
    assert norm.layers[0].reason == ("region (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div) before it acts on the "
                                     "flattened features of a 4x4 map as a whole, which no convolution of the map "
                                     "does"), norm.layers[0].reason


def test_region_in_the_dense_tail_after_a_graph_output():
    """The last FC's output is a graph output and also feeds a GELU to a second
    output: the chain ends at the output, the dense tail takes the region."""
    text, opset, consts = region("GELU (erf)", "k", "y2", "r")
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N,3,6,6] x) => (float[N,{M}] k, float[N,{M}] y2) {{
          c = Conv <kernel_shape=[3,3]> (x, cw)
          f = Flatten(c)
          k = Gemm <transB=1> (f, w0, b0)
          {text}
        }}""", cw=w(M, 3, 3, 3), w0=w(M, M * 16), b0=w(M), **consts)
    assert_converts(model, convs=1)
    dense = convert(model, dense=True)
    report = check(model, dense.model, dense=True)
    assert report, "\n".join(report.lines())
    assert any(o.name.startswith("y2 @") for o in report.outputs)


def test_region_matcher_takes_every_per_position_op_up_to_the_next_fc():
    model = head("GELU (erf)", "between")
    got = match_region("h", M, 2, ctx_of(model))
    assert isinstance(got, Region)
    assert got.ops == "Div, Erf, Add, Mul, Mul" and got.output == "g" and got.input == "h"
    assert not got.per_feature


# -- the dense trunk's allow-list (geometry.py) ------------------------------

def trunk(lines, opset, consts):
    return parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N,3,10,10] x) => (float[N,5] y) {{
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, cw)
          {lines}
          p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (o)
          f = Flatten(p)
          y = Gemm <transB=1> (f, fw, fb)
        }}""", cw=w(M, 3, 3, 3), fw=w(5, M * 25), fb=w(5), **consts)


def _channel_norm(axes: str, opset=13):
    """A LayerNorm over the channels of [N, C, H, W] (or over ``axes``), decomposed."""
    gamma = (w(M) + 1).reshape(M, 1, 1)
    text = "\n".join([f"mu = ReduceMean <axes = {axes}> (c)", "d = Sub(c, mu)", "sq = Mul(d, d)",
                      f"var = ReduceMean <axes = {axes}> (sq)", const("eps", 1e-5), "ve = Add(var, eps)",
                      "sd = Sqrt(ve)", "n = Div(d, sd)", "o = Mul(n, gamma)"])
    return trunk(text, opset, {"gamma": gamma})


def test_trunk_region_along_the_channels_is_per_position():
    model = _channel_norm("[1]")
    dense = convert(model, dense=True)
    report = check(model, dense.model, dense=True)
    assert report, "\n".join(report.lines())
    assert sum("@shift" in o.name for o in report.outputs) == 2


def test_trunk_region_along_a_spatial_axis_is_refused_by_name():
    model = _channel_norm("[-1]")
    assert convert(model).converted == 1   # keep mode does not care
    with pytest.raises(Fc2ConvError, match=r"ReduceMean 'mu' in the trunk acts along spatial axis 3"):
        convert(model, dense=True)


def _pooled_norm_head(axes: str):
    """GlobalAveragePool -> a LayerNorm over ``axes`` of the pooled [N, C, 1, 1]
    map, then Hardswish (opset 13: HardSigmoid, Mul) -> Flatten -> Gemm."""
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,6,6] x) => (float[N,5] y) {{
          c = Conv <kernel_shape=[3,3]> (x, cw)
          p = GlobalAveragePool(c)
          mu = ReduceMean <axes = {axes}> (p)
          d = Sub(p, mu)
          sq = Mul(d, d)
          var = ReduceMean <axes = {axes}> (sq)
          ve = Add(var, eps)
          sd = Sqrt(ve)
          n = Div(d, sd)
          o = Mul(n, gamma)
          hs = HardSigmoid <alpha=0.16666667> (o)
          hw = Mul(o, hs)
          f = Flatten(hw)
          y = Gemm <transB=1> (f, w1, b1)
        }}""", cw=w(M, 3, 3, 3), eps=np.array(1e-5, np.float32), gamma=w(1, M, 1, 1) + 1, w1=w(5, M), b1=w(5))


def test_region_on_a_pooled_map_before_the_flatten():
    """Along the channels of the pooled map (axes=[1]): one region, keep and dense."""
    model = _pooled_norm_head("[1]")
    result = assert_converts(model, convs=1)
    assert result.layers[0].pattern == \
        "GlobalAveragePool+region(ReduceMean,Sub,Mul,ReduceMean,Add,Sqrt,Div,Mul,HardSigmoid,Mul)+Flatten"
    report = check(model, convert(model, dense=True).model, dense=True)
    assert report, "\n".join(report.lines())


def test_region_along_a_spatial_axis_of_the_pooled_map_is_refused_in_dense_mode():
    """Along axis -1 (W, of size 1 after the pool): keep mode is the same
    arithmetic; on a dense map it would mix positions, so dense mode refuses,
    naming the reduction."""
    model = _pooled_norm_head("[-1]")
    got = match_region("p", M, 2, ctx_of(model))
    assert isinstance(got, Refusal) and got.reason == "acts along axis 3, not the feature axis"
    assert got.node.output[0] == "mu"
    assert_converts(model, convs=1)
    with pytest.raises(Fc2ConvError, match=r"ReduceMean 'mu' in the trunk acts along spatial axis 3"):
        convert(model, dense=True)


def test_mean_variance_normalization_with_default_axes_once_its_shape_is_known():
    """MVN's default axes [0, 2, 3] mix positions: once its output shape is
    known (ONNX inference leaves it unknown from opset 13; here given as the
    runtime probe would), keep mode converts and dense mode refuses, naming it."""
    for opset in (13, 18):
        model = trunk("o = MeanVarianceNormalization(c)", opset, {})
        model.graph.value_info.append(onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT,
                                                                         ["N", M, 10, 10]))
        result = convert(model)   # (onnx's full check fails on MVN's own function body from opset 13)
        assert result.converted == 1 and "Conv" in [n.op_type for n in result.model.graph.node[-2:]]
        assert check(model, result.model)
        with pytest.raises(Fc2ConvError, match=r"MeanVarianceNormalization 'o' in the trunk acts along spatial "
                                               r"axes \[2, 3\] \(axes \[0, 2, 3\]"):
            convert(model, dense=True)


@pytest.mark.parametrize("name", ["GELU (erf)", "SiLU", "Hardswish opset 13", "LayerNorm"])
def test_region_in_a_qdq_model_from_onnxruntimes_quantizer(name, tmp_path):
    """onnxruntime's quantize_static (QDQ) wraps the region's ops in
    Quantize/Dequantize pairs, writes its constants as dequantized ones, and
    starts the next FC at its input's QuantizeLinear: the region stops there,
    and both FCs convert."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": np.random.default_rng(i).standard_normal((1, 3, 6, 6)).astype(np.float32)}
                               for i in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    src, out = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(head(name, "between"), src)
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    model = onnx.load(out)
    result = convert(model)
    assert [layer.conv for layer in result.layers] == ["DequantizeLinear+Conv"] * 2
    assert all(layer.converted for layer in result.layers)
    assert check(model, result.model)
    report = check(model, convert(model, dense=True).model, dense=True)
    assert report, "\n".join(report.lines())
    line = inspect(model).heads[0]
    assert "region (" in line and line.count("QDQ Gemm") == 2, line
