"""Dense mode's allow-list of trunk ops (ops.py, geometry.py): each op that
mixes positions is refused, naming the node and the op; each op that acts per
position converts and its dense model passes the check (window property and
translation equivariance). Also: deep trunks, squeeze-excitation with
--keep-global-pools, Caffe-era covering AveragePool heads, and --dense when
no FC converts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import parse, run
from onnx_fc2conv import Fc2ConvError, check, convert, inspect

FIXTURES = Path(__file__).parent / "fixtures"
rng = np.random.default_rng(0)


def w(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def trunk_model(op_lines: str, opset: int = 13, channels: int = 4, extra_inputs: dict | None = None, domains=""):
    """x [N,3,12,12] -> Conv 3x3 pad 1 (c) -> OP lines reading c, writing o ->
    Relu -> MaxPool 2 -> Flatten -> Gemm -> y [N,5]."""
    inits = dict(cw=w(channels, 3, 3, 3), fw=w(5, channels * 36), fb=w(5))
    inits.update(extra_inputs or {})
    return parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}{domains}]>
        g (float[N,3,12,12] x) => (float[N,5] y) {{
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, cw)
          {op_lines}
          r = Relu(o)
          p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)
          f = Flatten(p)
          y = Gemm <transB=1> (f, fw, fb)
        }}""", **inits)


# op lines, opset, constants, the words the refusal must contain
REFUSED = {
    "MeanVarianceNormalization default axes": ("o = MeanVarianceNormalization(c)", 12, {}, "spatial axes [2, 3]"),
    "Softmax axis=1 opset 11 (flattens C*H*W)": ("o = Softmax <axis=1> (c)", 11, {}, "spatial axes [2, 3]"),
    "LogSoftmax-13 default axis (W)": ("o = LogSoftmax(c)", 13, {}, "spatial axis 3"),
    "Hardmax-13 default axis (W)": ("o = Hardmax(c)", 13, {}, "spatial axis 3"),
    "LpNormalization default axis (W)": ("o = LpNormalization(c)", 13, {}, "spatial axis 3"),
    "CumSum along H": ("o = CumSum(c, ax)", 13, {"ax": np.array(2, np.int64)}, "spatial axis 2"),
    "InstanceNormalization": ("o = InstanceNormalization(c, s, b)", 13,
                              {"s": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}, "spatial axes [2, 3]"),
    "LayerNormalization axis=1 over C,H,W": ("o = LayerNormalization <axis=1> (c, s)", 17,
                                              {"s": np.ones((4, 12, 12), np.float32)}, "spatial axes [2, 3]"),
    "ReduceMean over W keepdims": ("m = ReduceMean <axes=[3]> (c)\n o = Sub(c, m)", 13, {}, "spatial axis 3"),
    "positional constant": ("o = Add(c, pos)", 13, {"pos": np.ones((1, 4, 12, 12), np.float32)},
                            "varies along spatial axis"),
    "Resize": ("o = Resize(c, roi, sc)", 13, {"roi": np.zeros(0, np.float32),
                                              "sc": np.array([1, 1, 1, 1], np.float32)}, "not known to act per position"),
    "Einsum": ('o = Einsum <equation="nchw->nchw"> (c)', 13, {}, "not known to act per position"),
    "GlobalAveragePool (squeeze-excitation)": ("s = GlobalAveragePool(c)\n o = Mul(c, s)", 13, {},
                                               "--keep-global-pools"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_position_mixing_trunk_op_is_refused(name):
    lines, opset, consts, words = REFUSED[name]
    model = trunk_model(lines, opset, extra_inputs=consts)
    assert convert(model).converted == 1  # keep mode does not care
    op = lines.split("=", 1)[1].split("(")[0].split("<")[0].strip() if "\n" not in lines else None
    with pytest.raises(Fc2ConvError) as exc:
        convert(model, dense=True)
    message = str(exc.value)
    assert "in the trunk" in message and words in message and "cannot be made dense" in message, message
    if op:
        assert f"{op} '" in message, message
    assert inspect(model).dense_reason == message


def test_custom_domain_op_is_refused():
    model = trunk_model("o = com.example.Mystery(c)", 13, domains=', "com.example" : 1')
    # exporters annotate what inference cannot know: the custom op's output
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, ["N", 4, 12, 12]))
    with pytest.raises(Fc2ConvError, match="Mystery 'o' in the trunk is a custom op .*com.example:Mystery"):
        convert(model, dense=True)


