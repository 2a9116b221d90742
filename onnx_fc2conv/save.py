"""Write a model atomically: into temporary files in the target folder, then
renamed into place, so a reader never sees half a file and a failed run leaves
the previous output (or nothing). Re-running writes byte-identical files; a
data file is always written anew, never appended to.

Models that came with external data keep it external; large models (over
2 GB, or on request) get their weights in one ``<name>.data`` file beside the
model. Tensors still in the input's data files (a loaded model reads them on
demand) are copied into the new data file, or, with ``share_data`` and an
output in the same folder, referenced where they are (only then: a data file
the output would replace is always copied from).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .errors import Fc2ConvError
# estimated_size was defined here; it stays importable from this module.
from .extdata import all_tensors, declared_bytes, estimated_size, external_bytes, has_external, is_external

PROTO_LIMIT = 2**31 - 1
_EXTERNAL_MIN = 1024  # tensors of at least this many bytes go to the data file
_ALIGN = 64


def save(model: onnx.ModelProto, path, *, external_data: bool | None = None, share_data: bool = False,
         limit: int = PROTO_LIMIT) -> list[Path]:
    """Save atomically; returns the files written.

    Args:
        external_data: True forces external data, False forbids it, None
            uses it when the model had external data or would exceed
            ``limit`` bytes.
        share_data: reference unchanged tensors in the input's data files
            instead of copying them (output in the same folder only).
    """
    path = Path(path)
    folder = _output_folder(path)
    external = has_external(model)
    size = estimated_size(model)
    use_external = external_data if external_data is not None else (external or size > limit)
    if use_external:
        return _save_external(model, path, folder, share_data)
    if size > PROTO_LIMIT:
        raise Fc2ConvError(f"{path}: the model is over 2 GB; it must be written with external data")
    with _swapped(model, [(t, _inline_fields(t)) for t in all_tensors(model) if is_external(t)]):
        data = model.SerializeToString()
    _write_and_rename(folder, path, [data])
    return [path]


def atomic_write(path, chunks) -> Path:
    """Write ``chunks`` (bytes, or callables returning bytes, written in
    order) to ``path`` atomically: a temporary file in the same folder,
    synced, then renamed over ``path``. Refuses a missing or read-only folder
    and a directory as the target with ``Fc2ConvError``, as ``save`` does;
    on any failure the previous file (or nothing) is left."""
    path = Path(path)
    _write_and_rename(_output_folder(path), path, chunks)
    return path


def _output_folder(path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise Fc2ConvError(f"{path}: the output folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Fc2ConvError(f"{path}: the output folder {str(folder)!r} is not writable")
    if path.is_dir():
        raise Fc2ConvError(f"{path}: is a directory; give a file name for the output")
    return folder


def _inline_fields(t: onnx.TensorProto) -> dict:
    return {"raw_data": external_bytes(t), "external_data": None}


def _external_fields(location: str, offset: int, length: int) -> dict:
    return {"raw_data": None, "external_data": [("location", location), ("offset", str(offset)),
                                                ("length", str(length))]}


class _swapped:
    """Temporarily give tensors other data fields (inline bytes or an external
    reference) while the header is serialised, then put back what they had:
    the caller's model is left as it was and no tensor is copied."""

    def __init__(self, model, changes):
        self.changes = changes
        self.saved = []

    def __enter__(self):
        for t, fields in self.changes:
            self.saved.append((t, t.raw_data if t.HasField("raw_data") else None, list(
                (e.key, e.value) for e in t.external_data), t.data_location if t.HasField("data_location") else None))
            t.ClearField("raw_data")
            del t.external_data[:]
            if fields["raw_data"] is not None:
                t.raw_data = fields["raw_data"]
                t.ClearField("data_location")
            else:
                t.data_location = onnx.TensorProto.EXTERNAL
                for k, v in fields["external_data"]:
                    e = t.external_data.add()
                    e.key, e.value = k, v
        return self

    def __exit__(self, *exc):
        for t, raw, ext, loc in self.saved:
            t.ClearField("raw_data")
            del t.external_data[:]
            if raw is not None:
                t.raw_data = raw
            for k, v in ext:
                e = t.external_data.add()
                e.key, e.value = k, v
            if loc is None:
                t.ClearField("data_location")
            else:
                t.data_location = loc


def _write_and_rename(folder: Path, path: Path, chunks) -> None:
    tmp = _write_temp(folder, path.name, chunks)
    _rename(tmp, path)


def _write_temp(folder: Path, name: str, chunks) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model gets the usual mode
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk() if callable(chunk) else chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        _unlink(tmp)
        raise Fc2ConvError(f"{folder / name}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _rename(tmp: str, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        raise Fc2ConvError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _unlink(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _save_external(model: onnx.ModelProto, path: Path, folder: Path, share_data: bool) -> list[Path]:
    data_name = path.name + ".data"
    data_path = folder / data_name
    changes, chunks = [], []
    offset = 0
    shared = set()
    for t in all_tensors(model):
        if is_external(t):
            source = Path({e.key: e.value for e in t.external_data}["location"])
            if share_data and source.parent == folder.resolve() and source.name != data_name:
                info = {e.key: e.value for e in t.external_data}
                changes.append((t, {"raw_data": None, "external_data": [
                    ("location", source.name)] + [(k, info[k]) for k in ("offset", "length") if k in info]}))
                shared.add(source)
                continue
            length = declared_bytes(t)
            read = (lambda t=t: external_bytes(t))
        elif t.HasField("raw_data") and len(t.raw_data) >= _EXTERNAL_MIN:
            raw = t.raw_data
            length = len(raw)
            read = raw
        else:
            continue
        pad = (-offset) % _ALIGN
        if pad:
            chunks.append(b"\0" * pad)
            offset += pad
        chunks.append(read)
        changes.append((t, _external_fields(data_name, offset, length)))
        offset += length
    written = [path]
    tmp_data = None
    try:
        if offset:
            tmp_data = _write_temp(folder, data_name, chunks)  # reads shared sources before any rename
        with _swapped(model, changes):
            header = model.SerializeToString()
        tmp_header = _write_temp(folder, path.name, [header])
        if tmp_data:
            _rename(tmp_data, data_path)
            tmp_data = None
            written.append(data_path)
        _rename(tmp_header, path)
    finally:
        if tmp_data:
            _unlink(tmp_data)
    return written + sorted(shared)


def destination(path, what: str, sources=()) -> Path:
    """Where a result goes, refused before any work when it cannot be written
    or would overwrite an input."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise Fc2ConvError(f"{path}: the {what} folder does not exist")
    if target.is_dir():
        raise Fc2ConvError(f"{path}: is a directory; give a file name for the {what}")
    for src in sources:
        try:
            same = target.exists() and os.path.samefile(target, src)
        except OSError:
            same = False
        if same:
            raise Fc2ConvError(f"{path}: the {what} would overwrite the input {src}; choose another name")
    return target
