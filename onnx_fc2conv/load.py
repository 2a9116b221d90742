"""Load a model from a path or a ModelProto, refusing what is not a valid
ONNX model with one clear sentence. The caller's ModelProto is copied, never
mutated. External data is read only from inside the model's folder; a
ModelProto's external tensors must already point at absolute paths of files
that hold their bytes (a relative location would depend on the current
directory, so it is refused).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import Fc2ConvError
# external_bytes, has_external, materialized and declared_bytes were defined
# here; they stay importable from this module.
from .extdata import (all_tensors, declared_bytes, estimated_size, external_bytes, external_info,  # noqa: F401
                      has_external, is_external, materialized)

_CHECK_FULL = 64 << 20  # bytes: above this the checker sees a light copy


@dataclass
class Loaded:
    model: onnx.ModelProto
    path: Path | None          # where it came from, if a file


def load(source, *, check: bool = True, weights_in_file: bool = False) -> Loaded:
    """``weights_in_file`` (a path, a model read again that was validated
    before: the check's): the large initializers are not parsed; each
    becomes an external tensor over its bytes inside the .onnx file itself
    (:func:`_weights_in_file`), read only by whoever needs its value."""
    if weights_in_file and not isinstance(source, onnx.ModelProto):
        light = _weights_in_file(Path(source))
        if light is not None:
            if check:
                _check(light, str(source))
            return Loaded(light, Path(source))
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_given_external(model)
        if check:
            _check(model, "the model")
        return Loaded(model, None)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or an onnx.ModelProto, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise Fc2ConvError(f"{path}: no such file")
    if path.is_dir():
        raise Fc2ConvError(f"{path}: is a directory, not an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Fc2ConvError(f"{path}: cannot read: {exc.strerror}") from None
    if not data:
        raise Fc2ConvError(f"{path}: the file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise Fc2ConvError(f"{path}: not an ONNX model (the file does not parse as an ONNX protobuf; "
                           "is it truncated or another format?)") from None
    del data
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import or not model.graph.node:
        raise Fc2ConvError(f"{path}: not an ONNX model (no graph, IR version or opset); is it truncated?")
    _load_external(model, path)
    if check:
        _check(model, str(path))
    return Loaded(model, path)


# --- reading a model with its weights left in the file -----------------------
# ModelProto.graph = 7, GraphProto.initializer = 5; TensorProto: segment = 3,
# raw_data = 9, external_data = 13, data_location = 14.
_IN_FILE_MIN = 1 << 16   # bytes: above shapes._SMALL elements of any type, so shape inference sees the same


class _Unusual(Exception):
    """A layout the scan does not handle (a group, a field twice): parse it whole."""


def _varint(buf, pos: int):
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Unusual
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field, wire type, start of the tag, start of the value, end) of each field of a message."""
    pos = start
    while pos < end:
        tag = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        value = pos
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, value = _varint(buf, pos)
            pos = value + n
        elif wire == 5:
            pos += 4
        else:
            raise _Unusual
        if pos > end:
            raise _Unusual
        yield field, wire, tag, value, pos


def _delimited(field: int, payload) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(payload)) + bytes(payload)


