"""The consumer matrix: what the converted models do in the tools people hand
them to next. Shared by tests/test_consumers.py (one test per model, mode and
consumer) and tools/consumer_matrix.py (the README's "Works with" table).

For every sample model (``models/*.onnx``) and exporter fixture
(``tests/fixtures/*.onnx``, the files present when it runs), in keep mode and
in dense mode (where the tool does not refuse it), the converted model is
saved with ``onnx_fc2conv.save`` and then:

- ``checker``: ``onnx.checker.check_model(path, full_check=True)`` and strict
  shape inference pass on the saved file;
- ``tract`` and ``openvino`` (CPU, f32 inference precision) load and run the
  saved file;
- ``onnxsim``, ``onnxslim``, ``onnxoptimizer`` rewrite it and onnxruntime
  runs the result;

and the outputs must equal onnxruntime's reference: the ORIGINAL model on
the same seeded inputs (keep mode; batch 2 where the batch dim is free), or
the dense model itself at the native size and at the native size plus two
strides on each spatial axis (dense mode). Tolerances are relative to the
output's magnitude: ``|got - ref| <= atol * max(1, max|ref|) + rtol * |ref|``.

A consumer that also fails on the ORIGINAL model (load, run or mismatch, at
the native size) cannot be asked to accept the converted one: that case is
:class:`NotApplicable` with the consumer's reason, which the test turns into a
printed skip. Every other problem raises. Where a consumer has more than one
usual way to run a model (tract: concrete input facts, or the file's symbolic
dims), the converted model must run the first way that ran the original.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_fc2conv import Fc2ConvError, convert, save

ROOT = Path(__file__).resolve().parent.parent
MODES = ("keep", "dense")
CONSUMERS = ("checker", "tract", "openvino", "onnxsim", "onnxslim", "onnxoptimizer")

# (rtol, atol relative to max(1, max|ref|)) by the output's dtype
TOLERANCE = {np.dtype(np.float16): (1e-2, 2e-3)}
DEFAULT_TOLERANCE = (1e-4, 1e-5)
SEED, LARGER_SEED = 0, 1


def model_files() -> dict[str, Path]:
    """Every sample model and exporter fixture (heads/ included), by file stem (a stem found in
    both folders gets its folder's name in front the second time)."""
    fixtures = ROOT / "tests" / "fixtures"
    files = sorted((ROOT / "models").glob("*.onnx")) + sorted(fixtures.glob("*.onnx")) \
        + sorted((fixtures / "heads").glob("*.onnx"))
    named: dict[str, Path] = {}
    for path in files:
        named[path.stem if path.stem not in named else f"{path.parent.name}/{path.stem}"] = path
    return named


class NotApplicable(Exception):
    """The case cannot be tried: dense mode refused (cell ``-``) or the
    consumer fails on the original model too (cell ``n/a``)."""

    def __init__(self, reason: str, cell: str):
        super().__init__(reason)
        self.cell = cell


class ConsumerError(Exception):
    """A consumer refused a model; the message is the consumer's, shortened."""


def short(exc: BaseException) -> str:
    """The consumer's message on one line: tract's context chain without its
    stack backtrace, other tools' first lines."""
    text = str(exc).split("Stack backtrace:")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() != "Caused by:"]
    lines = [re.sub(r"^\d+: ", "", ln) for ln in lines]
    if len(lines) > 3:  # the context chain: what failed, then its most specific causes
        lines = [lines[0], *lines[-2:]]
    return " / ".join(lines) or type(exc).__name__


# --- onnxruntime, the reference -------------------------------------------

