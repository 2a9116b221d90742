"""Dense mode: every head becomes a score map whose positions equal the
original head on the trunk map's windows (proved by ``check(dense=True)``,
which runs the ORIGINAL's trunk and head halves in onnxruntime), geometry
against hand-computed values, and the refusals with their reasons."""

import numpy as np
import onnx
import pytest

from builders import head_model
from helpers import assert_converts, ops, parse
from onnx_fc2conv import Fc2ConvError, check, convert, inspect

rng = np.random.default_rng(0)


def w(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_dense(model, input_shapes=None, spatial=2):
    result = convert(model, dense=True, input_shapes=input_shapes)
    onnx.checker.check_model(result.model, full_check=True)
    assert not {"Gemm", "MatMul", "Flatten", "GlobalAveragePool", "GlobalMaxPool"} & set(ops(result.model))
    report = check(model, result.model, dense=True, input_shapes=input_shapes)
    assert report, "\n".join(report.lines())
    labels = [o.name for o in report.outputs]
    assert any("@native" in label for label in labels) and sum("windows" in label for label in labels) >= 1
    for out in result.model.graph.output:
        dims = out.type.tensor_type.shape.dim
        assert len(dims) >= 2 + spatial - (1 if "argmax" in out.name else 0)
    return result, report


@pytest.mark.parametrize("feature_shape", [(4, 3, 3), (2, 5, 3), (3, 7), (2, 3, 4, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("collapse", ["flatten", "reshape_shape_chain", "reshape_-1_K", "reshape_1_-1"])
def test_dense_hand_built_heads(feature_shape, collapse):
    batch = 1 if collapse == "reshape_1_-1" else "N"
    model = head_model(feature_shape=feature_shape, collapse=collapse, batch=batch,
                       chain=("Relu", "Dropout", "AddPerFeature"), softmax=True, fc="gemm_alpha_beta")
    result, _ = assert_dense(model, spatial=len(feature_shape) - 1)
    x = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in x[2:]] == {1: ["length"], 2: ["height", "width"], 3: ["depth", "height", "width"]}[
        len(feature_shape) - 1]
    assert (x[0].dim_value == 1) if batch == 1 else (x[0].dim_param == "N")


@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_every_opset_acts_on_the_class_axis(opset):
    model = head_model(feature_shape=(3, 4, 4), opset=opset, softmax=True)
    result, _ = assert_dense(model)
    if opset < 13:
        assert ops(result.model)[-3:] == ["Transpose", "Softmax", "Transpose"]


POOL_HEADS = {
    "GlobalAveragePool+Flatten": "p = GlobalAveragePool(f)\n f2 = Flatten(p)\n y = Gemm <transB=1> (f2, w, b)",
    "GlobalMaxPool+Flatten": "p = GlobalMaxPool(f)\n f2 = Flatten(p)\n y = Gemm <transB=1> (f2, w, b)",
    "ReduceMean(keepdims=0)+MatMul+Add":
        "p = ReduceMean <keepdims=0> (f, axes)\n mm = MatMul(p, wt)\n y = Add(mm, b)",
    "ReduceMean(keepdims=1)+Reshape":
        "p = ReduceMean <keepdims=1> (f, axes)\n f2 = Reshape(p, shp)\n y = Gemm <transB=1> (f2, w, b)",
    "AveragePool covering+Flatten":
        "p = AveragePool <kernel_shape=[5,6], strides=[5,6]> (f)\n f2 = Flatten(p)\n y = Gemm <transB=1> (f2, w, b)",
    "GlobalAveragePool+Squeeze":
        "p = GlobalAveragePool(f)\n f2 = Squeeze(p, sq)\n y = Gemm <transB=1> (f2, w, b)",
}


@pytest.mark.parametrize("name", list(POOL_HEADS))
def test_global_pool_heads(name):
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N,3,5,6] x) => (float[N,4] z) {{
          f = Conv <kernel_shape=[1,1]> (x, cw)
          {POOL_HEADS[name]}
          z = Softmax <axis=-1> (y)
        }}""", cw=w(6, 3, 1, 1), w=w(4, 6), wt=w(6, 4), b=w(4), axes=np.array([2, 3], np.int64),
               shp=np.array([0, -1], np.int64), sq=np.array([2, 3], np.int64))
    keep = assert_converts(model, convs=1)
    assert keep.layers[0].kernel == [1, 1] and keep.layers[0].pattern.split("+")[0] in name
    result, report = assert_dense(model)
    pool_ops = [n for n in result.model.graph.node if n.op_type in ("AveragePool", "MaxPool")]
    assert len(pool_ops) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pool_ops[0].attribute}
    assert attrs["kernel_shape"] == [5, 6] and attrs["strides"] == [1, 1]
    g = result.geometry[0]["axes"]
    assert [a["receptive_field"] for a in g] == [5, 6] and [a["stride"] for a in g] == [1, 1]


def test_nhwc_tf2onnx_style_head():
    """Keras Flatten after NHWC convs: Transpose(0,2,3,1) -> Reshape -> MatMul -> Add."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,6,5,3] x) => (float[N,4] z) {
          xt = Transpose <perm=[0,3,1,2]> (x)
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (xt, cw)
          r = Relu(c)
          back = Transpose <perm=[0,2,3,1]> (r)
          flat = Reshape(back, shp)
          mm = MatMul(flat, wt)
          y = Add(mm, b)
          z = Softmax(y)
        }""", cw=w(2, 3, 3, 3), shp=np.array([-1, 60], np.int64), wt=w(60, 4), b=w(4))
    layer = inspect(model).layers[0]
    assert layer.layout == "NHWC" and layer.pattern == "Transpose+Reshape"
    result, report = assert_dense(model)
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", "height", "width", 3]
    assert "Transpose" in ops(result.model)[:1] and ops(result.model).count("Transpose") == 1
    g = result.geometry[0]["axes"]
    assert [(a["input_axis"], a["stride"], a["receptive_field"], a["offset"]) for a in g] == [(1, 1, 8, -1), (2, 1, 7, -1)]


def test_argmax_output():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,4,4] x) => (int64[N,1] cls, float[N,5] y) {
          f = Flatten(x)
          y = Gemm <transB=1> (f, w)
          cls = ArgMax <axis=1, keepdims=1> (y)
        }""", w=w(5, 32))
    result, report = assert_dense(model)
    assert len(result.model.graph.output[0].type.tensor_type.shape.dim) == 4


