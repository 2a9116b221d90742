"""The dense check's windows and pixel crops come from the geometry, not the
native size (issue 19): trunks with ceil-mode pools (MTCNN's R-Net and O-Net:
the classifier's own input pools a partial window at its border, while a map
position sees one more pixel), native sizes a stride does not divide, 1-D,
2-D and 3-D. Each model is built by hand; the dense model made without the
check is first proved equal to the ORIGINAL on every geometric window here,
with onnxruntime and nothing of the check; then the check must pass (with a
NOTE giving the native-size figure where that differs by construction), and
fail on a dense model broken by hand.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fc2conv import check, cli, convert


def ceil_net(rank: int, native: int, layers, channels: int = 3, classes: int = 2, seed: int = 0,
             batch="N", boxes: bool = False, ceil: int = 1) -> onnx.ModelProto:
    """x [batch, C, native^rank] -> (Conv k + PRelu | MaxPool k s ceil_mode=1)... (Relu after the last Conv)
    -> Flatten -> Gemm 32 -> PRelu -> Gemm classes -> Softmax "prob" (and a
    Gemm 4 -> "box" when ``boxes``). ``layers``: ("conv", k, cout) or
    ("pool", k, s) items."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    x, c, size = "x", channels, native
    for i, layer in enumerate(layers):
        if layer[0] == "conv":
            _, k, cout = layer
            w = const(f"w{i}", rng.standard_normal((cout, c) + (k,) * rank) / np.sqrt(c * k ** rank))
            b = const(f"b{i}", rng.standard_normal(cout) * 0.1)
            nodes.append(helper.make_node("Conv", [x, w, b], [f"c{i}"], name=f"conv{i}", kernel_shape=[k] * rank))
            if i == len(layers) - 1:  # before the Flatten: a PRelu there stops the FC chain today (rules)
                nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
            else:
                slope = const(f"a{i}", np.full((cout,) + (1,) * rank, 0.25))
                nodes.append(helper.make_node("PRelu", [f"c{i}", slope], [f"r{i}"], name=f"prelu{i}"))
            x, c, size = f"r{i}", cout, size - k + 1
        else:
            _, k, s = layer
            nodes.append(helper.make_node("MaxPool", [x], [f"p{i}"], name=f"pool{i}", kernel_shape=[k] * rank,
                                          strides=[s] * rank, ceil_mode=ceil))
            x, size = f"p{i}", (-(-(size - k) // s) if ceil else (size - k) // s) + 1
    feat = c * size ** rank
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", const("fw", rng.standard_normal((32, feat)) / np.sqrt(feat)),
                                          const("fb", rng.standard_normal(32) * 0.1)], ["f"], name="fc", transB=1))
    nodes.append(helper.make_node("PRelu", ["f", const("fa", np.full(32, 0.25))], ["fr"], name="fc_prelu"))
    nodes.append(helper.make_node("Gemm", ["fr", const("cw", rng.standard_normal((classes, 32)) / 4),
                                           const("cb", np.zeros(classes))], ["logits"], name="cls", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1))
    outputs = [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [batch, classes])]
    if boxes:
        nodes.append(helper.make_node("Gemm", ["fr", const("bw", rng.standard_normal((4, 32)) / 4),
                                               const("bb", np.zeros(4))], ["box"], name="box", transB=1))
        outputs.append(helper.make_tensor_value_info("box", TensorProto.FLOAT, [batch, 4]))
    graph = helper.make_graph(nodes, "ceil_net", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [batch, channels] + [native] * rank)], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


# R-Net: 24x24, conv3 28, pool3 s2 ceil, conv3 48, pool3 s2 ceil, conv2 64: stride 4, a position sees 25 px
RNET = [("conv", 3, 8), ("pool", 3, 2), ("conv", 3, 12), ("pool", 3, 2), ("conv", 2, 16)]
# O-Net: 48x48 with a third ceil-mode pool: a position sees 49 px
ONET = [("conv", 3, 4), ("pool", 3, 2), ("conv", 3, 8), ("pool", 3, 2), ("conv", 3, 8), ("pool", 2, 2),
        ("conv", 2, 8)]
