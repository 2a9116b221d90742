"""What strict consumers need of a converted file (issue: tract, onnx2torch,
onnx's full check): no stale value_info after a rewrite, ranks that shape
inference can follow below opset 14, negative dims read as unknown, and a
keep-mode output that refuses other sizes like the original."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import parse
from onnx_fc2conv import check, convert, save
from onnx_fc2conv.shapes import strict_problem

FIXTURES = Path(__file__).parent / "fixtures"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnx_fc2conv", *map(str, args)], capture_output=True, text=True)


def test_dynamo_weight_annotations_do_not_go_stale(tmp_path):
    """PyTorch's dynamo exporter annotates the weights in graph.value_info;
    a weight that became a Conv kernel by a change of dims must not keep
    its old [M, K] entry."""
    path = FIXTURES / "vgg_narrow_dynamo.onnx"
    original = onnx.load(path)
    stale = {v.name for v in original.graph.value_info} & {t.name for t in original.graph.initializer}
    assert "classifier.0.weight" in stale  # the premise: the exporter annotates weights
    result = convert(path)
    kernel = next(t for t in result.model.graph.initializer if t.name == "classifier.0.weight")
    assert list(kernel.dims) == [64, 16, 4, 4]
    assert "classifier.0.weight" not in {v.name for v in result.model.graph.value_info}
    out = tmp_path / "k.onnx"
    save(result.model, out)
    onnx.checker.check_model(str(out), full_check=True)
    onnx.shape_inference.infer_shapes(onnx.load(out), strict_mode=True)
    # annotations of untouched tensors stay
    assert {v.name for v in result.model.graph.value_info} >= {"features.0.weight", "conv2d"}


SHUFFLE_OP9 = """
    <ir_version: 4, opset_import: ["" : 9]>
    g (float[1,4,8,8] x) => (float[1,3] y) {
      c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, cw)
      r = Reshape (c, s5)
      t = Transpose <perm=[0,2,1,3,4]> (r)
      u = Reshape (t, s4)
      b = BatchNormalization (u, g1, b1, m1, v1)
      a = Relu (b)
      p = GlobalAveragePool (a)
      f = Flatten (p)
      y = Gemm <transB=1> (f, w, wb)
    }"""


def _shuffle_op9():
    rng = np.random.default_rng(0)
    return parse(SHUFFLE_OP9, cw=rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
                 s5=np.array([1, 2, 2, 8, 8], np.int64), s4=np.array([1, 4, 8, 8], np.int64),
                 g1=np.ones(4, np.float32), b1=np.zeros(4, np.float32), m1=np.zeros(4, np.float32),
                 v1=np.ones(4, np.float32), w=rng.standard_normal((3, 4)).astype(np.float32), wb=np.zeros(3, np.float32))


def test_opset9_channel_shuffle_keeps_its_rank_in_dense_mode():
    """Dense mode takes the shuffle Reshapes' shape from Shape(x); at opset 9
    inference cannot see a computed shape's rank, so every op after it (the
    BatchNormalization here) would lose its rank without the annotations."""
    model = _shuffle_op9()
    result = convert(model, dense=True)
    dense = result.model
    assert strict_problem(dense) is None
    inferred = onnx.shape_inference.infer_shapes(dense, strict_mode=True)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info
             if v.type.tensor_type.HasField("shape")}
    bn_in = next(n.input[0] for n in dense.graph.node if n.op_type == "BatchNormalization")
    assert ranks.get(bn_in) == 4, ranks
    assert check(model, dense, dense=True)


def _negative_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    for vi in list(model.graph.input) + list(model.graph.output):
        d = vi.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_value = -1  # as paddle2onnx writes a free batch
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def negbatch(tmp_path):
    model = _negative_batch(onnx.load(Path(__file__).parents[1] / "models" / "vgg_small.onnx"))
    path = tmp_path / "neg.onnx"
    onnx.save(model, path)
    return path


def test_negative_batch_is_free(negbatch, tmp_path):
    """-1 is an unknown size, not a fixed one: the check runs at batch 2 and
    --input-shape may fix it, or leave it free with -1 as inspect shows it."""
    r = _cli("convert", negbatch, "-o", tmp_path / "o.onnx", "--check")
    assert r.returncode == 0, r.stderr
    assert "inputs input [2,3,32,32]" in r.stdout
    for spec in ("input=1,3,32,32", "input=-1,3,32,32", "input:?,3,32,32"):
        r = _cli("convert", negbatch, "-o", tmp_path / "o.onnx", "--check", "--input-shape", spec)
        assert r.returncode == 0, (spec, r.stderr)
    r = _cli("convert", negbatch, "-o", tmp_path / "d.onnx", "--dense", "--check")
    assert r.returncode == 0, r.stderr


def test_free_dim_only_for_the_batch(negbatch, tmp_path):
    r = _cli("convert", negbatch, "-o", tmp_path / "o.onnx", "--input-shape", "input=1,3,-1,32")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "only the batch" in r.stderr and not (tmp_path / "o.onnx").exists()


def test_free_batch_on_a_fixed_batch_is_refused(tmp_path):
    r = _cli("convert", Path(__file__).parents[1] / "models" / "lenet.onnx", "-o", tmp_path / "o.onnx",
             "--input-shape", "input=-1,1,28,28")
    assert r.returncode == 2 and "fixes it at" in r.stderr, r.stderr