def lenet():
    return parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,1,28,28] x) => (float[N,10] y) {
          c1 = Conv <kernel_shape=[5,5]> (x, w1)
          r1 = Relu(c1)
          p1 = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r1)
          c2 = Conv <kernel_shape=[5,5]> (p1, w2)
          r2 = Relu(c2)
          p2 = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r2)
          f = Flatten(p2)
          h = Gemm <transB=1> (f, w3)
          hr = Relu(h)
          y = Gemm <transB=1> (hr, w4)
        }""", w1=w(2, 1, 5, 5), w2=w(3, 2, 5, 5), w3=w(8, 48, scale=0.1), w4=w(10, 8))


def test_lenet_geometry_and_pixel_crops():
    """No padding: windows are pixel crops at the map's stride, checked too."""
    result, report = assert_dense(lenet())
    g = result.geometry[0]
    assert [(a["stride"], a["receptive_field"], a["offset"]) for a in g["axes"]] == [(4, 28, 0), (4, 28, 0)]
    assert not g["padded"]
    assert any("pixel crops" in o.name and o.passed for o in report.outputs)


def vgg16_geometry_model():
    """VGG16's layout with 1 channel per layer: geometry only depends on it."""
    inits, x, i = {}, "x", 0
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    lines = []
    for v in cfg:
        i += 1
        if v == "M":
            lines.append(f"t{i} = MaxPool <kernel_shape=[2,2], strides=[2,2]> ({x})")
        else:
            inits[f"k{i}"] = w(1, 1, 3, 3)
            lines.append(f"t{i} = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> ({x}, k{i})")
        x = f"t{i}"
    body = "\n".join(lines)
    return parse(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1,1,224,224] x) => (float[1,3] y) {{
          {body}
          f = Flatten({x})
          y = Gemm <transB=1> (f, fw)
        }}""", fw=w(3, 49), **inits)


def test_vgg16_geometry_matches_hand_computation():
    """VGG16: stride 32; pool5 sees 212 pixels, the 7x7 head 212 + 6*32 = 404;
    offset -(2*1 + 2*2 + 3*4 + 3*8 + 3*16) = -90."""
    info = inspect(vgg16_geometry_model())
    assert info.dense_reason is None
    axes = info.geometry[0]["axes"]
    assert [(a["stride"], a["receptive_field"], a["offset"], a["window"]) for a in axes] == [(32, 404, -90, 7)] * 2


# -- refusals ------------------------------------------------------------

def test_squeeze_excitation_in_trunk_is_refused():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,4,4] x) => (float[N,3] y) {
          s = GlobalAveragePool(x)
          a = Sigmoid(s)
          t = Mul(x, a)
          f = Flatten(t)
          y = Gemm <transB=1> (f, w)
        }""", w=w(3, 32))
    with pytest.raises(Fc2ConvError, match="GlobalAveragePool 's' in the trunk pools over all positions.*"
                                           "--keep-global-pools"):
        convert(model, dense=True)
    assert "GlobalAveragePool 's'" in inspect(model).dense_reason
    assert convert(model).heads == 1  # keep mode is fine


