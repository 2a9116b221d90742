"""Each pattern rule on tiny graphs (rules/fc.py, rules/collapse.py,
rules/steps.py) and the per-op table (ops.py): what it matches, and the exact
sentence of each refusal. The integration tests through onnxruntime are in
test_convert.py / test_dense.py."""

import numpy as np
import onnx
import pytest

from helpers import parse
from onnx_fc2conv import check, convert, ops, shapes
from onnx_fc2conv.graph import GraphIndex
from onnx_fc2conv.rules import Context, Refusal
from onnx_fc2conv.rules.collapse import Collapse, head_pool, match_collapse
from onnx_fc2conv.rules.fc import FC, match_fc
from onnx_fc2conv.rules.steps import Step, match_step

rng = np.random.default_rng(0)


def w(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def ctx_of(model):
    return Context(GraphIndex(model), shapes.infer(model))


def node(model, name):
    return next(n for n in model.graph.node if name in n.output)


# -- FC kinds ---------------------------------------------------------------

def test_gemm_and_matmul_add_are_fcs():
    m = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,6] x) => (float[N,3] y) {
          a = Gemm <transB=1, alpha=0.5> (x, w1, b1)
          h = MatMul(a, w2)
          y = Add(b2, h)
        }""", w1=w(4, 6), b1=w(4), w2=w(4, 3), b2=w(3))
    ctx = ctx_of(m)
    g = match_fc(node(m, "a"), ctx)
    assert isinstance(g, FC) and (g.op, g.m, g.k, g.trans_b, g.alpha, g.bias) == ("Gemm", 4, 6, True, 0.5, "b1")
    mm = match_fc(node(m, "h"), ctx)
    assert isinstance(mm, FC) and (mm.op, mm.m, mm.k, mm.bias, mm.output) == ("MatMul+Add", 3, 4, "b2", "y")
    assert match_fc(node(m, "y"), ctx) is None  # an Add is not an FC


@pytest.mark.parametrize("text, reason", [
    ("y = Gemm <transA=1> (x, w)", "transA=1: the Gemm reads its input transposed"),
    ("y = Gemm (x, x2)", "its weight 'x2' is not a constant"),
    ("y = Gemm <transB=1> (x, w, bb)", "its bias of shape [2, 3] varies along the batch axis"),
])
def test_gemm_refusals(text, reason):
    m = parse(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,6] x, float[6,3] x2) => (float[2,3] y) {{
          {text}
        }}""", w=w(3, 6) if "transB" in text else w(6, 3), bb=w(2, 3))
    found = match_fc(m.graph.node[0], ctx_of(m))
    assert isinstance(found, Refusal) and found.reason.startswith(reason), found


def test_matmul_over_a_sequence_is_refused():
    m = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,7,6] x) => (float[N,7,3] y) { y = MatMul(x, w) }""", w=w(6, 3))
    found = match_fc(m.graph.node[0], ctx_of(m))
    assert isinstance(found, Refusal) and "has rank 3" in found.reason


# -- collapses --------------------------------------------------------------

@pytest.mark.parametrize("lines, pattern, layout, perm", [
    ("f = Flatten(x)", "Flatten", "NCHW", (0, 1, 2, 3)),
    ("t = Transpose <perm=[0,2,3,1]> (x)\n f = Reshape(t, s)", "Transpose+Reshape", "NHWC", (0, 2, 3, 1)),
    ("p = GlobalAveragePool(x)\n f = Flatten(p)", "GlobalAveragePool+Flatten", "NCHW", (0, 1, 2, 3)),
    ("p = ReduceMean <keepdims=0> (x, ax)", "ReduceMean(keepdims=0)", "NCHW", (0, 1, 2, 3)),
    ("q = Flatten(x)\n f = Cast <to=1> (q)", "Flatten+Cast", "NCHW", (0, 1, 2, 3)),
])
def test_collapses(lines, pattern, layout, perm):
    last = lines.split("\n")[-1].split("=")[0].strip()
    m = parse(f"""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N,2,3,3] x) => (float[N,4] y) {{
          {lines}
          y = MatMul({last}, wm)
        }}""", s=np.array([0, -1], np.int64), ax=np.array([2, 3], np.int64),
        wm=w(2, 4) if ("Pool" in pattern or "Reduce" in pattern) else w(18, 4))
    col = match_collapse(last, ctx_of(m))
    assert isinstance(col, Collapse), col
    assert (col.pattern, col.layout, col.perm) == (pattern, layout, perm)
    assert [st.node.op_type for st in col.steps] == (["Cast"] if "Cast" in pattern else [])


def test_collapse_refuses_a_batch_folding_reshape():
    m = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,3,3] x) => (float[1,4] y) {
          f = Reshape(x, s)
          y = MatMul(f, wm)
        }""", s=np.array([1, -1], np.int64), wm=w(18, 4))
    col = match_collapse("f", ctx_of(m))
    assert isinstance(col, Refusal) and "folds the batch axis into the features" in col.reason
    assert col.node.op_type == "Reshape"


