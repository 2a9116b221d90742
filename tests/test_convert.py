"""Keep-mode equivalence over a grid of heads: every case is converted, the
FC ops must be gone with Convs in their place, the I/O signature unchanged,
and onnxruntime must give the original's outputs."""

import numpy as np
import onnx
import pytest

from builders import CHAIN_OPS, COLLAPSES, FCS, head_model
from helpers import assert_converts, feeds_for, ops, parse, run
from onnx_fc2conv import Fc2ConvError, check, convert, inspect

MAPS = [(4, 3, 3), (2, 5, 3), (3, 7), (2, 3, 4, 2), (5, 1, 1)]


def _batch_for(collapse, batch):
    if collapse == "reshape_1_-1":
        return 1
    if collapse == "reshape_N_K":
        return 3
    return batch


# Opset 8 (the IR 3 case) has no optional Gemm bias.
GRID = [(c, f) for c in COLLAPSES for f in FCS if not (c == "reshape_input_initializer" and f == "gemm_nobias")]


@pytest.mark.parametrize("collapse,fc", GRID)
def test_fc_variant_by_collapse(collapse, fc):
    batch = _batch_for(collapse, "N")
    assert_converts(head_model(collapse=collapse, fc=fc, batch=batch), convs=2,
                    batch=batch if isinstance(batch, int) else 2)


@pytest.mark.parametrize("batch", [1, 3, "N"])
@pytest.mark.parametrize("feature_shape", MAPS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("collapse", ["flatten", "reshape_0_-1", "reshape_-1_K", "reshape_shape_chain"])
def test_maps_and_batches(collapse, feature_shape, batch):
    model = head_model(feature_shape=feature_shape, collapse=collapse, batch=batch, fc="gemm_tb0")
    result = assert_converts(model, convs=2, batch=3 if batch == "N" else batch)
    first = result.layers[0]
    assert first.kernel == list(feature_shape[1:]) and first.in_channels == feature_shape[0]


@pytest.mark.parametrize("feature_shape", MAPS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", CHAIN_OPS)
def test_chain_ops_between_fcs(op, feature_shape):
    result = assert_converts(head_model(feature_shape=feature_shape, chain=(op, "Relu")), convs=2)
    assert op.replace("Scalar", "").replace("PerFeature", "").replace("Left", "") in ops(result.model)


def test_three_fc_chain_with_softmax_keeps_softmax_after_flatten():
    model = head_model(chain=("Relu", "Dropout"), softmax=True)
    result = assert_converts(model, convs=2)
    seq = ops(result.model)
    assert seq[-2:] == ["Flatten", "Softmax"], seq


def test_float16_is_kept():
    model = head_model(dtype=np.float16, fc="gemm_alpha_beta")
    result = assert_converts(model, convs=2, rtol=1e-2, atol=1e-2)
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.FLOAT16}


def test_float64_is_kept():
    """onnxruntime's CPU Conv has no double kernel: compare in onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    model = head_model(dtype=np.float64, fc="gemm_tb0", chain=("Tanh",))
    result = convert(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert ops(result.model).count("Conv") == 2 and "Gemm" not in ops(result.model)
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.DOUBLE}
    feeds = feeds_for(model, 2)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    got = ReferenceEvaluator(result.model).run(None, feeds)[0]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_softmax_opset_11_untouched_after_flatten():
    assert_converts(head_model(opset=11, softmax=True), convs=2)


def test_weight_shared_by_two_gemms_is_stored_once():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,3,3] x) => (float[N,4] y, float[N,4] z) {
          f = Flatten <axis=1> (x)
          y = Gemm <transB=1> (f, w, b)
          r = Relu(x)
          fr = Flatten <axis=1> (r)
          z = Gemm <transB=1> (fr, w, b)
        }""", w=np.random.default_rng(0).standard_normal((4, 18)).astype(np.float32),
        b=np.arange(4, dtype=np.float32))
    result = assert_converts(model, convs=2)
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] == convs[1].input[1]
    assert [t.name for t in result.model.graph.initializer].count(convs[0].input[1]) == 1