def run_ort(model, feeds_list: list[dict]) -> list[dict]:
    """onnxruntime CPU with graph optimizations off, on a path or a ModelProto."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # a failure raises with its message; no second copy on stderr
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, feeds))) for feeds in feeds_list]


# --- the consumers ----------------------------------------------------------

_TRACT_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.float64): "f64",
                 np.dtype(np.int64): "i64", np.dtype(np.int32): "i32", np.dtype(np.uint8): "u8"}


def _run_tract(path: Path, feeds_list: list[dict], concrete: bool) -> list[dict]:
    """tract loads ONNX as an InferenceModel, types it (``into_model``) and
    runs it, once per input size. tract's typed model needs every input dim
    known or symbolic; the two usual ways to give them:

    - ``concrete`` (tract's documented way): each input's fact is set to its
      feed's shape and type. Files whose value_info names a symbol (a dynamo
      export's ``batch``) then fail to unify the number with the symbol;
    - symbolic: the file's own symbols stay (a free batch, dense mode's
      height and width) and are bound to the feed's sizes after typing
      (SetSymbols); only dims the file leaves unknown (none, or a negative
      number as paddle2onnx writes) get their size as an input fact. Files
      whose shapes tract can only compute from numbers (a tf2onnx Flatten's
      Shape -> Cast chain) then fail with "shape input is variable".

    tract names outputs after their nodes: they are matched to the ONNX
    outputs by position."""
    import tract

    declared = {i.name: i.type.tensor_type.shape.dim
                for i in onnx.load(str(path), load_external_data=False).graph.input}
    results = []
    for feeds in feeds_list:
        try:
            model = tract.onnx().load(str(path))
            inputs = [model.input_name(i) for i in range(model.input_count())]
            symbols = {}
            for i, name in enumerate(inputs):
                x, dims = feeds[name], declared[name]
                if concrete:
                    spec = [str(n) for n in x.shape]
                else:
                    symbols.update({d.dim_param: x.shape[a] for a, d in enumerate(dims) if d.HasField("dim_param")})
                    if all(d.HasField("dim_param") or d.dim_value > 0 for d in dims):
                        continue
                    spec = [d.dim_param if d.HasField("dim_param") else str(x.shape[a]) for a, d in enumerate(dims)]
                model.set_input_fact(i, ",".join([*spec, _TRACT_DTYPES[x.dtype]]))
            typed = model.into_model()
            if symbols:
                typed.transform(tract.SetSymbols(symbols))
            values = typed.into_runnable().run([feeds[name] for name in inputs])
        except tract.TractError as exc:
            raise ConsumerError(short(exc)) from None
        results.append([v.to_numpy() for v in values])
    return _by_name(path, results)


def run_tract(path: Path, feeds_list: list[dict]) -> list[dict]:
    """tract with concrete input facts."""
    return _run_tract(path, feeds_list, concrete=True)


def run_tract_symbolic(path: Path, feeds_list: list[dict]) -> list[dict]:
    """tract with the file's symbols kept, bound after typing."""
    return _run_tract(path, feeds_list, concrete=False)


def _by_name(path: Path, results: list[list]) -> list[dict]:
    names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    for values in results:
        if len(values) != len(names):
            raise ConsumerError(f"{len(values)} outputs, the model has {len(names)}")
    return [dict(zip(names, values)) for values in results]


_OV_CORE = None


def run_openvino(path: Path, feeds_list: list[dict]) -> list[dict]:
    """OpenVINO CPU at f32 inference precision (on a CPU with bf16 support it
    would otherwise compute in bf16). Compiled once; dynamic dims stay
    dynamic. Outputs are matched to the ONNX outputs by position (OpenVINO
    may name an output after its node)."""
    import openvino as ov

    global _OV_CORE
    if _OV_CORE is None:
        _OV_CORE = ov.Core()
    try:
        compiled = _OV_CORE.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        results = []
        for feeds in feeds_list:
            got = compiled(feeds)
            # the arrays live in the request's buffers: copy before the next run
            results.append([np.array(got[out], copy=True) for out in compiled.outputs])
    except RuntimeError as exc:
        raise ConsumerError(short(exc)) from None
    return _by_name(path, results)


def _rewritten_by(tool: str):
    def rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
        if tool == "onnxsim":
            import onnxsim
            return onnxsim.simplify(model)[0]
        if tool == "onnxslim":
            import onnxslim
            return onnxslim.slim(model)
        import onnxoptimizer
        return onnxoptimizer.optimize(model)

    def runner(path: Path, feeds_list: list[dict]) -> list[dict]:
        """The tool rewrites the saved model; onnxruntime runs the result."""
        try:
            rewritten = rewrite(onnx.load(str(path)))
        except Exception as exc:  # each tool raises its own types; the message is what matters
            raise ConsumerError(short(exc)) from None
        if not isinstance(rewritten, onnx.ModelProto):
            raise ConsumerError(f"returned {type(rewritten).__name__}, not a model")
        try:
            return run_ort(rewritten, feeds_list)
        except Exception as exc:
            raise ConsumerError(f"onnxruntime cannot run the result: {short(exc)}") from None
    return runner


