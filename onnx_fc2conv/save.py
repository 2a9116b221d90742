"""Write a model atomically: into a temporary file in the target folder, then
renamed into place, so a reader never sees half a file and a failed run leaves
the previous output (or nothing). Large models (or on request) are written
with their weights in one external ``<name>.data`` file beside the model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .errors import Fc2ConvError

PROTO_LIMIT = 2**31 - 1
_EXTERNAL_MIN = 1024  # tensors of at least this many bytes go to the data file


def save(model: onnx.ModelProto, path, *, external_data: bool | None = None,
         limit: int = PROTO_LIMIT) -> list[Path]:
    """Save atomically; returns the files written.

    Args:
        external_data: True forces external data, False forbids it, None
            uses it when the model would exceed ``limit`` bytes.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise Fc2ConvError(f"{path}: the output folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Fc2ConvError(f"{path}: the output folder {str(folder)!r} is not writable")
    if path.is_dir():
        raise Fc2ConvError(f"{path}: is a directory; give a file name for the output")
    size = estimated_size(model)
    use_external = external_data if external_data is not None else size > limit
    if use_external:
        return _save_external(model, path, folder)
    if size > PROTO_LIMIT:
        raise Fc2ConvError(f"{path}: the model is over 2 GB; it must be written with external data")
    _atomic_write(folder, path, [model.SerializeToString()])
    return [path]


def estimated_size(model: onnx.ModelProto) -> int:
    """The serialised size, from tensor dims (``ByteSize`` would walk every
    byte of a large model): weights plus a generous allowance for the rest."""
    from onnx import helper

    total = 1 << 20
    for t in _all_tensors(model):
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        n = 1
        for d in t.dims:
            n *= d
        try:
            item = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            item = 8
        total += n * max(item, 1) + 64
    return total


def _atomic_write(folder: Path, path: Path, chunks) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        raise Fc2ConvError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _save_external(model: onnx.ModelProto, path: Path, folder: Path) -> list[Path]:
    """Move large raw tensors' bytes to ``<name>.data`` (64-byte aligned)
    while serialising the header, then put them back: the caller's model is
    left as it was and no tensor is copied."""
    data_name = path.name + ".data"
    data_path = folder / data_name
    moved = []
    offset = 0
    blobs = []
    for t in _all_tensors(model):
        if t.HasField("raw_data") and len(t.raw_data) >= _EXTERNAL_MIN:
            raw = t.raw_data
            pad = (-offset) % 64
            if pad:
                blobs.append(b"\0" * pad)
                offset += pad
            blobs.append(raw)
            moved.append((t, raw, offset))
            offset += len(raw)
    try:
        for t, raw, off in moved:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(off)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
        header = model.SerializeToString()
    finally:
        for t, raw, _ in moved:
            del t.external_data[:]
            t.ClearField("data_location")
            t.raw_data = raw
    fd, tmp_data = tempfile.mkstemp(dir=folder, prefix=f".{data_name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for b in blobs:
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        _atomic_write(folder, path, [header])
        os.replace(tmp_data, data_path)
    except OSError as exc:
        _unlink(tmp_data)
        raise Fc2ConvError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp_data)
        raise
    return [path, data_path]


def _all_tensors(model: onnx.ModelProto):
    from onnx import external_data_helper
    return external_data_helper._get_all_tensors(model)
