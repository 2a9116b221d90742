"""Models written by real exporters (tests/fixtures, made by
tools/fixtures/): every FC converts, the original and the converted
model agree in onnxruntime, the I/O signature is unchanged; dense mode holds
where it applies and is refused, naming the node, where the trunk mixes
positions."""

from pathlib import Path

import onnx
import pytest

from helpers import ops, signature
from onnx_fc2conv import Fc2ConvError, check, convert, inspect
from onnx_fc2conv.shapes import strict_problem

FIXTURES = Path(__file__).parent / "fixtures"

# file: (FC count, pattern of the first FC, layout, map it consumes, dense refusal or None)
EXPECTED = {
    "alexnet_narrow_ts.onnx": (3, "Flatten", "NCHW", [1, 16, 3, 3], None),
    "alexnet_view_dynbatch_ts.onnx": (3, "Reshape(shape chain)", "NCHW", ["batch", 16, 3, 3], None),
    "alexnet_narrow_dynamo.onnx": (3, "Reshape", "NCHW", ["batch", 16, 3, 3], None),
    "vgg_narrow_dynbatch_op13_ts.onnx": (3, "Flatten", "NCHW", ["batch", 16, 4, 4], None),
    "vgg_narrow_dynamo.onnx": (3, "Reshape", "NCHW", ["batch", 16, 4, 4], None),
    "vgg_narrow_fp16_ts.onnx": (3, "Flatten", "NCHW", [1, 16, 4, 4], None),
    "conv1d_net_dynbatch_ts.onnx": (2, "Flatten", "NCL", ["batch", 16, 16], None),
    "shufflenet_v2_x0_5_ts.onnx": (1, "ReduceMean(keepdims=0)", "NCHW", [1, 1024, 1, 1], None),
    "shufflenet_v2_x0_5_dynamo.onnx": (1, "ReduceMean(keepdims=0)", "NCHW", None, None),
    "mnasnet0_5_dynbatch_ts.onnx": (1, "ReduceMean(keepdims=0)", "NCHW", ["batch", 1280, 1, 1], None),
    "mobilenet_v3_small_w05_ts.onnx": (2, "GlobalAveragePool+Flatten", "NCHW", [1, 288, 1, 1], "GlobalAveragePool"),
    # opset 9: dense mode's channel-shuffle Reshapes must keep their rank for shape inference
    "shufflenet_v2_x0_5_op9_ts.onnx": (1, "ReduceMean(keepdims=0)", "NCHW", [1, 1024, 1, 1], None),
    # squeeze-excitation: the SE block's global pool stands in the trunk
    "efficientnet_style_se_ts.onnx": (1, "GlobalAveragePool+Flatten", "NCHW", [1, 256, 1, 1], "GlobalAveragePool"),
    # paddle2onnx, free batch written as the number -1 (an unknown dim, whatever it is named)
    "vgg_tiny_paddle.onnx": (2, "Reshape(shape chain)", "NCHW", None, None),
    "keras_flatten_dense_tf2onnx.onnx": (2, "Transpose+Reshape(shape chain)", "NHWC", None, None),
    "keras_flatten_bn_dropout_tf2onnx.onnx": (2, "Transpose+Reshape(shape chain)", "NHWC", None, None),
    "keras_gap_dense_tf2onnx.onnx": (1, "GlobalAveragePool+Squeeze", "NCHW", None, None),
}


