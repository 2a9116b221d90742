"""Run models for a check: onnxruntime sessions, concrete shapes, inputs.

Every session of one check (the original, the converted model, the dense
check's trunk and heads) reads its weights from one :class:`Runner`, which
holds each distinct tensor once. A session is built from a *light* copy of
its graph: every initializer of ``SHARE_MIN`` bytes or more is a header (name,
dims, type) that names an empty file, and its value comes through
``SessionOptions.add_initializer`` as an OrtValue over the runner's numpy
buffer, which onnxruntime uses in place on the CPU (prepacking is off, so it
keeps no packed copy either). Tensors are matched by their bytes, not their
names: a keep-mode Conv kernel whose bytes are its FC matrix's (transB=1, no
permutation) is a reshaped view of the same buffer, and a tensor of the
converted model is never run as the original's unless the bytes are equal.

Both models run with graph optimisations off, so that what is compared is the
graph as written. TF32 is off on CUDA: the check compares float32 arithmetic.
"""

from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import Fc2ConvError
from ..extdata import estimated_size, external_bytes, external_info, is_external
from ..load import load
from ..save import save
from ..shapes import input_infos

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SHARE_MIN = 1024                  # bytes: smaller initializers stay in the graph (shape inference reads them)
SHARED_FILE = "onnx-fc2conv-shared.bin"   # what a header names; its value comes from the runner
PROTO_LIMIT = 2 ** 31 - 2 ** 20   # protobuf's 2 GB, less room for the rest of the message
# dtypes that numpy and onnxruntime both hold without conversion
_SHAREABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
              onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}
_CHUNK = 1 << 24


@dataclass
class Light:
    """A graph whose large initializers are headers, and their values (views
    into the runner's buffers, by the names this graph uses)."""
    model: onnx.ModelProto
    values: dict = field(default_factory=dict)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.nbytes != b.nbytes:
        return False
    fa, fb = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    return all(np.array_equal(fa[i:i + _CHUNK], fb[i:i + _CHUNK]) for i in range(0, fa.size, _CHUNK))


def _value(t: onnx.TensorProto) -> np.ndarray:
    """A tensor's value without a second copy: external data is read from its
    file (loaded models hold the absolute location), raw data viewed."""
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    dims = tuple(int(d) for d in t.dims)
    if is_external(t):
        info = external_info(t)
        count = int(np.prod(dims)) if dims else 1
        arr = np.fromfile(info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0) or 0))
        if arr.size != count:
            raise Fc2ConvError(f"tensor {t.name!r}: its external data file ended early")
        return arr.reshape(dims)
    if t.HasField("raw_data"):
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(dims)
    return numpy_helper.to_array(t)


def _header(t: onnx.TensorProto) -> onnx.TensorProto:
    h = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
    h.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", SHARED_FILE), ("offset", "0")):
        e = h.external_data.add()
        e.key, e.value = key, value
    return h


def _is_header(t: onnx.TensorProto) -> bool:
    return is_external(t) and external_info(t).get("location") == SHARED_FILE


def _shared(t: onnx.TensorProto) -> bool:
    if t.data_type not in _SHAREABLE or t.HasField("segment"):
        return False
    n = int(np.prod([int(d) for d in t.dims])) if t.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize >= SHARE_MIN


