"""``--all-fcs`` (rules/vecfc.py): FCs on plain vectors, token MatMuls and
Gemms with transA=1 become 1x1 Convs in keep mode, checked in onnxruntime
against the original; without the flag nothing changes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from builders import head_model
from helpers import ops, run, signature
from onnx_fc2conv import convert, inspect


def _model(nodes, inputs, outputs, inits, opset=20):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(opset=20, seed=0):
    """An MLP on [N, 8] (Gemm, Relu, MatMul + Add), a Gemm with transA=1
    (alpha, beta, a [1, M] bias) on [4, N], and a token MLP on [N, 5, 6]
    (MatMul + Add, Gelu, MatMul) written with Relu below opset 20."""
    rng = np.random.default_rng(seed)
    inits = []

    def w(name, *shape):
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
        return name

    act = "Gelu" if opset >= 20 else "Relu"
    nodes = [helper.make_node("Gemm", ["x", w("w1", 8, 16), w("b1", 16)], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", w("w2", 16, 5)], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", w("b2", 5)], ["y"], name="fc2_bias"),
             helper.make_node("Gemm", ["xt", w("w3", 6, 4), w("b3", 1, 6)], ["z"], name="gemm_ta", transA=1,
                              transB=1, alpha=0.5, beta=2.0),
             helper.make_node("MatMul", ["tok", w("w4", 6, 7)], ["t1"], name="tok_fc1"),
             helper.make_node("Add", ["t1", w("b4", 7)], ["t2"], name="tok_bias"),
             helper.make_node(act, ["t2"], ["t3"], name="tok_act"),
             helper.make_node("MatMul", ["t3", w("w5", 7, 3)], ["tout"], name="tok_fc2")]
    return _model(nodes, [("x", T.FLOAT, ["N", 8]), ("xt", T.FLOAT, [4, "N"]), ("tok", T.FLOAT, ["N", 5, 6])],
                  [("y", T.FLOAT, ["N", 5]), ("z", T.FLOAT, ["N", 6]), ("tout", T.FLOAT, ["N", 5, 3])], inits, opset)


def _feeds(model, batch):
    rng = np.random.default_rng(batch)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _fcs_with_constant_weight(model):
    consts = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[1] in consts]


def assert_all_fcs(model, n_layers):
    before = model.SerializeToString()
    result = convert(model, all_fcs=True)
    assert model.SerializeToString() == before
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert len(result.layers) == n_layers and all(l.converted for l in result.layers), \
        [(l.name, l.reason) for l in result.layers]
    assert _fcs_with_constant_weight(out) == [], ops(out)
    assert ops(out).count("Conv") == n_layers
    assert signature(out) == signature(model)
    for batch in (1, 3):
        feeds = _feeds(model, batch)
        for e, a in zip(run(model, feeds), run(out, feeds)):
            assert e.shape == a.shape and e.dtype == a.dtype
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(e).max())))
    return result


@pytest.mark.parametrize("opset", [11, 13, 20])
def test_all_fcs_converts_vectors_tokens_and_trans_a(opset):
    result = assert_all_fcs(mlp(opset), 5)
    patterns = {l.name: l.pattern for l in result.layers}
    assert patterns == {"fc1": "vector", "fc2": "chain", "gemm_ta": "Gemm transA=1 on a vector",
                        "tok_fc1": "tokens (rank 3, features last)", "tok_fc2": "tokens (rank 3, features last)"}
    # the MLP is one head: one Unsqueeze in, one Flatten/Reshape out, the Relu between on the map
    assert result.heads == 1


def test_without_all_fcs_nothing_changes():
    model = mlp()
    result = convert(model)
    assert result.converted == 0
    assert result.model.SerializeToString() == model.SerializeToString()
    assert [l.reason is not None for l in result.layers] == [True] * 5


def test_all_fcs_leaves_spatial_heads_as_they_were():
    """On a model whose FCs are all on spatial maps, --all-fcs gives the very
    same model as the default."""
    model = head_model(chain=("Relu",), softmax=True)
    plain, every = convert(model), convert(model, all_fcs=True)
    assert plain.converted == every.converted == 2
    assert every.model.SerializeToString() == plain.model.SerializeToString()


def test_all_fcs_keeps_refusing_what_is_not_an_fc_conv():
    """A weight that is not a constant is no convolution, flag or not; and
    --all-fcs is for keep mode."""
    nodes = [helper.make_node("Gemm", ["x", "wx"], ["y"], name="fc")]
    model = _model(nodes, [("x", T.FLOAT, ["N", 4]), ("wx", T.FLOAT, [4, 3])], [("y", T.FLOAT, ["N", 3])], [])
    result = convert(model, all_fcs=True)
    assert result.converted == 0 and ops(result.model) == ["Gemm"]
    from onnx_fc2conv.errors import Fc2ConvError

    with pytest.raises(Fc2ConvError, match="--all-fcs is for keep mode"):
        convert(mlp(), dense=True, all_fcs=True)


def test_inspect_all_fcs_lists_what_would_convert():
    assert [l.converted for l in inspect(mlp()).layers] == [False] * 5
    assert [l.converted for l in inspect(mlp(), all_fcs=True).layers] == [True] * 5


def test_cli_all_fcs(tmp_path):
    src, out = tmp_path / "mlp.onnx", tmp_path / "out.onnx"
    onnx.save(mlp(), src)
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv", "convert", str(src), "-o", str(out), "--all-fcs",
                        "--check", "--input-shape", "xt=4,2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 converted" in r.stdout and "PASSED" in r.stdout
    assert _fcs_with_constant_weight(onnx.load(out)) == []
    r = subprocess.run([sys.executable, "-m", "onnx_fc2conv", "convert", str(src), "-o", str(tmp_path / "d.onnx"),
                        "--all-fcs", "--dense"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "keep mode" in r.stderr
    assert not (tmp_path / "d.onnx").exists()