# Each consumer's ways of running a model, tried in this order on the
# ORIGINAL model; the converted model must then run the first way that ran
# the original (a user who got the original through one way uses it again).
RUNNERS = {"tract": {"concrete input facts": run_tract, "symbolic dims": run_tract_symbolic},
           "openvino": {"": run_openvino}, "onnxsim": {"": _rewritten_by("onnxsim")},
           "onnxslim": {"": _rewritten_by("onnxslim")}, "onnxoptimizer": {"": _rewritten_by("onnxoptimizer")}}


def versions() -> dict[str, str]:
    import onnxoptimizer
    import onnxsim
    import onnxslim
    import openvino
    import tract

    return {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "tract": tract.version(),
            "openvino": openvino.get_version().split("-")[0], "onnxsim": onnxsim.__version__.lstrip("v"),
            "onnxslim": onnxslim.__version__, "onnxoptimizer": onnxoptimizer.__version__}


# --- checks -----------------------------------------------------------------

def check_strict(path: Path) -> None:
    """What strict readers (tract, onnx2torch, deployment compilers) start
    with: the full checker and strict, type-checking shape inference."""
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)


def compare(got: list[dict], refs: list[dict], feeds_list: list[dict]) -> None:
    """Every reference output is there, with its shape and dtype, and within
    tolerance; AssertionError names the output, the input size and the error."""
    for outs, ref, feeds in zip(got, refs, feeds_list):
        size = " ".join("x".join(map(str, x.shape)) for x in feeds.values())
        for name, e in ref.items():
            assert name in outs, f"output {name!r} missing (got {sorted(outs)}) at input {size}"
            a = np.asarray(outs[name])
            where = f"output {name!r} at input {size}"
            assert a.shape == e.shape, f"{where}: shape {list(a.shape)}, expected {list(e.shape)}"
            assert a.dtype == e.dtype, f"{where}: dtype {a.dtype}, expected {e.dtype}"
            rtol, atol = TOLERANCE.get(e.dtype, DEFAULT_TOLERANCE)
            e64, a64 = e.astype(np.float64), a.astype(np.float64)
            atol *= max(1.0, float(np.max(np.abs(e64)))) if e.size else 1.0
            err = np.abs(a64 - e64)
            bad = ~(err <= atol + rtol * np.abs(e64))  # NaN counts as bad
            assert not bad.any(), (f"{where}: {int(bad.sum())} of {bad.size} values differ, "
                                   f"max abs err {np.nanmax(err):.3g} (allowed {atol:.2g} + {rtol:g}*|ref|)")


# --- the matrix -------------------------------------------------------------

def native_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = SEED) -> dict:
    """Seeded inputs at the declared sizes, ``batch`` where a dim is free."""
    from helpers import feeds_for

    return feeds_for(model, batch, seed)


@dataclass
class Case:
    """One converted model, saved, with the inputs to run it on and the
    onnxruntime outputs it must give."""
    path: Path
    feeds: list[dict]
    refs: list[dict]


@dataclass
class Original:
    feeds: dict
    refs: dict