def copy_without(model: onnx.ModelProto, initializers=()) -> onnx.ModelProto:
    """A copy of ``model`` whose graph holds only the given initializers
    (nothing else is copied byte for byte: the weights stay where they are)."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(out.graph, fd, value)
    out.graph.initializer.extend(initializers)
    return out


def _copy_field(msg, fd, value) -> None:
    if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:
        getattr(msg, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


class Runner:
    """The sessions of one check on one provider, over one store of weights."""

    def __init__(self, provider: str = "cpu"):
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise Fc2ConvError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
        want = PROVIDERS[provider]
        if want not in ort.get_available_providers():
            raise Fc2ConvError(f"provider {provider!r} is not available in this onnxruntime "
                               f"(it has {', '.join(ort.get_available_providers())}); "
                               + ("install onnxruntime-gpu instead of onnxruntime" if provider == "cuda" else ""))
        if provider == "cuda" and hasattr(ort, "preload_dlls"):
            try:  # onnxruntime-gpu finds CUDA/cuDNN from the nvidia pip packages this way
                ort.preload_dlls()
            except Exception:  # a missing library shows up below as a provider that cannot be created
                pass
        self.provider = provider
        # (dtype, nbytes) -> the distinct buffers that a Light or a session still
        # holds: weak, so that what no step needs any more is freed
        self._buckets: dict[tuple, list] = {}
        self._reused: dict[int, tuple] = {}   # id(model) -> (model, session): sessions asked for twice

    def keep(self, value: np.ndarray) -> np.ndarray:
        """``value``, or a view of an equal buffer already held."""
        key = (value.dtype.str, value.nbytes)
        bucket = self._buckets.setdefault(key, [])
        bucket[:] = [ref for ref in bucket if ref() is not None]
        for ref in bucket:
            held = ref()
            if held is not None and _same_bytes(held, value):
                return held.reshape(value.shape)
        value = np.ascontiguousarray(value)
        bucket.append(weakref.ref(value))
        return value

    def light(self, model) -> Light:
        """The light form of ``model`` (a ModelProto, a Light, or a path), its
        large initializers kept in this runner."""
        if isinstance(model, Light):
            return model
        if not isinstance(model, onnx.ModelProto):
            model = load(model, check=False, weights_in_file=True).model
        values, inits = {}, []
        for t in model.graph.initializer:
            if _shared(t) and not _is_header(t):
                values[t.name] = self.keep(_value(t))
                inits.append(_header(t))
            elif is_external(t) and not _is_header(t):  # a file onnxruntime would not read from a temporary folder
                inline = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
                inline.raw_data = external_bytes(t)
                inits.append(inline)
            else:
                inits.append(t)
        return Light(copy_without(model, inits), values)

    def session(self, model, what: str = "the model", reuse: bool = False, outputs=(), light: Light | None = None):
        """An onnxruntime session of ``model`` (a ModelProto, a Light or a path)
        on exactly the provider asked for. ``reuse``: the same session for the
        same model object when another step asks for it again (the runner
        then keeps it as long as it lives; the first asker's ``outputs``
        stand). ``outputs``: tensors of the graph that the session returns
        too, after its own outputs. ``light``: ``model``'s light form, made
        already."""
        if reuse and id(model) in self._reused:
            return self._reused[id(model)][1]
        sess = self._session(light or model, what, outputs)
        if reuse:
            self._reused[id(model)] = (model, sess)   # the model is held, so its id is not reused
        return sess

    def _session(self, model, what: str, outputs=()):
        import onnxruntime as ort

        light = self.light(model)
        have = {o.name for o in light.model.graph.output}
        extra = [t for t in outputs if t not in have]
        if extra:
            wider = copy_without(light.model, light.model.graph.initializer)   # headers: small
            wider.graph.output.extend(onnx.ValueInfoProto(name=t) for t in extra)
            light = Light(wider, light.values)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 4  # errors come back as exceptions; the C++ logger must not print them
        opts.add_session_config_entry("session.disable_prepacking", "1")  # no packed copy of shared weights
        kept = []
        for name, value in light.values.items():
            ov = ort.OrtValue.ortvalue_from_numpy(value)
            kept.append(ov)
            opts.add_initializer(name, ov)
        want = PROVIDERS[self.provider]
        providers = [want] if self.provider == "cpu" else [(want, {"use_tf32": "0"}), "CPUExecutionProvider"]
        with tempfile.TemporaryDirectory(prefix="onnx-fc2conv-") as tmp:
            # onnxruntime resolves a header's file from the model's folder: an
            # empty one is there, its bytes come from add_initializer
            (Path(tmp) / SHARED_FILE).touch()
            path = Path(tmp) / "model.onnx"
            if estimated_size(light.model) - sum(v.nbytes for v in light.values.values()) > PROTO_LIMIT:
                save(light.model, path, external_data=True)
            else:
                with open(path, "wb") as f:
                    f.write(light.model.SerializeToString())
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # onnxruntime's own words are the reason
                first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                raise Fc2ConvError(f"onnxruntime cannot load {what}: {first}") from None
        if sess.get_providers()[0] != want:
            raise Fc2ConvError(f"onnxruntime could not create the {self.provider!r} provider and fell back to "
                               f"{sess.get_providers()[0]}; refusing to check on another provider")
        sess._fc2conv_weights = kept  # the OrtValues (and their buffers) must outlive the session
        return sess


class Step:
    """An internal failure of a check's step (a bug, not a mismatch) is one
    line naming the check and the step (exit 2), never a traceback (kept as
    the cause, for --debug)."""

    def __init__(self, check: str, name: str):
        self.check, self.name = check, name

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (Fc2ConvError, KeyboardInterrupt)):
            return False
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise Fc2ConvError(f"the {self.check} check failed in its {self.name} step ({type(exc).__name__}: "
                           f"{first}); this is a bug of onnx-fc2conv, please report it with the model") from exc


def session(model, provider: str = "cpu", what: str = "the model"):
    """One session on its own (heatmap, scan): a Runner of its own."""
    return Runner(provider).session(model, what)


def run(sess, feeds: dict) -> dict:
    """Every output of one run, by name."""
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def np_dtype(elem_type: int):
    return helper.tensor_dtype_to_np_dtype(elem_type)


def concrete_shapes(model: onnx.ModelProto, overrides: dict[str, list[int]], batch: int = 2) -> dict[str, list[int]]:
    """A concrete shape for every graph input: overrides, else the declared
    shape with a free batch dim set to ``batch``; any other symbolic dim is
    an error naming the input."""
    shapes = {}
    for name, info in input_infos(model).items():
        if name in overrides:
            shapes[name] = [batch if isinstance(d, str) else d for d in overrides[name]]
            continue
        if info.shape is None:
            raise Fc2ConvError(f"input {name!r} has no declared shape; give it with --input-shape {name}=D0,D1,...")
        dims = []
        for axis, d in enumerate(info.shape):
            if isinstance(d, int):
                dims.append(d)
            elif axis == 0:
                dims.append(batch)
            else:
                shown = ",".join(str(x) if isinstance(x, int) else f"<{x or '?'}>" for x in info.shape)
                raise Fc2ConvError(f"input {name!r} has a symbolic dim {d or '?'!r} at axis {axis}; "
                                   f"give its size with --input-shape {name}={shown}")
        shapes[name] = dims
    return shapes


def random_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, info in input_infos(model).items():
        dt = np.dtype(np_dtype(info.elem_type))
        shape = shapes[name]
        if dt.kind == "f" or dt.name == "bfloat16":
            feeds[name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            feeds[name] = rng.integers(0, 4, size=shape).astype(dt)
        elif dt.kind == "b":
            feeds[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise Fc2ConvError(f"input {name!r} has dtype {dt}, which the check cannot generate; pass --inputs FILE.npz")
    return feeds


def load_inputs(model: onnx.ModelProto, path) -> dict[str, np.ndarray]:
    """Inputs from an .npz file, validated against the model's inputs."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            feeds = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise Fc2ConvError(f"{path}: no such file") from None
    except Exception as exc:  # numpy raises several types for a bad file
        raise Fc2ConvError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    infos = input_infos(model)
    missing = [n for n in infos if n not in feeds]
    extra = [n for n in feeds if n not in infos]
    if missing or extra:
        raise Fc2ConvError(f"{path}: inputs do not match the model: "
                           + (f"missing {', '.join(missing)}" if missing else "")
                           + ("; " if missing and extra else "")
                           + (f"unknown {', '.join(extra)}" if extra else "")
                           + f" (the model's inputs are: {', '.join(infos)})")
    for name, info in infos.items():
        arr = feeds[name]
        want = np.dtype(np_dtype(info.elem_type))
        if arr.dtype != want:
            raise Fc2ConvError(f"{path}: input {name!r} has dtype {arr.dtype}, the model wants {want}")
        if info.shape is not None and (len(info.shape) != arr.ndim or any(
                isinstance(d, int) and d != s for d, s in zip(info.shape, arr.shape))):
            raise Fc2ConvError(f"{path}: input {name!r} has shape {list(arr.shape)}, the model wants "
                               f"[{','.join(str(d) if isinstance(d, int) else '?' for d in info.shape)}]")
    return feeds
