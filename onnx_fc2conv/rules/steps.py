"""Steps: the ops between and after FC layers that keep their meaning when
``[N, M]`` features become an ``[N, M, 1, ...]`` (keep) or ``[N, M, *S]``
(dense) map, and how each is re-emitted there.

Which ops qualify is read from the per-op table (ops.py):

- element-wise ops (``ops.POINTWISE``, ``ops.BROADCAST``) whose other inputs
  are constants that broadcast per feature; the constants are reshaped from
  ``[M]``/``[1, M]`` to ``[M, 1, ...]`` (kernels.per_feature). Clip's and
  Dropout's extra inputs may be non-constant scalars;
- per-channel ops (``ops.PER_CHANNEL``: BatchNormalization, inference mode);
- reshapes that are a no-op on ``[N, M]`` (Identity; a Flatten/Reshape/
  Squeeze whose output shape equals its input's): dropped in keep mode,
  Identity in dense mode;
- ops acting along the feature (class) axis alone (``ops.acted_axes``
  gives ``{1}`` on ``[N, M]``): LayerNormalization and LpNormalization
  anywhere in a head (``classes=True``); Softmax/LogSoftmax/Hardmax/ArgMax/
  ArgMin (``AFTER_HEAD``) only in the dense tail, as keep mode leaves them
  after the head. Re-emitted with ``axis=1``; where the op acts from its axis
  to the last (LayerNormalization; Softmax below opset 13), wrapped in
  Transposes that make the class axis last.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from .. import kernels, ops
from ..graph import attr, node_label
from ..ops import AFTER_HEAD, CLASS_AXIS, NOOP_RESHAPES, QUANTIZE, SCALAR_EXTRAS  # noqa: F401 (AFTER_HEAD: find.py)
from . import Context, Refusal


@dataclass(frozen=True)
class Step:
    """A per-position op carried over into the Conv layout."""
    node: onnx.NodeProto
    data_index: int              # which input is the chain tensor
    constants: tuple             # ((input index, value reshaped for [N, M, 1...]), ...)
    identity: bool = False       # a reshape that is a no-op on [N, M]: dropped
    class_axis: bool = False     # acts along the class axis: re-emitted with axis 1


def match_step(node: onnx.NodeProto, t: str, m: int, spatial_rank: int, ctx: Context, *,
               classes: bool = False) -> Step | Refusal:
    """``node`` reads ``t`` (``[N, M]``): the Step it becomes, or why not.

    ``classes``: also accept ops along the class axis (the dense tail)."""
    idx = ctx.idx
    op = node.op_type
    what = "scores" if classes else "features"
    data = list(node.input).index(t)
    if classes and (node.domain, op) == (ops.MS_DOMAIN, "QLinearSoftmax") and data == 0 \
            and all(idx.value(i) is not None and idx.value(i).size == 1 for i in node.input[1:] if i):
        pass  # onnxruntime's quantized Softmax, per-tensor scales: along the class axis, checked below
    elif not ops.is_default(node):
        return Refusal(f"is a custom op ({node.domain}:{op})", node)
    if any(o and idx.uses(o) for o in node.output[1:]):
        return Refusal("has a second output that is used", node)
    if op in NOOP_RESHAPES:
        ishape, oshape = ctx.shape(t), ctx.shape(node.output[0])
        if data == 0 and (op == "Identity" or (ishape is not None and oshape is not None
                                              and list(ishape) == list(oshape) and len(ishape) == 2)):
            return Step(node, 0, (), identity=True)
        return Refusal(f"changes the shape {list(ishape or [])} -> {list(oshape or [])}", node)
    if op in ops.PER_CHANNEL:
        if data != 0 or int(attr(node, "training_mode", 0)):
            return Refusal("is in training mode" if data == 0 else f"reads the {what} as a parameter", node)
        return Step(node, 0, ())
    if op in ops.POINTWISE:
        if data != 0:
            return Refusal(f"reads the {what} as a parameter", node)
        return Step(node, 0, ())
    if op in ops.BROADCAST:
        consts = []
        for i, inp in enumerate(node.input):
            if i == data or not inp:
                continue
            v = idx.value(inp)
            if v is None:
                if op in SCALAR_EXTRAS and i > 0 and ctx.rank(inp) in (0, None):
                    continue
                return Refusal(f"combines the {what} with another tensor", node)
            try:
                reshaped = kernels.per_feature(v, m, spatial_rank)
            except kernels.NotPerFeature:
                return Refusal(f"uses a constant of shape {list(v.shape)} that is not per feature", node)
            if reshaped is not v:
                consts.append((i, reshaped))
        if op in SCALAR_EXTRAS and data != 0:
            return Refusal(f"reads the {what} as a parameter", node)
        if op in QUANTIZE and (consts or data != 0 or int(attr(node, "block_size", 0) or 0)):
            return Refusal("quantizes per axis or in blocks, not per tensor", node)
        return Step(node, data, tuple(consts))
    if classes and (op in CLASS_AXIS or op == "QLinearSoftmax") and data == 0:
        acted = ops.acted_axes(node, 2, idx.opset, idx.value)
        if acted != {1}:
            axes = sorted(acted) if acted is not None else "unknown axes"
            return Refusal(f"acts along axis {axes[0] if isinstance(axes, list) and len(axes) == 1 else axes}, "
                           "not the class axis", node)
        return Step(node, 0, (), class_axis=True)
    return Refusal("is not a per-position op", node)


def emit(step: Step, x: str, out: str, namer, spatial: int, opset: int, *, dense: bool,
         suffix: str = "_conv") -> tuple[list, list]:
    """The op of ``step`` on the map ``x`` (rank ``2 + spatial``), writing
    ``out``: (nodes, initializers)."""
    node = step.node
    if step.identity:
        return ([helper.make_node("Identity", [x], [out], name=node.name)] if dense else []), []
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.input[step.data_index] = x
    del new.output[1:]
    new.output[0] = out
    inits = []
    for index, value in step.constants:
        cname = namer(f"{node.input[index]}{suffix}")
        inits.append((cname, value))
        new.input[index] = cname
    if not step.class_axis:
        return [new], inits
    for a in list(new.attribute):
        if a.name == "axis":
            new.attribute.remove(a)
    if node.op_type == "QLinearSoftmax":
        opset = int(attr(node, "opset", opset))
    if ops.acts_to_last(node.op_type, opset):
        rank = 2 + spatial
        to_last = [0] + list(range(2, rank)) + [1]
        back = [0, rank - 1] + list(range(1, rank - 1))
        t1, t2 = namer(f"{out}_classlast"), namer(f"{out}_sm")
        new.input[0] = t1
        new.output[0] = t2
        new.attribute.append(helper.make_attribute("axis", rank - 1))
        return [helper.make_node("Transpose", [x], [t1], name=namer(f"{node.name}_to_last"), perm=to_last),
                new,
                helper.make_node("Transpose", [t2], [out], name=namer(f"{node.name}_back"), perm=back)], inits
    new.attribute.append(helper.make_attribute("axis", 1))
    return [new], inits


def describe(refusal: Refusal) -> str:
    """``Op 'name' <reason>``: a refusal as the start of a sentence."""
    n = refusal.node
    return f"{n.op_type} {node_label(n)!r} {refusal.reason}" if n is not None else refusal.reason