@contextlib.contextmanager
def _lenient():
    """The test suite makes convert() assert the strict checks (conftest.py).
    Here the ``checker`` consumer asserts them on every saved file, so the
    conversion goes through regardless and each consumer's verdict stays its own."""
    saved = os.environ.pop("ONNX_FC2CONV_STRICT", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ONNX_FC2CONV_STRICT"] = saved


class Matrix:
    """Converts each model once per mode, runs each original once per
    consumer, and answers :meth:`check` for every (model, mode, consumer)."""

    def __init__(self, folder: Path, models: dict[str, Path] | None = None):
        self.folder = Path(folder)
        self.models = models if models is not None else model_files()
        self._cases: dict = {}
        self._originals: dict = {}
        self._original_ways: dict = {}

    def original(self, name: str) -> Original:
        if name not in self._originals:
            path = self.models[name]
            feeds = native_feeds(onnx.load(str(path), load_external_data=False))
            self._originals[name] = Original(feeds, run_ort(path, [feeds])[0])
        return self._originals[name]

    def case(self, name: str, mode: str) -> Case:
        """Convert and save (cached; a dense refusal is cached too)."""
        key = (name, mode)
        if key not in self._cases:
            try:
                self._cases[key] = self._convert(name, mode)
            except NotApplicable as exc:
                self._cases[key] = exc
        case = self._cases[key]
        if isinstance(case, NotApplicable):
            raise case
        return case

    def _convert(self, name: str, mode: str) -> Case:
        path = self.models[name]
        original = self.original(name)
        try:
            with _lenient():
                result = convert(path, dense=(mode == "dense"))
        except Fc2ConvError as exc:
            if mode == "dense":
                raise NotApplicable(f"dense mode refused: {exc}", "-") from None
            raise
        out = self.folder / f"{name.replace('/', '_')}_{mode}.onnx"
        save(result.model, out)
        if mode == "keep":
            return Case(out, [original.feeds], [original.refs])
        feeds = [original.feeds, self._larger_feeds(name, result)]
        return Case(out, feeds, run_ort(out, feeds))

    def _larger_feeds(self, name: str, result) -> dict:
        """The native inputs grown by two strides on each spatial axis: the
        axes the original fixes and the dense model made symbolic."""
        declared = {i.name: i.type.tensor_type.shape.dim
                    for i in onnx.load(str(self.models[name]), load_external_data=False).graph.input}
        rng = np.random.default_rng(LARGER_SEED)
        feeds = {}
        for inp in result.model.graph.input:
            if inp.name not in self.original(name).feeds:
                continue
            x = self.original(name).feeds[inp.name]
            dims = inp.type.tensor_type.shape.dim
            spatial = [a for a, d in enumerate(dims)
                       if d.HasField("dim_param") and declared[inp.name][a].dim_value > 0]
            shape = list(x.shape)
            if spatial:
                assert all(len(g["axes"]) == len(spatial) for g in result.geometry), (
                    f"{inp.name}: {len(spatial)} symbolic spatial axes, geometry {result.geometry}")
                for j, a in enumerate(spatial):
                    shape[a] += 2 * math.lcm(*(g["axes"][j]["stride"] for g in result.geometry))
            feeds[inp.name] = rng.standard_normal(shape).astype(x.dtype)
        return feeds

    def original_way(self, name: str, consumer: str):
        """The first of ``consumer``'s ways that runs the original model at its
        native size with onnxruntime's outputs; NotApplicable with every
        way's reason when none does."""
        key = (name, consumer)
        if key not in self._original_ways:
            original = self.original(name)
            problems = []
            for label, way in RUNNERS[consumer].items():
                try:
                    compare(way(self.models[name], [original.feeds]), [original.refs], [original.feeds])
                    self._original_ways[key] = way
                    break
                except Exception as exc:  # any failure of the consumer on the original
                    problems.append(f"{label}: {short(exc)}" if label else short(exc))
            else:
                self._original_ways[key] = NotApplicable(
                    f"{consumer} fails on the original model too: {'; '.join(problems)}", "n/a")
        way = self._original_ways[key]
        if isinstance(way, NotApplicable):
            raise way
        return way

    def check(self, name: str, mode: str, consumer: str) -> None:
        """Raises NotApplicable (dense refused, or the consumer fails on the
        original too), or anything else when the converted model fails."""
        case = self.case(name, mode)
        if consumer == "checker":
            check_strict(case.path)
            return
        way = self.original_way(name, consumer)
        compare(way(case.path, case.feeds), case.refs, case.feeds)

    def outcome(self, name: str, mode: str, consumer: str) -> tuple[str, str]:
        """(cell, reason) for the table: ``ok``, ``FAIL``, ``n/a`` or ``-``."""
        try:
            self.check(name, mode, consumer)
        except NotApplicable as exc:
            return exc.cell, str(exc)
        except Exception as exc:  # the table records every failure, whatever raised it
            return "FAIL", short(exc)
        return "ok", ""