def test_op_after_head_mixing_classes_is_refused():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,4,4] x, float[N,3] bias) => (float[N,3] y) {
          f = Flatten(x)
          h = Gemm <transB=1> (f, w)
          y = Add(h, bias)
        }""", w=w(3, 32))
    with pytest.raises(Fc2ConvError, match="Add 'y' after the head combines the scores with another tensor"):
        convert(model, dense=True)


def test_unconverted_fc_is_refused():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,4,4] x, float[N,6] v) => (float[N,3] y, float[N,3] z) {
          f = Flatten(x)
          y = Gemm <transB=1> (f, w)
          z = Gemm <transB=1> (v, w2)
        }""", w=w(3, 32), w2=w(3, 6))
    with pytest.raises(Fc2ConvError, match="FC 'z' is not converted"):
        convert(model, dense=True)


def test_dense_check_detects_a_wrong_model():
    model = lenet()
    other = convert(lenet(), dense=True).model
    bad = onnx.ModelProto()
    bad.CopyFrom(other)
    for t in bad.graph.initializer:
        if t.name.startswith("w4"):
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[0] += 1.0
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    report = check(model, bad, dense=True)
    assert not report and any(not o.passed for o in report.outputs)


def test_caffe2_era_model_ir3_opset8():
    """The model zoo's Caffe2-era files: IR 3 (every initializer is an input),
    opset 8, the Reshape shape an initializer input, Dropout with a mask
    output, Softmax with the old 2-D coercion."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {"cw": w(4, 3, 3, 3), "cb": w(4), "shape": np.array([1, -1], np.int64), "w1": w(16, 4 * 5 * 5),
             "b1": w(16), "w2": w(10, 16), "b2": w(10)}
    nodes = [helper.make_node("Conv", ["data", "cw", "cb"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w1", "b1"], ["fc6"], transB=1),
             helper.make_node("Relu", ["fc6"], ["fc6r"]),
             helper.make_node("Dropout", ["fc6r"], ["fc6d", "mask"], ratio=0.5),
             helper.make_node("Gemm", ["fc6d", "w2", "b2"], ["fc7"], transB=1),
             helper.make_node("Softmax", ["fc7"], ["prob"])]
    graph = helper.make_graph(
        nodes, "caffe2", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 10, 10])] +
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inits.items()],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    onnx.checker.check_model(model)
    keep = assert_converts(model, convs=2, batch=1)
    assert all(layer.converted for layer in keep.layers)
    assert {i.name for i in keep.model.graph.input} >= {"data", "w1", "w2"}  # IR 3: weights listed as inputs
    result, report = assert_dense(model)
    assert ops(result.model)[-3:] == ["Transpose", "Softmax", "Transpose"]


def test_dense_on_a_model_without_fc_is_the_model_unchanged(tmp_path):
    """SqueezeNet-like: convolutions and a global pool, no FC."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,8,8] x) => (float[N,4] y) {
          c = Conv <kernel_shape=[1,1]> (x, cw)
          p = GlobalAveragePool(c)
          y = Flatten(p)
        }""", cw=w(4, 3, 1, 1))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    from onnx_fc2conv import cli
    assert cli.main(["convert", str(path), "-o", str(tmp_path / "d.onnx"), "--dense", "--check", "-q"]) == 0
    assert onnx.load(tmp_path / "d.onnx").graph.node[1].op_type == "GlobalAveragePool"
    assert check(path, tmp_path / "d.onnx", dense=True)


def test_dense_check_refuses_inputs(tmp_path):
    model = lenet()
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(Fc2ConvError, match="--inputs is not used by the dense check"):
        check(model, convert(model, dense=True).model, dense=True, inputs=tmp_path / "in.npz")


def test_channel_shuffle_in_the_trunk():
    """ShuffleNet's channel shuffle pins H, W in a constant Reshape: dense
    mode takes them from Shape(x); a Reshape that merges H and W is refused."""
    body = """
          c = Conv <kernel_shape=[1,1]> (x, cw)
          g = Reshape(c, s5)
          t = Transpose <perm=[0,2,1,3,4]> (g)
          f = Reshape(t, s4)
          c2 = Conv <kernel_shape=[1,1]> (f, cw2)
          flat = Flatten(c2)
          y = Gemm <transB=1> (flat, w)"""
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,4,5] x) => (float[N,6] y) {{ {body} }}""",
                  cw=w(4, 3, 1, 1), s5=np.array([-1, 2, 2, 4, 5], np.int64), s4=np.array([-1, 4, 4, 5], np.int64),
                  cw2=w(4, 4, 1, 1), w=w(6, 80))
    result, report = assert_dense(model)
    assert ops(result.model).count("Shape") == 2
    merged = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,4,5] x) => (float[N,6] y) {
          c = Conv <kernel_shape=[1,1]> (x, cw)
          m = Reshape(c, s3)
          c1 = Conv <kernel_shape=[1]> (m, cw1)
          flat = Flatten(c1)
          y = Gemm <transB=1> (flat, w)
        }""", cw=w(4, 3, 1, 1), s3=np.array([-1, 4, 20], np.int64), cw1=w(4, 4, 1), w=w(6, 80))
    with pytest.raises(Fc2ConvError, match="Reshape 'm' in the trunk reshapes spatial axes"):
        convert(merged, dense=True)


def test_residual_from_the_input_keeps_its_geometry():
    """``Add(Relu(Conv(x)), x)`` with 4 channels in and out: the input's
    channel axis flows through the Add into the map's channel axis, which is
    no spatial axis; the block is per position with a 3x3 receptive field."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4,6,6] x) => (float[N,3] y) {
          c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, cw)
          r = Relu(c)
          s = Add(r, x)
          f = Flatten(s)
          y = Gemm <transB=1> (f, fw, fb)
        }""", cw=w(4, 4, 3, 3), fw=w(3, 144, scale=0.05), fb=w(3))
    model.graph.node[0].name = "blk0_conv"
    result, _ = assert_dense(model)
    (g,) = result.maps
    assert [(a.stride, a.receptive_field, a.offset, a.window) for a in g.axes] == [(1, 8, -1, 6)] * 2
    assert inspect(model).dense_reason is None



def pnet(opset: int = 13):
    """MTCNN's P-Net, as its exports write it: no FC, the input fixed at 12x12,
    Conv/PReLU/MaxPool(ceil_mode) and two 1x1 Conv heads, the face
    probability a Softmax over the channels (2) and the box offsets (4)."""
    return parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[N,3,12,12] x) => (float[N,2,1,1] prob, float[N,4,1,1] box) {{
          c1 = Conv <kernel_shape=[3,3]> (x, w1, b1)
          a1 = PRelu(c1, s1)
          p1 = MaxPool <kernel_shape=[2,2], strides=[2,2], ceil_mode=1> (a1)
          c2 = Conv <kernel_shape=[3,3]> (p1, w2, b2)
          a2 = PRelu(c2, s2)
          c3 = Conv <kernel_shape=[3,3]> (a2, w3, b3)
          a3 = PRelu(c3, s3)
          l1 = Conv <kernel_shape=[1,1]> (a3, w41, b41)
          prob = Softmax <axis=1> (l1)
          box = Conv <kernel_shape=[1,1]> (a3, w42, b42)
        }}""", w1=w(10, 3, 3, 3), b1=w(10), s1=w(10, 1, 1), w2=w(16, 10, 3, 3, scale=0.2), b2=w(16),
        s2=w(16, 1, 1), w3=w(32, 16, 3, 3, scale=0.15), b3=w(32), s3=w(32, 1, 1), w41=w(2, 32, 1, 1),
        b41=w(2), w42=w(4, 32, 1, 1), b42=w(4))