def test_every_fixture_is_listed():
    files = sorted(p.name for p in FIXTURES.glob("*.onnx"))
    assert files == sorted(EXPECTED)
    readme = (FIXTURES / "README.md").read_text()
    assert all(f in readme for f in files)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_names_the_pattern(name):
    fcs, pattern, layout, shape, _ = EXPECTED[name]
    layers = inspect(FIXTURES / name).layers
    assert len(layers) == fcs and all(layer.converted for layer in layers)
    assert layers[0].pattern == pattern and layers[0].layout == layout
    if shape is not None:
        assert layers[0].input_shape == shape


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_keep_mode_converts_and_passes(name):
    path = FIXTURES / name
    original = onnx.load(path)
    fcs = EXPECTED[name][0]
    result = convert(path)
    assert result.converted == fcs and result.heads == 1
    assert strict_problem(result.model) is None  # onnx full check + strict inference, as tract/onnx2torch read it
    assert not {"Gemm", "MatMul"} & set(ops(result.model))
    assert ops(result.model).count("Conv") - ops(original).count("Conv") == fcs
    assert signature(result.model) == signature(original)
    dtypes = {t.data_type for t in result.model.graph.initializer if t.data_type in (1, 10, 11, 16)}
    assert dtypes == {t.data_type for t in original.graph.initializer if t.data_type in (1, 10, 11, 16)}
    report = check(path, result.model)
    assert report, "\n".join(report.lines())
    batch = original.graph.input[0].type.tensor_type.shape.dim[0]
    free = batch.dim_param or batch.dim_value < 0   # paddle2onnx's -1 is a free batch too
    assert report.input_shapes[original.graph.input[0].name][0] == (2 if free else batch.dim_value)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e[4] is None))
def test_dense_mode_window_property(name):
    path = FIXTURES / name
    result = convert(path, dense=True)
    assert strict_problem(result.model) is None
    # every Conv input keeps its rank under ONNX shape inference (onnx2torch needs it): below
    # opset 14 it is lost after a Reshape shaped by Shape(x) unless the rewrite declares it
    inferred = onnx.shape_inference.infer_shapes(result.model)
    ranked = {vi.name for vi in [*inferred.graph.value_info, *inferred.graph.input]
              if vi.type.tensor_type.HasField("shape")}
    assert [n.name for n in inferred.graph.node if n.op_type == "Conv" and n.input[0] not in ranked] == []
    report = check(path, result.model, dense=True)
    assert report, "\n".join(report.lines())
    assert any("windows" in o.name for o in report.outputs)
    assert result.geometry and all(a["stride"] >= 1 for a in result.geometry[0]["axes"])
    # nothing left that could pin the native spatial size: value_info only for
    # the rewritten channel-shuffle Reshapes, with symbolic spatial dims (their
    # rank for consumers below opset 14), and those Reshapes take their shape from Shape()
    assert not {"Flatten", "Gemm", "MatMul"} & set(ops(result.model))
    reshaped = {n.output[0] for n in result.model.graph.node if n.op_type == "Reshape"}
    for vi in result.model.graph.value_info:
        assert vi.name in reshaped, vi.name
        assert not any(d.HasField("dim_value") or d.dim_param for d in vi.type.tensor_type.shape.dim[-2:]), vi
    consts = {t.name for t in result.model.graph.initializer} | {
        o for n in result.model.graph.node if n.op_type == "Constant" for o in n.output}
    assert all(n.input[1] not in consts for n in result.model.graph.node if n.op_type == "Reshape")


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e[4] is not None))
def test_dense_mode_refused_with_the_node(name):
    with pytest.raises(Fc2ConvError, match=f"{EXPECTED[name][4]} '.*' in the trunk"):
        convert(FIXTURES / name, dense=True)


def test_external_data_fixture_loads_its_weights(tmp_path):
    """The dynamo export keeps its weights in alexnet_narrow_dynamo.onnx.data."""
    path = FIXTURES / "alexnet_narrow_dynamo.onnx"
    header = onnx.load(path, load_external_data=False)
    external = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "the fixture should keep weights externally"
    result = convert(path)
    from onnx_fc2conv import save
    out = tmp_path / "conv.onnx"
    save(result.model, out)
    assert check(path, out)


def test_nhwc_dense_input_stays_nhwc():
    result = convert(FIXTURES / "keras_flatten_dense_tf2onnx.onnx", dense=True)
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[1:3]] == ["height", "width"] and dims[3].dim_value == 3
    out = result.model.graph.output[0].type.tensor_type.shape.dim
    assert len(out) == 4 and out[1].dim_value == 10