CASES = {
    "rnet_2d": (2, 24, RNET),
    "onet_2d": (2, 48, ONET),
    "rnet_1d": (1, 24, RNET),
    "rnet_3d": (3, 24, [("conv", 3, 4), ("pool", 3, 2), ("conv", 3, 4), ("pool", 3, 2), ("conv", 2, 4)]),
    # stride 4 does not divide 26; ceil-mode pools take partial windows at 26 too
    "stride_not_dividing": (2, 26, RNET),
    # floor-mode pools: 27 px in, a position sees 25 (the last 2 px are dropped)
    "floor_27": (2, 27, RNET, 0),
}


def free_spatial(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ORIGINAL with its input's spatial dims free (the same graph and weights)."""
    free = onnx.ModelProto()
    free.CopyFrom(model)
    for d in free.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_param = "s"
    return free


def session(model):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def windows_vs_original(model, result, extra_strides: int = 3):
    """Every position of the dense map on an input of native + k strides
    against the original run on the pixels that position sees (its receptive
    field, from the geometry): (max abs difference, positions compared)."""
    axes = result.maps[0].axes
    rank = len(axes)
    native = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    x = np.random.default_rng(1).standard_normal(
        [1, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value]
        + [native + extra_strides * a.stride for a in axes]).astype(np.float32)
    dense = session(result.model).run(None, {"x": x})
    orig = session(free_spatial(model))
    worst, count = 0.0, 0
    grid = dense[0].shape[2:]
    for pos in itertools.product(*[range(g) for g in grid]):
        starts = [a.offset + p * a.stride for a, p in zip(axes, pos)]
        if any(s < 0 or s + a.receptive_field > x.shape[2 + k] for k, (s, a) in enumerate(zip(starts, axes))):
            continue
        crop = x[(slice(None), slice(None)) + tuple(slice(s, s + a.receptive_field) for s, a in zip(starts, axes))]
        expected = orig.run(None, {"x": np.ascontiguousarray(crop)})
        for e, d in zip(expected, dense):
            worst = max(worst, float(np.abs(d[(Ellipsis,) + pos] - e).max()))
        count += 1
    assert rank == len(grid)
    return worst, count


@pytest.mark.parametrize("name", list(CASES))
def test_dense_model_equals_the_original_on_every_geometric_window(name):
    rank, native, layers, *ceil = CASES[name]
    model = ceil_net(rank, native, layers, ceil=ceil[0] if ceil else 1)
    result = convert(model, dense=True)
    rf = [a.receptive_field for a in result.maps[0].axes]
    worst, count = windows_vs_original(model, result)
    assert count >= 2 ** rank and worst <= 1e-5, (name, rf, worst, count)


@pytest.mark.parametrize("name", list(CASES))
def test_the_check_passes_with_a_note_where_the_native_crop_differs(name):
    rank, native, layers, *ceil = CASES[name]
    model = ceil_net(rank, native, layers, ceil=ceil[0] if ceil else 1)
    result = convert(model, dense=True)
    rf = result.maps[0].axes[0].receptive_field
    report = check(model, result.model, dense=True)
    text = "\n".join(report.lines())
    assert report.ok, text
    assert any("pixel crops" in o.name for o in report.outputs), text
    notes = [n for n in report.notes if "native-size crops" in n]
    if rf > native:   # the classifier pools a partial window on its own input
        assert notes and all(f"sees {'x'.join([str(rf)] * rank)} px" in n and "max abs" in n for n in notes), text
        figure = float(notes[0].split("max abs ")[1].split()[0])
        assert figure > 1e-4, text   # it does differ: that is why it is a note, not a verdict
    else:
        assert not notes, text


def test_rnet_window_is_25_px():
    result = convert(ceil_net(2, 24, RNET), dense=True)
    assert [(a.stride, a.receptive_field, a.offset) for a in result.maps[0].axes] == [(4, 25, 0)] * 2


@pytest.mark.parametrize("name", ["rnet_2d", "onet_2d", "rnet_1d"])
def test_the_check_still_fails_on_a_broken_dense_model(name):
    rank, native, layers, *ceil = CASES[name]
    model = ceil_net(rank, native, layers, ceil=ceil[0] if ceil else 1)
    broken = convert(model, dense=True).model
    w = next(t for t in broken.graph.initializer if t.name == "w2")   # a trunk Conv: both heads see it
    value = numpy_helper.to_array(w).copy()
    value.reshape(-1)[0] += 0.5
    w.CopyFrom(numpy_helper.from_array(value, "w2"))
    report = check(model, broken, dense=True)
    assert not report.ok and any("FAILED" in line and "@native" in line for line in report.lines())


def test_cli_convert_dense_check_passes_with_the_note(tmp_path, capsys):
    src, out = tmp_path / "rnet.onnx", tmp_path / "rnet_dense.onnx"
    onnx.save(ceil_net(2, 24, RNET), src)
    assert cli.main(["convert", str(src), "-o", str(out), "--dense", "--check"]) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and "NOTE" in text and "sees 25x25 px" in text and out.exists()


def paddle_style(path) -> None:
    """rapidocr's text-direction classifier in small: paddle2onnx declares the
    batch as -1, a squeeze-excitation pool in the trunk, a global pool head."""
    rng = np.random.default_rng(0)
    inits = []

    def c(name, v):
        inits.append(numpy_helper.from_array(np.asarray(v, np.float32), name))
        return name

    nodes = [
        helper.make_node("Conv", ["x", c("w0", rng.standard_normal((8, 3, 3, 3)) * 0.3), c("b0", np.zeros(8))], ["c0"],
                         name="conv0", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("GlobalAveragePool", ["r0"], ["se"], name="se_pool"),
        helper.make_node("Conv", ["se", c("w1", rng.standard_normal((8, 8, 1, 1)) * 0.3)], ["se1"], name="se_conv",
                         kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["se1"], ["se2"], name="se_sig"),
        helper.make_node("Mul", ["r0", "se2"], ["m0"], name="se_mul"),
        helper.make_node("Conv", ["m0", c("w2", rng.standard_normal((16, 8, 3, 3)) * 0.3)], ["c2"], name="conv2",
                         kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["pool2d_9.tmp_0"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["pool2d_9.tmp_0"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", c("fw", rng.standard_normal((2, 16)) * 0.3), c("fb", np.zeros(2))], ["l"],
                         name="fc", transB=1),
        helper.make_node("Softmax", ["l"], ["prob"], name="sm", axis=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 48, 192])
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 2])
    for v in (x, y):
        v.type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(helper.make_model(helper.make_graph(nodes, "cls", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 11)]), path)


def test_batch_declared_minus_one_with_a_given_batch(tmp_path, capsys):
    """The head session was built for the batch of --input-shape (1) and fed
    batch 2: the check feeds the given batch, and the head's batch is free."""
    src, out = tmp_path / "cls.onnx", tmp_path / "cls_dense.onnx"
    paddle_style(src)
    code = cli.main(["convert", str(src), "-o", str(out), "--dense", "--keep-global-pools", "--check",
                     "--input-shape", "x=1,3,48,192"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "check dense" in captured.out and "windows" in captured.out and out.exists()


def test_an_internal_failure_of_the_check_is_one_line_naming_the_step(tmp_path, capsys, monkeypatch):
    from onnx_fc2conv.check import dense as dense_check

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(dense_check, "_run_head", broken)
    src, out = tmp_path / "rnet.onnx", tmp_path / "rnet_dense.onnx"
    onnx.save(ceil_net(2, 24, RNET), src)
    code = cli.main(["convert", str(src), "-o", str(out), "--dense", "--check"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "dense check failed in its head step" in err and "Traceback" not in err, err