def _weights_in_file(path: Path) -> onnx.ModelProto | None:
    """``path`` parsed without the raw bytes of its large initializers (of
    ``_IN_FILE_MIN`` bytes or more): each becomes an external tensor whose
    location is the .onnx file itself at the offset of those bytes, the form
    of a loaded external-data model (``external_bytes``, ``graph.tensor_value``
    and the check's runner read it). The file is scanned, not parsed: no copy
    of the weights is made here. None where the file is not plain (the caller
    then parses it whole, with its usual errors)."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            spans, head, graphs = [], bytearray(), 0
            for field, wire, tag, value, end in _fields(buf, 0, len(buf)):
                if field != 7 or wire != 2:
                    head += buf[tag:end]
                    continue
                graphs += 1
                graph = bytearray()
                for gfield, gwire, gtag, gvalue, gend in _fields(buf, value, end):
                    if gfield != 5 or gwire != 2:
                        graph += buf[gtag:gend]
                        continue
                    fields = list(_fields(buf, gvalue, gend))
                    raws = [fd for fd in fields if fd[0] == 9]
                    plain = not any(fd[0] in (3, 13, 14) for fd in fields)
                    if len(raws) == 1 and raws[0][1] == 2 and plain and raws[0][4] - raws[0][3] >= _IN_FILE_MIN:
                        raw = raws[0]
                        spans.append((raw[3], raw[4] - raw[3]))
                        graph += _delimited(5, b"".join(buf[fd[2]:fd[4]] for fd in fields if fd is not raw))
                    else:
                        spans.append(None)
                        graph += buf[gtag:gend]
                head += _delimited(7, graph)
    except (OSError, ValueError, _Unusual):
        return None
    if graphs != 1 or not any(spans):
        return None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(head))
    except (DecodeError, RuntimeError, ValueError):
        return None
    if len(model.graph.initializer) != len(spans) or not model.graph.node:
        return None
    _load_external(model, path)   # the file's own external tensors, validated as by load
    location = str(path.resolve())
    for t, span in zip(model.graph.initializer, spans):
        if span is not None:
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, v in (("location", location), ("offset", str(span[0])), ("length", str(span[1]))):
                e = t.external_data.add()
                e.key, e.value = key, v
    return model


def _external_tensors(model: onnx.ModelProto):
    return [t for t in all_tensors(model) if is_external(t)]


def _set_location(t: onnx.TensorProto, location: str) -> None:
    for e in t.external_data:
        if e.key == "location":
            e.value = location


def _load_external(model: onnx.ModelProto, path: Path) -> None:
    tensors = _external_tensors(model)
    if not tensors:
        return
    base = path.parent.resolve()
    for t in tensors:
        loc = external_info(t).get("location", "")
        target = (base / loc).resolve()
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts or base not in target.parents:
            raise Fc2ConvError(f"{path}: tensor {t.name!r} points at external data {loc!r} outside the model's "
                               "folder; refusing to read it")
        if not target.is_file():
            raise Fc2ConvError(f"{path}: external data file {loc!r} of tensor {t.name!r} is missing; "
                               "keep it beside the model")
        _check_extent(t, target.stat().st_size, loc, str(path))
        # Weights stay in their files: the location becomes the validated
        # absolute path, read on demand (external_bytes) and rewritten by save.
        _set_location(t, str(target))


def _check_given_external(model: onnx.ModelProto) -> None:
    """A ModelProto handed in by a caller: its external tensors must already
    point at absolute paths of readable files that hold their bytes (what a
    model loaded by this tool holds). A relative location would be read
    relative to whatever the current directory is, so it is refused."""
    seen: dict[str, int | str] = {}
    for t in _external_tensors(model):
        loc = external_info(t).get("location", "")
        advice = ("pass the model's path instead of a ModelProto, or load it with its data "
                  "(onnx.load(path) with load_external_data left on)")
        if not loc or not os.path.isabs(loc):
            raise Fc2ConvError(f"the model: tensor {t.name!r} points at external data {loc!r} that was never "
                               f"loaded; {advice}")
        if loc not in seen:
            seen[loc] = _readable_size(loc)
        if isinstance(seen[loc], str):
            raise Fc2ConvError(f"the model: external data file {loc!r} of tensor {t.name!r} {seen[loc]}; {advice}")
        _check_extent(t, seen[loc], loc, "the model")


def _readable_size(loc: str) -> int | str:
    """The file's size, or why it cannot be read."""
    if not os.path.isfile(loc):
        return "is missing" if not os.path.exists(loc) else "is not a file"
    try:
        with open(loc, "rb") as f:
            return os.fstat(f.fileno()).st_size
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def _check_extent(t: onnx.TensorProto, size: int, loc: str, what: str) -> None:
    """The tensor's offset, length and dims must fit inside its data file of ``size`` bytes."""
    info = external_info(t)
    try:
        offset, length = int(info.get("offset", 0) or 0), info.get("length")
        length = None if length is None else int(length)
    except ValueError:
        raise Fc2ConvError(f"{what}: tensor {t.name!r} has a malformed external data offset or length") from None
    declared = declared_bytes(t)
    if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)) \
            or (declared is not None and offset + declared > size):
        raise Fc2ConvError(f"{what}: tensor {t.name!r} (dims {list(t.dims)}) reads past the end of {loc!r}; "
                           "the data file is truncated or the dims are wrong")


def _strings_ok(graph: onnx.GraphProto) -> None:
    """Touch every name: protobuf only decodes a string field when read, and a
    corrupt file may hold bytes that are not UTF-8."""
    for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in coll:
            item.name  # noqa: B018
    for node in graph.node:
        node.name, node.op_type, node.domain, list(node.input), list(node.output)  # noqa: B018
        for a in node.attribute:
            a.name  # noqa: B018
            if a.type == onnx.AttributeProto.GRAPH:
                _strings_ok(a.g)
            for g in a.graphs:
                _strings_ok(g)


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        _strings_ok(model.graph)
        [(o.domain, o.version) for o in model.opset_import]  # noqa: B018
    except UnicodeDecodeError:
        raise Fc2ConvError(f"{what}: a name in the model is not valid UTF-8; the file is corrupt") from None
    for t in model.graph.initializer:
        try:
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        except (KeyError, ValueError):
            raise Fc2ConvError(f"{what}: initializer {t.name!r} has an unknown data type {t.data_type}; "
                               "the file is corrupt") from None
    from .shapes import light_model

    # The checker serialises what it checks: on a large model, check the graph
    # with its big weights replaced by typed inputs (their dims and dtypes stay).
    big = estimated_size(model) >= _CHECK_FULL or has_external(model)
    target = light_model(model) if big else model
    try:
        onnx.checker.check_model(target)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "invalid model")
        raise Fc2ConvError(f"{what}: fails onnx.checker: {first.strip()}") from None
    except (UnicodeDecodeError, ValueError, RuntimeError) as exc:  # the checker chokes on corrupt strings
        raise Fc2ConvError(f"{what}: fails onnx.checker ({type(exc).__name__}: the file is corrupt)") from None
