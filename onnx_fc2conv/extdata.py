"""External-data helpers shared by load, save, graph and verify: which
tensors a model holds, which of them keep their bytes in a separate file,
how many bytes each declares, and reading those bytes.

A leaf module: it imports nothing of this package but ``errors``, so
``load`` and ``save`` both use it without importing each other.

A loaded model's external tensors hold the validated absolute path of their
data file as ``location`` (see ``load``); ``external_bytes`` reads from it.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import external_data_helper, helper

from .errors import Fc2ConvError

_PACKED_4BIT = frozenset(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
                         if hasattr(onnx.TensorProto, n))


def all_tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    """Every TensorProto of the model that may hold weights: initializers
    (subgraphs included) and tensor attributes (Constant nodes, subgraphs,
    functions), as onnx's own external-data code sees them.

    The only caller of onnx's private ``_get_all_tensors``; if a future onnx
    drops it, the same walk is done here.
    """
    walk = getattr(external_data_helper, "_get_all_tensors", None)
    if walk is None:
        return _walk_tensors(model)
    return walk(model)


def _walk_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """onnx 1.15-1.23's ``_get_all_tensors``, in the same order."""
    yield from _initializers(model.graph)
    yield from _attribute_tensors(model.graph)
    for function in model.functions:
        yield from _attribute_tensors(function)


def _subgraphs(a: onnx.AttributeProto):
    if a.type == onnx.AttributeProto.GRAPH:
        yield a.g
    elif a.type == onnx.AttributeProto.GRAPHS:
        yield from a.graphs


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            for sub in _subgraphs(a):
                yield from _initializers(sub)


def _attribute_tensors(graph) -> Iterator[onnx.TensorProto]:
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in _subgraphs(a):
                yield from _attribute_tensors(sub)


def is_external(t: onnx.TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in all_tensors(model))


def declared_bytes(t: onnx.TensorProto) -> int | None:
    """The bytes the tensor's dims and type call for (None for a type
    without a fixed size, such as strings, or an unknown type)."""
    try:
        item = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    n = 1
    for d in t.dims:
        n *= max(int(d), 0)
    if t.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    return n * item


def external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def external_bytes(t: onnx.TensorProto) -> bytes:
    """The bytes of a tensor whose data stayed in its file (loaded models
    hold the validated absolute location)."""
    info = external_info(t)
    offset = int(info.get("offset", 0) or 0)
    length = info.get("length")
    size = int(length) if length is not None else declared_bytes(t)
    with open(info["location"], "rb") as f:
        f.seek(offset)
        data = f.read(size) if size is not None else f.read()
    if size is not None and len(data) != size:
        raise Fc2ConvError(f"tensor {t.name!r}: its external data file ended early")
    return data


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every external tensor's bytes inside (for onnxruntime)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in all_tensors(copy):
        if is_external(t):
            t.raw_data = external_bytes(t)
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    return copy


def estimated_size(model: onnx.ModelProto) -> int:
    """The serialised size, from tensor dims (``ByteSize`` would walk every
    byte of a large model): weights plus a generous allowance for the rest."""
    total = 1 << 20
    for t in all_tensors(model):
        n = declared_bytes(t)
        total += (n if n is not None else 0) + 64
    return total