def test_head_pool_kinds():
    m = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,2,4,4] x) => (float[N,2,1,1] a, float[N,2,1,1] b, float[N,2,2,2] c) {
          a = GlobalMaxPool(x)
          b = AveragePool <kernel_shape=[4,4]> (x)
          c = MaxPool <kernel_shape=[2,2], strides=[2,2]> (x)
        }""")
    ctx = ctx_of(m)
    col = Collapse("x", (0, 1, 2, 3), (2, 1, 1), (), "", "NCHW")
    assert head_pool(ctx, m.graph.node[0], col) == "global"
    assert head_pool(ctx, m.graph.node[1], col) == "covering"
    assert head_pool(ctx, m.graph.node[2], Collapse("c", (0, 1, 2, 3), (2, 2, 2), (), "", "NCHW")) is None


# -- steps ------------------------------------------------------------------

STEP_MODEL = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4] h, float[N,4] other) => (float[N,4] y1, float[N,4] y2, float[N,4] y3, float[N,4] y4,
                                           float[N,4] y5, float[N,4] y6, int64[N,1] y7, float[N,4] y8) {
      y1 = Relu(h)
      y2 = Mul(h, k)
      y3 = Add(h, other)
      y4 = BatchNormalization(h, s, b, mm, v)
      y5 = Softmax(h)
      y6 = Mul(h, kb)
      y7 = ArgMax(h)
      y8 = Identity(h)
    }"""


def test_steps_and_their_refusals():
    m = parse(STEP_MODEL, k=w(4), s=w(4), b=w(4), mm=w(4), v=np.ones(4, np.float32), kb=w(2, 4))
    ctx = ctx_of(m)
    step = lambda out, **kw: match_step(node(m, out), "h", 4, 2, ctx, **kw)  # noqa: E731
    assert isinstance(step("y1"), Step) and step("y1").constants == ()
    s2 = step("y2")
    assert isinstance(s2, Step) and s2.constants[0][1].shape == (4, 1, 1)
    assert step("y3").reason == "combines the features with another tensor"
    assert isinstance(step("y4"), Step)
    assert step("y5").reason == "is not a per-position op"            # not in the chain...
    assert isinstance(step("y5", classes=True), Step) and step("y5", classes=True).class_axis  # ...but after it
    assert step("y6").reason == "uses a constant of shape [2, 4] that is not per feature"
    assert step("y7", classes=True).reason == "acts along axis 0, not the class axis"  # ArgMax's default axis
    assert step("y8").identity


# -- the per-op table -------------------------------------------------------

