"""`--dense-stride S`: the à trous rewrite. The fine map at ``i*r + a``
(r = stride / S) must equal the plain dense map of the input shifted by
``a*S`` pixels at ``i``, at every position whose receptive field lies inside
the image: measured here with onnxruntime, independently of the check (check/fine.py)
(which is tested too, including that it fails on a wrong model)."""

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fc2conv import Fc2ConvError, check, convert

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def session(model):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def fine_vs_shifted(source, s, size, seed=0, **kw):
    """Max |fine - plain(shifted)| over the interior positions, and how many there were."""
    plain = convert(source, dense=True, **kw)
    fine = convert(source, dense=True, dense_stride=s, **kw)
    onnx.checker.check_model(fine.model, full_check=True)
    geo = plain.geometry[0]["axes"]
    assert [a["stride"] for a in fine.geometry[0]["axes"]] == [s] * len(geo)
    assert [a["receptive_field"] for a in fine.geometry[0]["axes"]] == [a["receptive_field"] for a in geo]
    assert [a["offset"] for a in fine.geometry[0]["axes"]] == [a["offset"] for a in geo]
    inp = plain.model.graph.input[0]
    dims = [2, inp.type.tensor_type.shape.dim[1].dim_value] + list(size)
    x = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    f = session(fine.model).run(None, {inp.name: x})[0]
    p_sess = session(plain.model)
    k = len(size)
    worst, count = 0.0, 0
    ratios = [a["stride"] // s for a in geo]
    for shift in itertools.product(*[range(r) for r in ratios]):
        xa = np.ascontiguousarray(x[(slice(None), slice(None)) + tuple(slice(a * s, None) for a in shift)])
        p = p_sess.run(None, {inp.name: xa})[0]
        for pos in itertools.product(*[range(n) for n in p.shape[-k:]]):
            inside = all(g["offset"] + i * g["stride"] >= 0 and
                         g["offset"] + i * g["stride"] + g["receptive_field"] <= xa.shape[2 + d]
                         for d, (g, i) in enumerate(zip(geo, pos)))
            if not inside:
                continue
            u = tuple(i * r + a for i, r, a in zip(pos, ratios, shift))
            assert all(ui < n for ui, n in zip(u, f.shape[-k:])), (u, f.shape)
            worst = max(worst, float(np.max(np.abs(f[(Ellipsis,) + u] - p[(Ellipsis,) + pos]))))
            count += 1
    return worst, count, fine


@pytest.mark.parametrize("name, s, size", [
    ("digits", 1, (14, 18)),            # stride 2, no padding
    ("vgg_small", 4, (76, 84)),         # stride 8, every conv padded (offset -14, rf 60)
    ("vgg_small", 2, (76, 84)),
    ("vgg_small", 1, (76, 76)),
    ("conv1d_net", 2, (80,)),           # 1-D, stride 4
    ("conv1d_net", 1, (80,)),
    ("conv3d_net", 2, (18, 20, 22)),    # 3-D, padded
], ids=lambda v: str(v))
def test_fine_map_equals_the_plain_map_of_shifted_inputs(name, s, size):
    worst, count, fine = fine_vs_shifted(MODELS / f"{name}.onnx", s, size)
    assert count >= 4
    assert worst <= 1e-5, worst
    report = check(MODELS / f"{name}.onnx", fine.model, dense=True, dense_stride=s)
    assert report.ok, "\n".join(report.lines())


def test_the_check_fails_on_a_wrong_fine_model():
    """The plain dense model (stride 2) posing as the stride-1 one, and a fine
    model whose head Conv lost its dilation: both must fail."""
    plain = convert(MODELS / "digits.onnx", dense=True)
    report = check(MODELS / "digits.onnx", plain.model, dense=True, dense_stride=1)
    assert not report.ok
    fine = convert(MODELS / "digits.onnx", dense=True, dense_stride=1)
    broken = onnx.ModelProto()
    broken.CopyFrom(fine.model)
    head = [n for n in broken.graph.node if n.op_type == "Conv"][2]   # the window Conv, after the 2 trunk Convs
    for a in head.attribute:
        if a.name == "dilations":
            a.ints[:] = [1, 1]
    report = check(MODELS / "digits.onnx", broken, dense=True, dense_stride=1)
    assert not report.ok and any("FAILED" in line for line in report.lines())


def test_cli_convert_dense_stride_check(tmp_path):
    from onnx_fc2conv import cli

    out = tmp_path / "fine.onnx"
    assert cli.main(["convert", str(MODELS / "vgg_small.onnx"), "-o", str(out), "--dense", "--dense-stride", "2",
                     "--check", "-q"]) == 0
    m = onnx.load(out)
    def ints(name, key):
        node = next(n for n in m.graph.node if n.name == name)
        return list(next((a.ints for a in node.attribute if a.name == key), [1, 1]))

    # strides 2, 2, 2 (pool1..3) -> 2, 1, 1: pool2 reads stride 2 = S and loses its stride;
    # conv5, conv6 and pool3 read stride 4 (dilation 2), the head's window Conv stride 8 (dilation 4)
    assert [ints(p, "strides") for p in ("pool1", "pool2", "pool3")] == [[2, 2], [1, 1], [1, 1]]
    assert [ints(n, "dilations") for n in ("conv4", "pool2", "conv5", "conv6", "pool3", "fc1")] == \
        [[1, 1], [1, 1], [2, 2], [2, 2], [2, 2], [4, 4]]
    assert ints("conv5", "pads") == [2, 2, 2, 2]
    assert cli.main(["convert", str(MODELS / "vgg_small.onnx"), "-o", str(out), "--dense-stride", "2"]) == 2
    assert cli.main(["convert", str(MODELS / "vgg_small.onnx"), "-o", str(out), "--dense", "--dense-stride", "3"]) == 2


# ----------------------------------------------------------- small trunks ---

def trunk(layers, *, opset=13, head="flatten", size=16, channels=3, classes=4, seed=0):
    """x [N, channels, size, size] -> layers -> head -> Gemm -> y [N, classes].
    ``layers``: ("conv", k, stride, pad, extra attrs) / ("maxpool" | "avgpool", k, stride, pad) / ("se",)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, c, n = "x", channels, size

    def init(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    for i, layer in enumerate(layers):
        kind = layer[0]
        out = f"t{i}"
        if kind == "conv":
            _, k, s, p, *extra = layer
            attrs = dict(extra[0]) if extra else {}
            if "auto_pad" not in attrs:
                attrs["pads"] = [p] * 4
            w = init(f"w{i}", rng.standard_normal((8, c, k, k)) / np.sqrt(c * k * k))
            nodes.append(helper.make_node("Conv", [x, w, init(f"b{i}", rng.standard_normal(8) * 0.1)], [f"{out}c"],
                                          name=f"conv{i}", kernel_shape=[k, k], strides=[s, s], **attrs))
            nodes.append(helper.make_node("Relu", [f"{out}c"], [out], name=f"relu{i}"))
            c = 8
            n = (n + 2 * p - k) // s + 1 if "auto_pad" not in attrs else -(-n // s)
        elif kind in ("maxpool", "avgpool"):
            _, k, s, p = layer
            op = "MaxPool" if kind == "maxpool" else "AveragePool"
            nodes.append(helper.make_node(op, [x], [out], name=f"pool{i}", kernel_shape=[k, k], strides=[s, s],
                                          pads=[p] * 4))
            n = (n + 2 * p - k) // s + 1
        elif kind == "se":   # squeeze-excitation: x * sigmoid(conv1x1(GAP(x)))
            w = init(f"w{i}", rng.standard_normal((c, c, 1, 1)) / np.sqrt(c))
            nodes += [helper.make_node("GlobalAveragePool", [x], [f"{out}g"], name=f"gap{i}"),
                      helper.make_node("Conv", [f"{out}g", w], [f"{out}e"], name=f"se{i}", kernel_shape=[1, 1]),
                      helper.make_node("Sigmoid", [f"{out}e"], [f"{out}s"], name=f"sig{i}"),
                      helper.make_node("Mul", [x, f"{out}s"], [out], name=f"mul{i}")]
        x = out
    if head == "gap":
        nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
                  helper.make_node("Flatten", ["gap"], ["flat"], name="flatten")]
        k_in = c
    else:
        nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten"))
        k_in = c * n * n
    w = init("fc_w", rng.standard_normal((classes, k_in)) / np.sqrt(k_in))
    nodes.append(helper.make_node("Gemm", ["flat", w, init("fc_b", np.zeros(classes))], ["y"], name="fc",
                                  transB=1))
    graph = helper.make_graph(nodes, "trunk", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             ["N", channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [13, 19])
def test_average_pool_head_is_dilated(opset):
    """A global-average-pool head becomes an AveragePool window: dilated
    natively from opset 19, as a depthwise Conv of 1/(h*w) weights below."""
    model = trunk([("conv", 3, 1, 1), ("maxpool", 2, 2, 0), ("conv", 3, 1, 1), ("avgpool", 2, 2, 0)], opset=opset,
                  head="gap")
    worst, count, fine = fine_vs_shifted(model, 1, (26, 30))
    assert count >= 20 and worst <= 1e-5, worst
    ops = [n.op_type for n in fine.model.graph.node]
    assert ("AveragePool" in ops) == (opset >= 19)
    assert check(model, fine.model, dense=True, dense_stride=1).ok


def test_strided_conv_and_partial_stride():
    """A strided Conv (stride 2 then pool 2): S = 2 keeps the conv's stride and
    drops the pool's; S = 1 drops both."""
    model = trunk([("conv", 3, 2, 1), ("conv", 3, 1, 1), ("maxpool", 2, 2, 0), ("conv", 3, 1, 0)], size=20)
    for s in (2, 1):
        worst, count, _ = fine_vs_shifted(model, s, (36, 44))
        assert count >= 4 and worst <= 1e-5, (s, worst)


def test_stride_four_pool_partially_removed():
    """One pool of stride 4: S = 2 halves its stride (no earlier layer to take it from)."""
    model = trunk([("conv", 3, 1, 0), ("maxpool", 4, 4, 0), ("conv", 1, 1, 0)], size=18)
    worst, count, fine = fine_vs_shifted(model, 2, (34, 38))
    assert count >= 4 and worst <= 1e-5, worst
    pool = next(n for n in fine.model.graph.node if n.op_type == "MaxPool")
    assert list(next(a.ints for a in pool.attribute if a.name == "strides")) == [2, 2]


@pytest.mark.parametrize("layers, s, kw, needle", [
    ([("conv", 3, 1, 1), ("maxpool", 2, 2, 0)], 3, {}, "does not divide the map's stride 2x2; choose one of 1, 2"),
    ([("conv", 3, 2, 1), ("conv", 3, 3, 0)], 3, {"size": 18},
     "--dense-stride 3 is not expressible: Conv 'conv0' takes the map to stride 2, and 3 is neither a multiple "
     "nor a divisor of 2; choose one of 1, 2, 6"),
    ([("conv", 3, 2, 0, {"auto_pad": "SAME_UPPER"}), ("maxpool", 2, 2, 0)], 1, {},
     "pads by auto_pad=SAME_UPPER with stride 2x2"),
    ([("conv", 3, 1, 1), ("maxpool", 2, 2, 0), ("se",), ("conv", 1, 1, 0)], 1, {"keep": True},
     "GlobalAveragePool 'gap2' pools over all positions after the layers the à trous rewrite changes"),
], ids=["not a divisor", "strides 2 then 3", "SAME padding", "squeeze-excitation"])
def test_refusals(layers, s, kw, needle):
    keep = kw.pop("keep", False)
    model = trunk(layers, **kw)
    with pytest.raises(Fc2ConvError) as exc:
        convert(model, dense=True, dense_stride=s, keep_global_pools=keep)
    assert needle in str(exc.value)


def test_same_padding_before_the_rewritten_layers_is_fine():
    """auto_pad=SAME on a stride-1 conv is written out as explicit pads; on a
    strided conv that keeps its stride it is left alone."""
    model = trunk([("conv", 3, 2, 0, {"auto_pad": "SAME_UPPER"}), ("conv", 3, 1, 0, {"auto_pad": "SAME_UPPER"}),
                   ("maxpool", 2, 2, 0), ("conv", 3, 1, 0, {"auto_pad": "SAME_LOWER"})], size=16)
    worst, count, _ = fine_vs_shifted(model, 2, (40, 44))
    assert count >= 4 and worst <= 1e-5, worst
