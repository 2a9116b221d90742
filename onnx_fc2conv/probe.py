"""Shapes that only the runtime knows: where ONNX shape inference leaves a
shape the tool needs unknown, read it from one onnxruntime run.

ONNX inference knows nothing of contrib-domain ops (onnxruntime's QOperator
kernels ``QLinearAdd``, ``QLinearGlobalAveragePool``, ``QGemm``... in
com.microsoft), and stops at some function ops; every tensor downstream is
then unknown, and the collapse before the first FC cannot be matched
(onnxruntime's own symbolic shape inference script fails on the same files).
The runtime knows: the model runs once at its native size (seeded random
inputs, or the ``--inputs`` file) with the needed tensors exposed as extra
graph outputs, and their shapes are read off the results.

Needed are the unknown tensors in the cone of an FC layer: every tensor
that computes an FC's input (the trunk and the collapse, which dense mode
walks too) and every tensor computed from an FC's output (chains, branches
and the tail). Nothing runs when inference knows them all, or when the
native size is not fixed (symbolic spatial input dims: the native size
comes first, see shapes.derive_native).

The copy that runs is the model's serialization with a second message
appended that only adds graph outputs (protobuf merges concatenated
messages): the weights are serialized once, as for any onnxruntime session,
and never copied into a second ModelProto.

A dim along axis 0 that equals the probe's batch, where the input's batch is
symbolic, is the batch: it gets the input's symbol back, so nothing that
reads these shapes takes the probe's batch for a fixed one.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from . import ops
from .errors import Fc2ConvError
from .graph import GraphIndex
from .shapes import TensorInfo, input_infos

log = logging.getLogger(__name__)
PROBE_BATCH = 2   # a free batch is run at 2: a dim of 2 on axis 0 is then the batch
# the ops an FC layer is made of (rules/fc.py, quant.py), in any domain


def fill(model: onnx.ModelProto, shapes: dict, overrides: dict, inputs=None, idx: GraphIndex | None = None) -> dict:
    """The probe where it is needed: the shapes it read (``{}`` when none)."""
    idx = idx or GraphIndex(model)
    fcs = [n for n in idx.graph.node if n.op_type in ops.FC_OPS and n.input and n.output]
    if not fcs:
        return {}
    names = needed(idx, shapes, [n.input[0] for n in fcs], [n.output[0] for n in fcs])
    return probe(model, shapes, names, overrides, inputs) if names else {}


def _unknown(info: TensorInfo | None) -> bool:
    """Inference gave no shape at all. A shape it knows in part (a rank, a
    dim it could not compute from a symbolic batch) is left as it is: the
    probe runs one batch size, and a dim that depends on the batch must stay
    unknown rather than take that size."""
    return info is None or info.shape is None


def needed(idx: GraphIndex, shapes: dict, fc_inputs, fc_outputs) -> list[str]:
    """Tensors of unknown shape that compute an FC's input or are computed
    from an FC's output, in graph order."""
    cone: set[str] = set()
    stack = list(fc_inputs)
    while stack:   # backwards: what computes the FC inputs
        t = stack.pop()
        if t in cone or not t:
            continue
        cone.add(t)
        node = idx.producer.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    stack = list(fc_outputs)
    seen: set[str] = set()
    while stack:   # forwards: what the FC outputs feed
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        cone.add(t)
        for node in idx.consumers.get(t, ()):
            stack.extend(o for o in node.output if o)
    out = []
    for node in idx.graph.node:
        for o in node.output:
            if o and o in cone and _unknown(shapes.get(o)) and idx.value(o) is None:
                out.append(o)
    return out


def probe(model: onnx.ModelProto, shapes: dict, names: list[str], overrides: dict, inputs=None,
          seed: int = 0) -> dict[str, tuple]:
    """Run ``model`` once with ``names`` exposed; add their shapes to
    ``shapes`` (in place) and return ``{name: shape}``. Returns ``{}`` when
    the native size is not fixed, or (with a warning) when onnxruntime
    cannot run the model on seeded inputs; raises Fc2ConvError when it
    cannot run it on the user's ``inputs``."""
    from .check.run import concrete_shapes, load_inputs, random_inputs, session

    infos = input_infos(model)
    batch_syms = {}
    for name, info in infos.items():
        dims = overrides.get(name) or (list(info.shape) if info.shape is not None else None)
        if dims is None or not all(isinstance(d, int) for d in dims[1:]):
            return {}
        if dims and not isinstance(dims[0], int):
            batch_syms[name] = dims[0] if isinstance(dims[0], str) and dims[0] else "N"
    if inputs is not None:
        feeds = dict(inputs) if isinstance(inputs, dict) else load_inputs(model, inputs)
    else:
        try:
            feeds = random_inputs(model, concrete_shapes(model, overrides, batch=PROBE_BATCH), seed)
        except Fc2ConvError as exc:  # an input it cannot make up: the shapes stay unknown
            log.warning("shapes ONNX inference leaves unknown cannot be read from onnxruntime: %s", exc)
            return {}
    batch = next((int(feeds[n].shape[0]) for n in batch_syms if n in feeds and feeds[n].ndim), None)
    symbol = next(iter(batch_syms.values()), None)
    try:
        sess = session(onnx.load_model_from_string(_with_outputs(model, names)), "cpu", "the model")
        results = sess.run(names, feeds)
    except Exception as exc:  # onnxruntime's words are the reason
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        message = (f"onnxruntime cannot run the model to read the shapes ONNX inference leaves unknown "
                   f"({', '.join(names[:3])}{'...' if len(names) > 3 else ''}): {first}")
        if inputs is not None:  # the user's inputs: bad input
            raise Fc2ConvError(message) from None
        # seeded inputs at batch 2 that the model does not take: the shapes
        # stay unknown, and the FCs that need them say so
        log.warning("%s", message)
        return {}
    found = {}
    for name, value in zip(names, results):
        value = np.asarray(value)
        old = shapes.get(name)
        dims: list = list(value.shape)
        if old is not None and old.shape is not None and len(old.shape) == len(dims):
            dims = [o if isinstance(o, int) or (isinstance(o, str) and not o.startswith("unk__")) else d
                    for o, d in zip(old.shape, dims)]
        if dims and symbol is not None and dims[0] == batch:
            dims[0] = symbol
        shape = tuple(dims)
        shapes[name] = TensorInfo(shape, helper.np_dtype_to_tensor_dtype(value.dtype))
        found[name] = shape
    log.info("shapes of %d tensor(s) read from one onnxruntime run: %s", len(found),
             ", ".join(f"{n} {list(s)}" for n, s in list(found.items())[:8]))
    return found


def _with_outputs(model: onnx.ModelProto, names: list[str]):
    """What onnxruntime loads: the model with ``names`` as extra outputs, as
    serialized bytes (the model's own bytes, then a message that only adds
    the outputs; protobuf merges them), or, where the model cannot be
    serialized whole (external data, over 2 GB), a copy that the check's session
    materializes as it does for any check."""
    from .extdata import estimated_size, has_external
    from .save import PROTO_LIMIT

    extra = onnx.ModelProto()
    for name in names:
        extra.graph.output.add().name = name
    if not has_external(model) and estimated_size(model) <= PROTO_LIMIT:
        return model.SerializeToString() + extra.SerializeToString()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(extra.graph.output)
    return copy