@pytest.mark.parametrize("text, opset, rank, axes", [
    ("Softmax", 11, 4, {1, 2, 3}),        # flattens from its axis (default 1)
    ("Softmax", 13, 4, {3}),              # one axis, default -1
    ("LogSoftmax <axis=1>", 13, 4, {1}),
    ("Hardmax", 12, 2, {1}),
    ("LpNormalization", 13, 4, {3}),
    ("ArgMax", 13, 4, {0}),
    ("LayerNormalization <axis=1>", 17, 4, {1, 2, 3}),
    ("MeanVarianceNormalization", 12, 4, {0, 2, 3}),
    ("InstanceNormalization", 13, 4, {2, 3}),
    ("ReduceMean <axes=[2,3]>", 13, 4, {2, 3}),
    ("ReduceSum <keepdims=1>", 13, 4, {0, 1, 2, 3}),   # no axes: all of them
])
def test_acted_axes(text, opset, rank, axes):
    op, _, attrs = text.partition(" ")
    n = onnx.helper.make_node(op, ["x"], ["y"])
    if attrs:
        key, value = attrs.strip("<>").split("=")
        n.attribute.append(onnx.helper.make_attribute(key, eval(value)))
    assert ops.acted_axes(n, rank, opset, lambda name: None) == axes


def test_acted_axes_from_a_non_constant_input_are_unknown():
    n = onnx.helper.make_node("CumSum", ["x", "axis"], ["y"])
    assert ops.acted_axes(n, 4, 13, lambda name: None) is None
    assert ops.acted_axes(n, 4, 13, lambda name: np.array(1)) == {1}


# -- the worked example of ARCHITECTURE.md: Cast in the collapse --------------

def test_cast_in_the_collapse_and_between_matmul_and_bias():
    """tf2onnx writes Casts between the global pool and the MatMul and between
    the MatMul and its Add: the collapse's Cast is applied to the map before
    the first Conv, the other is a chain step."""
    m = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3,6,6] x) => (float[N,4] z) {
          c = Conv <kernel_shape=[1,1]> (x, cw)
          p = GlobalAveragePool(c)
          f = Flatten(p)
          k = Cast <to=10> (f)
          y = MatMul(k, wm)
          k2 = Cast <to=1> (y)
          z = Add(k2, b)
        }""", cw=w(5, 3, 1, 1), wm=w(5, 4).astype(np.float16), b=w(4))
    result = convert(m)
    assert result.converted == 1 and result.layers[0].pattern == "GlobalAveragePool+Flatten+Cast"
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "GlobalAveragePool", "Cast", "Conv", "Cast",
                                                             "Add", "Flatten"]
    assert check(m, result.model, atol=1e-2, rtol=1e-2)
    dense = convert(m, dense=True)
    assert check(m, dense.model, dense=True, atol=1e-2, rtol=1e-2)


def test_strided_view_is_an_identity_only_when_its_indices_are():
    """dynamo's as_strided: Gather(Reshape(x, [-1]), Range(batch)*C + arange(C))."""
    from onnx_fc2conv.rules.collapse import strided_view_of

    def model(offset):
        return parse(f"""
            <ir_version: 8, opset_import: ["" : 18]>
            g (float[N,4,1,1] x) => (float[N,4,1,1] y) {{
              flat = Reshape(x, m1)
              s = Shape(x)
              n = Gather <axis=0> (s, zero)
              r = Range(start, n, one)
              rm = Mul(r, four)
              ru = Unsqueeze(rm, ax)
              ind = Add(ru, base)
              y = Gather <axis=0> (flat, ind)
            }}""", m1=np.array([-1], np.int64), zero=np.array(0, np.int64), start=np.array(0, np.int64),
            one=np.array(1, np.int64), four=np.array(4, np.int64), ax=np.array([1, 2, 3], np.int64),
            base=(np.arange(4, dtype=np.int64) + offset).reshape(1, 4, 1, 1))

    good, shifted = model(0), model(1)
    assert strided_view_of(ctx_of(good), node(good, "y")) == "x"
    assert strided_view_of(ctx_of(shifted), node(shifted, "y")) is None