def test_graph_input_map_converts():
    """The map may be the graph input itself (no trunk)."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1,3,2,2] x) => (float[1,5] y) {
          f = Flatten(x)
          y = Gemm <transB=1> (f, w)
        }""", w=np.ones((5, 12), np.float32))
    assert_converts(model, convs=1, batch=1)


# -- what is not converted, and why --------------------------------------

def _layers(text, **inits):
    return inspect(parse(text, **inits)).layers


def test_transa_is_reported_not_converted():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1,2,2,2] x) => (float[8,3] y) {
          f = Flatten(x)
          y = Gemm <transA=1> (f, w)
        }""", w=np.ones((1, 3), np.float32))
    layers = inspect(model).layers
    assert len(layers) == 1 and not layers[0].converted
    assert "transA=1" in layers[0].reason
    result = convert(model)
    assert ops(result.model) == ops(model) and result.heads == 0


def test_non_constant_weight_is_reported():
    layers = _layers("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1,2,2,2] x, float[3,8] w) => (float[1,3] y) {
          f = Flatten(x)
          y = Gemm <transB=1> (f, w)
        }""")
    assert not layers[0].converted and "is not a constant" in layers[0].reason


def test_fc_on_a_plain_vector_is_reported():
    layers = _layers("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,8] x) => (float[N,3] y) {
          y = Gemm <transB=1> (x, w)
        }""", w=np.ones((3, 8), np.float32))
    assert not layers[0].converted
    assert layers[0].reason == "its input comes from graph input 'x' of shape ['N', 8], not from a flattened spatial feature map"


def test_batched_matmul_is_reported():
    layers = _layers("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,4,8] x) => (float[N,4,3] y) {
          y = MatMul(x, w)
        }""", w=np.ones((8, 3), np.float32))
    assert not layers[0].converted and "rank 3" in layers[0].reason


def test_reshape_that_folds_batch_is_reported():
    layers = _layers("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,2,2] x) => (float[1,3] y) {
          f = Reshape(x, s)
          y = Gemm <transB=1> (f, w)
        }""", s=np.array([1, -1], np.int64), w=np.ones((3, 8), np.float32))
    assert not layers[0].converted and "folds the batch axis" in layers[0].reason


def test_k_mismatch_is_an_error():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,3,3] x) => (float[N,4] y) {
          f = Flatten(x)
          y = Gemm <transB=1> (f, w)
        }""", w=np.ones((4, 20), np.float32))
    with pytest.raises(Fc2ConvError, match="K=20.*2\\*3\\*3 = 18"):
        convert(model)


def test_symbolic_spatial_dims_native_size_derived_from_k():
    """[N,2,H,W] -> MaxPool 2 -> FC with K=2*3*3: the smallest square input
    giving a 3x3 map is 6x6; the check runs there, batch stays free."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,H,W] x) => (float[N,4] y) {
          p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (x)
          f = Flatten(p)
          y = Gemm <transB=1> (f, w)
        }""", w=np.random.default_rng(0).standard_normal((4, 18)).astype(np.float32))
    result = convert(model)
    assert result.input_shapes == {"x": ["N", 2, 6, 6]}
    assert result.layers[0].kernel == [3, 3]
    assert result.model.graph.input[0].SerializeToString() == model.graph.input[0].SerializeToString()
    report = check(model, result.model, input_shapes={"x": [2, 2, 6, 6]})
    assert report