def test_fully_convolutional_model_with_a_fixed_input_is_freed():
    """convert --dense on P-Net frees the spatial dims and reports the
    geometry; the dense model equals the original at 12x12 and, on a
    126x126 image, the original on every window the geometry names."""
    from helpers import run

    model = pnet()
    result = convert(model, dense=True)
    assert result.changed and result.heads == 0
    onnx.checker.check_model(result.model, full_check=True)
    x_dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in x_dims[2:]] == ["height", "width"]
    (g,) = result.maps
    assert g.outputs == ("prob", "box")
    # by hand: conv3 (rf 3) -> pool 2/2 (rf 4, stride 2) -> conv3 (rf 8) -> conv3 (rf 12); no padding
    assert [(a.stride, a.receptive_field, a.offset) for a in g.axes] == [(2, 12, 0)] * 2
    assert inspect(model).to_dict()["dense"]["geometry"] == result.geometry

    x12 = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    for e, a in zip(run(model, {"x": x12}), run(result.model, {"x": x12})):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)

    big = rng.standard_normal((1, 3, 126, 126)).astype(np.float32)
    prob, box = run(result.model, {"x": big})
    (sy, ry, oy), (sx, rx, ox) = [(a.stride, a.receptive_field, a.offset) for a in g.axes]
    h, w_ = prob.shape[2:]
    assert (h, w_) == ((126 - ry) // sy + 1, (126 - rx) // sx + 1) == box.shape[2:]
    crops = np.stack([big[0, :, oy + i * sy:oy + i * sy + ry, ox + j * sx:ox + j * sx + rx]
                      for i in range(h) for j in range(w_)])
    e_prob, e_box = run(model, {"x": crops})
    np.testing.assert_allclose(prob[0].transpose(1, 2, 0).reshape(-1, 2), e_prob.reshape(-1, 2), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(box[0].transpose(1, 2, 0).reshape(-1, 4), e_box.reshape(-1, 4), rtol=1e-5,
                               atol=1e-5)


def test_fully_convolutional_model_with_a_mixing_trunk_stays_fixed(caplog):
    """Softmax over the channels below opset 13 flattens C, H and W: not per
    position, so the size stays fixed (and the log says why)."""
    model = pnet(opset=11)
    result = convert(model, dense=True)
    assert not result.changed and result.geometry == []
    assert result.model.graph.input[0].type.tensor_type.shape.dim[2].dim_value == 12
    assert "stays fixed" in caplog.text and "Softmax" in caplog.text


def test_cli_convert_dense_frees_a_fixed_fully_convolutional_model(tmp_path, capsys):
    from onnx_fc2conv import cli

    path = tmp_path / "pnet.onnx"
    onnx.save(pnet(), path)
    assert cli.main(["convert", str(path), "-o", str(tmp_path / "d.onnx"), "--dense", "--check"]) == 0
    out = capsys.readouterr().out
    assert "nothing to convert" not in out
    assert "stride 2x2, receptive field 12x12, offset 0x0" in out
    assert onnx.load(tmp_path / "d.onnx").graph.input[0].type.tensor_type.shape.dim[2].dim_param == "height"


def test_the_freed_model_check_fails_on_a_model_that_mixes_positions():
    """A model equal to P-Net at 12x12 (its last map is 1x1 there, so
    ``a3 + (a3 - mean(a3))`` is ``a3``) but not on larger inputs: the window
    comparison must fail where the native one passes."""
    from onnx import helper

    from onnx_fc2conv.check import check_convolutional

    model = pnet()
    result = convert(model, dense=True)
    assert check_convolutional(model, result.model, result.maps)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(result.model)
    for node in wrong.graph.node:
        for i, name in enumerate(node.input):
            if name == "a3":
                node.input[i] = "a3w"
    at = next(i for i, n in enumerate(wrong.graph.node) if n.output[0] == "a3") + 1
    for j, node in enumerate([helper.make_node("GlobalAveragePool", ["a3"], ["a3g"]),
                              helper.make_node("Sub", ["a3", "a3g"], ["a3d"]),
                              helper.make_node("Add", ["a3", "a3d"], ["a3w"])]):
        wrong.graph.node.insert(at + j, node)
    report = check_convolutional(model, wrong, result.maps)
    assert not report
    assert all(o.passed for o in report.outputs if "@native" in o.name)
    assert any(not o.passed for o in report.outputs if "windows" in o.name)


def test_heatmap_on_a_fixed_fully_convolutional_model(tmp_path, capsys):
    """P-Net's heatmap on a 126x126 image: the freed model's 58x58 map
    (stride 2, 12-px windows), no longer a refusal at the fixed 12x12 size."""
    from PIL import Image

    from onnx_fc2conv import cli

    onnx.save(pnet(), tmp_path / "pnet.onnx")
    Image.fromarray((rng.random((126, 126, 3)) * 255).astype(np.uint8)).save(tmp_path / "img.png")
    assert cli.main(["heatmap", str(tmp_path / "pnet.onnx"), str(tmp_path / "img.png"),
                     "-o", str(tmp_path / "h.png")]) == 0
    assert "map 58x58 of 2 classes (stride 2, window 12 px)" in capsys.readouterr().out