ACCEPTED = {
    "BatchNormalization": ("o = BatchNormalization(c, s, b, m, v)", 13,
                           {"s": w(4) + 1, "b": w(4), "m": w(4), "v": np.abs(w(4)) + 1}),
    "per-channel constant": ("a = Mul(c, k)\n o = Add(a, k)", 13, {"k": w(4, 1, 1)}),
    "activations": ("a = Sigmoid(c)\n b2 = HardSwish(a)\n o = LeakyRelu <alpha=0.1> (b2)", 14, {}),
    "Softmax axis=1 opset 13": ("o = Softmax <axis=1> (c)", 13, {}),
    "LogSoftmax axis=1 opset 13": ("o = LogSoftmax <axis=1> (c)", 13, {}),
    "LpNormalization axis=1": ("o = LpNormalization <axis=1> (c)", 13, {}),
    "MVN over channels": ("o = MeanVarianceNormalization <axes=[1]> (c)", 12, {}),
    "CumSum along channels": ("o = CumSum(c, ax)", 13, {"ax": np.array(1, np.int64)}),
    "LRN": ("o = LRN <size=3> (c)", 13, {}),
    "ReduceMean over channels": ("m = ReduceMean <axes=[1]> (c)\n o = Sub(c, m)", 13, {}),
    "channel LayerNorm (ConvNeXt)": ("t = Transpose <perm=[0,2,3,1]> (c)\n n = LayerNormalization <axis=-1> (t, s, b)\n"
                                     " o = Transpose <perm=[0,3,1,2]> (n)", 17,
                                     {"s": w(4) + 1, "b": w(4)}),
    "Linear over channels-last (ConvNeXt MLP)": ("t = Transpose <perm=[0,2,3,1]> (c)\n l = MatMul(t, lw)\n"
                                                 " g2 = Gelu(l)\n l2 = MatMul(g2, lw2)\n"
                                                 " o = Transpose <perm=[0,3,1,2]> (l2)", 20,
                                                 {"lw": w(4, 8), "lw2": w(8, 4)}),
    "Split and Concat along channels": ("a, b2 = Split <axis=1, num_outputs=2> (c)\n"
                                        " o = Concat <axis=1> (b2, a)", 18, {}),
    "Slice along channels": ("a = Slice(c, st, en, axs)\n b2 = Slice(c, en, en2, axs)\n"
                             " o = Concat <axis=1> (b2, a)", 13,
                             {"st": np.array([0], np.int64), "en": np.array([2], np.int64),
                              "en2": np.array([4], np.int64), "axs": np.array([1], np.int64)}),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_per_position_trunk_op_converts_and_checks(name):
    lines, opset, consts = ACCEPTED[name]
    model = trunk_model(lines, opset, extra_inputs=consts)
    result = convert(model, dense=True)
    report = check(model, result.model, dense=True)
    assert report, "\n".join(report.lines())
    shifts = [o for o in report.outputs if "@shift" in o.name]
    assert len(shifts) == 2 and all(o.passed for o in shifts), report.lines()
    assert not any("NOTE" in n for n in report.notes)


def _chain(blocks: int, residual: bool) -> onnx.ModelProto:
    """A deep trunk: Conv 3x3 + Relu blocks (each added to its input when
    residual), then MaxPool, Flatten, Gemm."""
    lines = ["h0 = Identity(x)"]
    inits = {}
    for i in range(blocks):
        inits[f"k{i}"] = w(2, 2, 3, 3, scale=0.2)
        lines.append(f"c{i} = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (h{i}, k{i})")
        lines.append(f"r{i} = Relu(c{i})")
        lines.append(f"h{i + 1} = Add(h{i}, r{i})" if residual else f"h{i + 1} = Identity(r{i})")
    lines += [f"p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (h{blocks})", "f = Flatten(p)",
              "y = Gemm <transB=1> (f, fw)"]
    inits["fw"] = w(3, 2 * 16)
    body = "\n          ".join(lines)
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1,2,8,8] x) => (float[1,3] y) {{
          {body}
        }}""", **inits)


@pytest.mark.parametrize("blocks, residual", [(1000, False), (300, True)])
def test_deep_trunks_inspect_and_convert(blocks, residual):
    """The geometry is one forward pass: no recursion limit."""
    model = _chain(blocks, residual)
    found = inspect(model)
    assert found.dense_reason is None and found.geometry
    axis = found.geometry[0]["axes"][0]
    assert axis["stride"] == 2 and axis["offset"] == -blocks
    result = convert(model, dense=True)
    feeds = {"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feeds)[0].reshape(1, 3), run(model, feeds)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mobilenet_v3_small_w05_ts.onnx", "efficientnet_style_se_ts.onnx"])
def test_squeeze_excitation_with_keep_global_pools(name):
    path = FIXTURES / name
    with pytest.raises(Fc2ConvError, match="GlobalAveragePool '.*' in the trunk pools over all positions"):
        convert(path, dense=True)
    result = convert(path, dense=True, keep_global_pools=True)
    report = check(path, result.model, dense=True)
    assert report, "\n".join(report.lines())
    assert sum("windows" in o.name for o in report.outputs) >= 2
    assert not any("@shift" in o.name for o in report.outputs)
    assert any("does not apply" in n and "GlobalAveragePool" in n for n in report.notes)
    assert inspect(path, keep_global_pools=True).geometry


def _caffe_head(opset=9):
    """The model zoo's inception_v1 head: AveragePool k7, pads [0,0,1,1],
    count_include_pad=0 on a 6x6 map is a global average."""
    return parse(f"""
        <ir_version: 4, opset_import: ["" : {opset}]>
        g (float[1,3,12,12] x) => (float[1,5] y) {{
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1], strides=[2,2]> (x, cw)
          p = AveragePool <kernel_shape=[7,7], pads=[0,0,1,1], strides=[1,1]> (c)
          f = Reshape(p, shp)
          y = Gemm <transB=1> (f, fw, fb)
        }}""", cw=w(4, 3, 3, 3), shp=np.array([1, -1], np.int64), fw=w(5, 4), fb=w(5))


def test_caffe_covering_average_pool_head():
    model = _caffe_head()
    keep = convert(model)
    assert keep.converted == 1
    assert check(model, keep.model)
    dense = convert(model, dense=True)
    assert [a["window"] for a in dense.geometry[0]["axes"]] == [6, 6]
    report = check(model, dense.model, dense=True)
    assert report, "\n".join(report.lines())


def test_covering_pool_counting_its_pads_is_refused():
    model = _caffe_head()
    pool = next(n for n in model.graph.node if n.op_type == "AveragePool")
    pool.attribute.append(onnx.helper.make_attribute("count_include_pad", 1))
    with pytest.raises(Fc2ConvError, match="does not cover its whole map"):
        convert(model, dense=True)


def test_dense_with_no_fc_converted_is_refused(tmp_path):
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[6,2] x) => (float[2,3] y) {
          y = Gemm <transA=1, transB=1> (x, wt)
        }""", wt=w(3, 6))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv", "convert", str(path), "-o", str(tmp_path / "o.onnx"),
                        "--dense"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "none of the 1 FC layer converts" in r.stderr and "transA=1" in r.stderr
    assert not (tmp_path / "o.onnx").exists()
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv", "inspect", str(path), "--json"],
                       capture_output=True, text=True)
    dense = json.loads(r.stdout)["dense"]
    assert dense["possible"] is False and "transA=1" in dense["reason"]