def test_symbolic_spatial_dims_ambiguous_ask_for_input_shape():
    """K=20 with C=2: no square map has 10 positions, so the tool asks."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,H,W] x) => (float[N,4] y) {
          f = Flatten(x)
          y = Gemm <transB=1> (f, w)
        }""", w=np.ones((4, 20), np.float32))
    with pytest.raises(Fc2ConvError, match=r"--input-shape x=1,2,<H>,<W>"):
        convert(model)
    result = convert(model, input_shapes=["x=2,2,5,2"])
    # the graph does not fix H, W: the features are pinned by a Reshape to [N, M]
    assert ops(result.model) == ["Conv", "Reshape"]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 2, 5, 2)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_keep_mode_refuses_other_sizes_like_the_original():
    """A model with symbolic H, W converted at its native size: another size
    fails in the converted model as it does in the original (the FC's K pins
    it), instead of returning [N, M*h'*w']."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,H,W] x) => (float[N,4] y) {
          f = Flatten(x)
          y = Gemm <transB=1> (f, w)
        }""", w=np.ones((4, 18), np.float32))
    result = convert(model, input_shapes=["x=1,2,3,3"])
    big = {"x": np.ones((1, 2, 6, 6), np.float32)}
    for m in (model, result.model):
        with pytest.raises(Exception, match="(?i)dimension mismatch|cannot be reshaped"):
            run(m, big)
    small = {"x": np.random.default_rng(1).standard_normal((3, 2, 3, 3)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, small)[0], run(model, small)[0], rtol=1e-5, atol=1e-5)


def test_nothing_to_convert_returns_the_model_unchanged():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,3,3] x) => (float[N,2,3,3] y) {
          y = Relu(x)
        }""")
    result = convert(model)
    assert result.heads == 0 and result.layers == []
    assert result.model.SerializeToString() == model.SerializeToString()


def test_chain_stops_at_a_branch():
    """An FC output read twice ends the chain: both readers see [N, M]."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,3,3] x) => (float[N,4] y, float[N,4] z) {
          f = Flatten(x)
          h = Gemm <transB=1> (f, w)
          y = Relu(h)
          z = Sigmoid(h)
        }""", w=np.random.default_rng(1).standard_normal((4, 18)).astype(np.float32))
    result = assert_converts(model, convs=1)
    assert ops(result.model) == ["Conv", "Flatten", "Relu", "Sigmoid"]


def test_input_shape_naming_no_input_is_an_error():
    with pytest.raises(Fc2ConvError, match="not an input of the model; its inputs are: x"):
        convert(head_model(), input_shapes=["nope=1,2,3"])
    with pytest.raises(Fc2ConvError, match="does not parse"):
        convert(head_model(), input_shapes=["x=1,a"])
    with pytest.raises(Fc2ConvError, match="has rank 2, but input 'x' has rank 4"):
        convert(head_model(), input_shapes=["x=1,2"])


def test_transb1_weight_becomes_its_kernel_in_place():
    """transB=1, alpha=1: the kernel is the weight with new dims; no copy, no
    second initializer. A transB=0 weight needs a transposed copy."""
    model = head_model(fc="gemm_tb1")
    result = assert_converts(model, convs=2)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"][1:]
    after = {t.name: t for t in result.model.graph.initializer}
    for conv in convs:
        assert conv.input[1] in before, "the FC weight was not reused"
        assert list(after[conv.input[1]].dims)[:2] == [before[conv.input[1]].shape[0], before[conv.input[1]].shape[1] // int(np.prod(after[conv.input[1]].dims[2:]))]
    total = lambda m: sum(onnx.numpy_helper.to_array(t).nbytes for t in m.graph.initializer)  # noqa: E731
    assert total(result.model) == total(model)
    result0 = assert_converts(head_model(fc="gemm_tb0"), convs=2)
    first_conv = [n for n in result0.model.graph.node if n.op_type == "Conv"][1]
    assert first_conv.input[1].endswith("_conv")


@pytest.mark.parametrize("batch", [1, 3, "N"])
@pytest.mark.parametrize("feature_shape", MAPS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fc,chain", [("gemm_tb1", ("Relu", "BatchNormalization")),
                                      ("matmul_add", ("PRelu", "AddPerFeature")),
                                      ("gemm_tb0", ("MulPerFeature", "Clip"))])
def test_fold_batch_layout(fc, chain, feature_shape, batch):
    """--fold-batch: [N,C,H,W] -> [1,C,N*H,W], one Conv with stride H for the
    whole batch; still every FC a Conv, still equal."""
    from onnx_fc2conv import convert as conv
    model = head_model(feature_shape=feature_shape, batch=batch, fc=fc, chain=chain, softmax=True)
    result = conv(model, fold_batch=True)
    onnx.checker.check_model(result.model, full_check=True)
    seq = ops(result.model)
    assert "Gemm" not in seq and "MatMul" not in seq and seq.count("Conv") == 3
    first = [n for n in result.model.graph.node if n.op_type == "Conv"][1]
    strides = [a for a in first.attribute if a.name == "strides"][0].ints
    assert list(strides) == [feature_shape[1]] + [1] * (len(feature_shape) - 2)
    for b in ([batch] if isinstance(batch, int) else [1, 4]):
        feeds = feeds_for(model, b)
        np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_fold_batch_on_nhwc_and_pool_heads():
    from onnx_fc2conv import convert as conv
    from pathlib import Path
    for name in ("keras_flatten_dense_tf2onnx.onnx", "mnasnet0_5_dynbatch_ts.onnx", "alexnet_view_dynbatch_ts.onnx"):
        path = Path(__file__).parent / "fixtures" / name
        model = onnx.load(path)
        result = conv(path, fold_batch=True)
        feeds = feeds_for(model, 3)
        np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


# -- constant expressions, dtypes, graphsurgeon entry --------------------------

def test_weight_and_bias_as_constant_expressions():
    """Older converters: the weight is a Transpose/Reshape of an initializer,
    the bias a ConstantOfShape; they are folded into the kernel."""
    rng = np.random.default_rng(3)
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,3,3] x) => (float[N,4] y) {
          f = Flatten(x)
          wt = Transpose <perm=[1,0]> (w_km)
          w2 = Reshape(wt, wshape)
          b = ConstantOfShape <value = float[1] {0.25}> (bshape)
          h = Gemm <transB=1> (f, w2, b)
          y = Relu(h)
        }""", w_km=rng.standard_normal((18, 4)).astype(np.float32), wshape=np.array([4, 18], np.int64),
        bshape=np.array([4], np.int64))
    result = assert_converts(model, convs=1)
    assert not {"Transpose", "ConstantOfShape"} & set(ops(result.model))


def test_bfloat16_is_kept():
    """onnxruntime's CPU has no bfloat16 Gemm/Conv: compare in onnx.reference.
    Conv takes bfloat16 from opset 22; below it the FC stays, with the reason."""
    from onnx.reference import ReferenceEvaluator

    import ml_dtypes
    rng = np.random.default_rng(4)
    text = """
        <ir_version: 10, opset_import: ["" : 22]>
        g (bfloat16[N,2,3,3] x) => (bfloat16[N,4] y) {
          f = Flatten(x)
          h = Gemm <transB=1, alpha=0.5> (f, w, b)
          y = Relu(h)
        }"""
    consts = dict(w=rng.standard_normal((4, 18)).astype(ml_dtypes.bfloat16),
                  b=rng.standard_normal(4).astype(ml_dtypes.bfloat16))
    old = convert(parse(text.replace('"" : 22', '"" : 13').replace("ir_version: 10", "ir_version: 8"), **consts))
    assert old.converted == 0 and "Conv does not take bfloat16 at opset 13 (bfloat16 from opset 22)" in \
        old.layers[0].reason
    model = parse(text, **consts)
    result = convert(model)
    assert ops(result.model) == ["Conv", "Relu", "Flatten"]
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    x = rng.standard_normal((2, 2, 3, 3)).astype(ml_dtypes.bfloat16)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0].astype(np.float32)
    got = ReferenceEvaluator(result.model).run(None, {"x": x})[0].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)


def test_graphsurgeon_entry():
    import onnx_graphsurgeon as gs

    from onnx_fc2conv import convert_graph
    model = head_model(chain=("Relu", "Dropout"), softmax=True)
    graph = gs.import_onnx(model)
    new = convert_graph(graph)
    assert isinstance(new, gs.Graph) and new is not graph
    assert [n.op for n in graph.nodes].count("Gemm") == 2, "the caller's graph was changed"
    out = gs.export_onnx(new)
    assert "Gemm" not in ops(out)
    feeds = feeds_for(model, 3)
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)
