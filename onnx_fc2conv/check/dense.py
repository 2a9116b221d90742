"""The dense-mode check: prove the window property against the ORIGINAL model.

For each head, with ``T`` the trunk map the head reads and ``(h, w)`` its
native size, the original model is cut in two and both halves run in
onnxruntime: the trunk (input -> T, with symbolic spatial dims) on a larger
input, and the head (T -> outputs) on each window ``T[:, :, i:i+h, j:j+w]``.
Each window's head output must equal ``dense[..., i, j]``. Larger inputs are
the native size + 2 strides per spatial axis and a non-square size; all
positions are checked on small maps, a seeded sample on large ones. At the
native size the dense map is 1x1 and must equal the original output.

Pixel crops. When no op of the trunk pads (offset 0), a position is also a
pixel crop: ``dense[..., i, j]`` must equal the original run on the pixels
that position sees, ``x[..., i*s : i*s + rf]`` along each axis (``rf`` the
position's receptive field from the geometry), clipped to the image as the
trunk sees it. ``rf`` is not always the native size ``n``:

- ``n > rf``: floor-mode pools drop the last ``n - rf`` pixels; the crop is
  ``n`` pixels (the original's own input) and equal by construction;
- ``n < rf``: ceil-mode pools pool a partial window at the border of the
  native input, while the map's position sees ``rf`` pixels. The crop is
  ``rf`` pixels, run on the original with its spatial dims free; where the
  original cannot take that size, or in addition where it can, the
  classifier on its ``n``-pixel crop is compared too and the figure goes to a
  NOTE: it differs from the window by construction, so it is not a verdict.

With zero padding the crops and the windows legitimately differ (a crop sees
zeros where the big image has pixels): only the windows are compared.

Translation equivariance. The two comparisons above run the ORIGINAL trunk,
which the dense model shares: they test the head, not whether the trunk is
the same local function at every position. Along each spatial input axis,
with ``s`` the map's stride, ``rf`` the full receptive field of a position
and ``off`` its offset, take ``x`` of length ``L`` and its two crops
``xa = x[0 : L-s]`` and ``xb = x[s : L]``. Where neither window reaches the
border (``off + p*s >= 0`` and ``off + (p+1)*s + rf - 1 <= L-s-1``) a trunk
that acts the same at every position gives::

    dense(xb)[..., p, ...] == dense(xa)[..., p+1, ...]

A position-mixing op (a normalisation over H and W, a Softmax that flattens
C*H*W) breaks it. ``L - s`` is the native size plus a whole number of strides
(so SAME padding and floor rounding stay as at the native size), large enough
for at least two such positions; the other axes stay native. Global pools the
plan keeps global make every position depend on the whole image by design:
the test then does not apply and the report says so.

The trunk's maps ``T`` come from the dense model's own runs (extra outputs)
where it computes them with the original trunk's nodes, inputs and weights,
byte for byte (``_same_trunk``): the same computation, one run fewer per
size. Otherwise the original's trunk runs on its own.

Outputs are compared as in the keep check (compare.py), quantized outputs in
quantization steps. Memory: the sessions share one store of weights
(run.py), the analysis of the original is dropped before any session runs,
and the head runs on window batches of bounded size.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ..probe import fill
from .. import dense as dense_mod, find, shapes as shapes_mod
from ..errors import Fc2ConvError
from ..graph import node_key
from ..load import load
from .compare import CheckReport, Comparisons, quant_steps
from .keep import check_models
from .run import Light, Runner, Step, _same_bytes, np_dtype, random_inputs, run

MAX_POSITIONS = 48
# The shift test enlarges one axis at a time up to this many times its native
# size (or native + MAX_SHIFT_STEPS strides, if more) to find interior positions.
MAX_SHIFT_FACTOR = 16
MAX_SHIFT_STEPS = 64
WINDOW_BATCH_BYTES = 64 << 20     # the head's input per run, at least (more for a larger model)


@dataclass(frozen=True)
class HeadFacts:
    source: str          # T
    window: tuple        # T's native spatial size
    outputs: tuple
    geometry: tuple      # geometry.Axis per spatial axis of the map
    axes: tuple = ()     # T's spatial axes (2.., or a channels-last map's own)

    def rf(self, k: int) -> int:
        """The full receptive field of a position along map axis ``k``."""
        a = self.geometry[k]
        return a.receptive_field + (self.window[k] - 1) * a.stride


@dataclass
class Facts:
    """What the check needs of the dense analysis, as plain data, so that the
    original's graph (and its weights) can go before the sessions run."""
    heads: list
    image_inputs: dict
    native: dict
    sizes: list
    kept_global: list                  # "op 'name'" of trunk pools kept global
    notes: list = field(default_factory=list)
    out_types: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)      # quantization steps per output
    in_infos: dict = field(default_factory=dict)
    batch_free: bool = True

    @property
    def crops_apply(self) -> bool:
        return (all(not a.padded and a.offset == 0 for h in self.heads for a in h.geometry)
                and not self.kept_global)


def check_dense(original, converted, *, provider="cpu", atol=None, rtol=None, input_shapes=None, seed: int = 0,
                batch: int = 2, runner: Runner | None = None) -> CheckReport:
    """The dense check of ``converted`` against ``original`` (paths or
    ModelProtos; a path is read here and its graph dropped once cut)."""
    overrides = input_shapes or {}
    runner = runner or Runner(provider)
    orig = original if isinstance(original, onnx.ModelProto) else load(original, check=False, weights_in_file=True).model
    with Step("dense", "analysis"):
        infos = shapes_mod.infer(orig, overrides)
        fill(orig, infos, overrides)   # shapes ONNX inference leaves unknown, read as convert read them
        heads, layers = find.find_heads(orig, infos)
    if not heads:  # nothing was made dense: the models must simply be equal
        conv_proto = converted if isinstance(converted, onnx.ModelProto) else load(converted, check=False).model
        return check_models(orig, converted, provider=provider, atol=atol, rtol=rtol, input_shapes=input_shapes,
                            seed=seed, converted_proto=conv_proto, runner=runner)
    with Step("dense", "analysis"):
        facts, parts = _cut(orig, infos, heads, layers, overrides, runner)
    del orig, infos, heads, layers   # the sessions read the runner's weights only
    found = Comparisons(atol, rtol)
    errors: list[str] = []
    rng = np.random.default_rng(seed)
    native_shapes = {n: _concrete(facts, n, batch) for n in facts.in_infos}
    with Step("dense", "session"):
        s_orig = runner.session(parts["original"], "the original model")
    with Step("dense", "session"):
        conv_light = runner.light(converted)
        # the trunk's maps from the dense model's own runs where it computes
        # them with the original trunk's nodes, weights and inputs (bit for bit
        # the same computation); else the original's trunk runs on its own
        shared = _same_trunk(conv_light, parts["trunk"], parts["trunk_outputs"])
    try:
        s_dense = runner.session(converted, "the dense model", reuse=True,
                                 outputs=parts["trunk_outputs"] if shared else (), light=conv_light)
    except Fc2ConvError as exc:
        return CheckReport(False, provider, 0, native_shapes, [], [str(exc)], "dense")
    del conv_light
    _native(facts, s_orig, s_dense, native_shapes, seed, parts["original"].model, found, errors)
    with Step("dense", "session"):
        s_trunk = None if shared else runner.session(parts["trunk"], "the original's trunk")
        s_heads = [runner.session(light, "the original's head") for light in parts["heads"]]
    crops = _Crops(facts, runner, parts, s_orig, native_shapes)
    for size in facts.sizes:
        shapes = {n: _concrete(facts, n, batch, size.get(n)) for n in facts.in_infos}
        feeds = random_inputs(parts["original"].model, shapes, int(rng.integers(1 << 30)))
        try:
            dense_out = run(s_dense, feeds)
        except Exception as exc:  # a dense model that cannot run at this size fails its check
            errors.append(f"onnxruntime cannot run the dense model on inputs "
                          f"{ {k: list(v.shape) for k, v in feeds.items()} }: {str(exc).splitlines()[0]}")
            continue
        with Step("dense", "trunk"):
            t_out = dense_out if s_trunk is None else run(s_trunk, feeds)
        label = "x".join(str(shapes[n][a]) for n in facts.image_inputs for a in sorted(facts.image_inputs[n]))
        for h, s_head in zip(facts.heads, s_heads):
            positions = _windows(facts, h, s_head, t_out[h.source], dense_out, label, rng, found, errors)
            if positions and facts.crops_apply:
                with Step("dense", "pixel crops"):
                    crops.compare(h, feeds, positions, dense_out, label, found)
    notes = list(facts.notes) + crops.lines()
    del s_trunk, s_heads, s_orig, crops, parts   # the shift test runs the dense model only
    with Step("dense", "translation equivariance"):
        shift_runs = _shift(facts, s_dense, native_shapes, rng, found, errors, notes)
    runs = 1 + len(facts.sizes) + shift_runs
    return found.report(provider, runs, native_shapes, errors, "dense", notes)


# ------------------------------------------------------------------ the cut ---

def _cut(orig: onnx.ModelProto, infos, heads, layers, overrides, runner: Runner):
    """The dense plan of the original (leniently: the check must still run,
    and fail by measurement, on a dense model whose trunk conversion would
    refuse; what conversion would refuse becomes notes) and the original cut
    into its trunk and heads, every part light (weights in ``runner``)."""
    plan = dense_mod.analyse(orig, infos, heads, layers, overrides, lenient=True)
    in_infos = shapes_mod.input_infos(orig)
    op_of = {n.name: n.op_type for n in orig.graph.node}
    out_types = {o.name: o.type.tensor_type.elem_type for o in orig.graph.output}
    facts = Facts([HeadFacts(h.source, tuple(h.window), tuple(h.outputs), tuple(h.geometry), tuple(h.source_axes)) for h in plan.heads],
                  {k: set(v) for k, v in plan.image_inputs.items()}, {k: list(v) for k, v in plan.native.items()},
                  dense_mod.window_sizes(plan),
                  [f"{op_of[k]} {k!r}" if k in op_of else repr(k) for k in plan.kept_global],
                  [f"NOTE  {r}" for r in plan.refusals], out_types, quant_steps(orig), in_infos)
    for name in facts.image_inputs:
        declared = in_infos[name].shape
        given = overrides.get(name)
        facts.batch_free = facts.batch_free and not isinstance(declared[0], int) and (
            given is None or not isinstance(given[0], int))
    trunk_outputs = sorted({h.source for h in plan.heads})
    trunk_source = orig
    if plan.trunk_reshapes:
        # Reshapes that pin the native size (a channel shuffle) cannot run the
        # original's trunk on a larger input: use it with those Reshapes taking
        # their shape from their input, the only change dense mode makes there
        # (the native-size comparison covers the original end to end).
        from .. import rewrite
        from ..graph import GraphIndex
        from ..plan import Namer, plan_trunk_fixes

        trunk_source = onnx.ModelProto()
        trunk_source.CopyFrom(orig)
        fixed = dense_mod.analyse(trunk_source, infos, find.find_heads(trunk_source, infos)[0], layers, overrides,
                                  lenient=True)
        rewrite.apply(trunk_source, plan_trunk_fixes(GraphIndex(trunk_source), Namer(trunk_source.graph), fixed))
    whole = runner.light(orig)
    trunk_light = whole if trunk_source is orig else runner.light(trunk_source)
    trunk_inputs = []
    for name, info in in_infos.items():
        dims = list(info.shape)
        for axis in plan.image_inputs.get(name, ()):
            dims[axis] = f"s{axis}"
        trunk_inputs.append(_vi(name, info.elem_type, dims))
    elem_of = {t: infos[t].elem_type for t in trunk_outputs}
    trunk = _part(trunk_light, _cone(trunk_light.model, trunk_outputs, set()), trunk_inputs,
                  [_vi(t, elem_of[t], None) for t in trunk_outputs])
    head_parts = []
    for h in plan.heads:
        nodes = _cone(whole.model, list(h.outputs), {h.source})
        read = {i for n in nodes for i in n.input}
        tshape = list(infos[h.source].shape)
        # the batch is free in the head: the check feeds it window batches
        inputs = [_vi(h.source, elem_of[h.source], ["B"] + tshape[1:])]
        inputs += [_vi(n, in_infos[n].elem_type, list(in_infos[n].shape)) for n in in_infos
                   if n in read and n != h.source]
        head_parts.append(_part(whole, nodes, inputs, [_vi(o, out_types[o], None) for o in h.outputs]))
    return facts, {"original": whole, "trunk": trunk, "trunk_outputs": trunk_outputs, "heads": head_parts}


def _same_trunk(dense: Light, trunk: Light, outputs) -> bool:
    """Whether the dense model computes ``outputs`` (the trunk's maps) with
    the nodes of the original's trunk, byte for byte, from the same graph
    inputs (name and type) and the same weights (bytes): then onnxruntime
    runs the same kernels on the same values, and the dense model's own
    run gives the maps the trunk's run would. Anything else (a node that
    differs, a subgraph, another opset) is answered False: the trunk runs."""
    model = dense.model
    produced = {o for n in model.graph.node for o in n.output}
    if any(t not in produced for t in outputs):
        return False
    mine = _cone(model, outputs, set())
    theirs = list(trunk.model.graph.node)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in mine for a in n.attribute):
        return False
    if sorted(n.SerializeToString() for n in mine) != sorted(n.SerializeToString() for n in theirs):
        return False
    if sorted((o.domain, o.version) for o in model.opset_import) != \
            sorted((o.domain, o.version) for o in trunk.model.opset_import) or \
            len(model.functions) != len(trunk.model.functions) or any(
            a.SerializeToString() != b.SerializeToString() for a, b in zip(model.functions, trunk.model.functions)):
        return False
    made = {o for n in mine for o in n.output}
    read = {i for n in mine for i in n.input if i and i not in made}
    inits = [{t.name: t for t in m.graph.initializer} for m in (model, trunk.model)]
    inputs = [{i.name: i.type.tensor_type.elem_type for i in m.graph.input} for m in (model, trunk.model)]
    for name in read:
        a, b = (m.get(name) for m in inits)
        if (a is None) != (b is None):
            return False
        if a is None:   # a graph input of both, of one type
            if name not in inputs[0] or inputs[0][name] != inputs[1].get(name):
                return False
        elif name in dense.values or name in trunk.values:
            va, vb = dense.values.get(name), trunk.values.get(name)
            if va is None or vb is None or va.shape != vb.shape or not _same_bytes(va, vb):
                return False
        elif a.SerializeToString() != b.SerializeToString():
            return False
    return True


def _cone(model: onnx.ModelProto, outputs, stop) -> list[onnx.NodeProto]:
    producer = {o: n for n in model.graph.node for o in n.output}
    keep, stack, seen = set(), list(outputs), set()
    while stack:
        t = stack.pop()
        if t in seen or t in stop:
            continue
        seen.add(t)
        n = producer.get(t)
        if n is None or node_key(n) in keep:
            continue
        keep.add(node_key(n))
        stack.extend(i for i in n.input if i)
    return [n for n in model.graph.node if node_key(n) in keep]


def _part(light: Light, nodes, inputs: list, outputs: list) -> Light:
    """A light model of ``nodes`` cut from ``light`` (its headers, its values)."""
    model = light.model
    read = {i for n in nodes for i in n.input if i}
    inits = [t for t in model.graph.initializer if t.name in read]
    graph = helper.make_graph(nodes, "part", inputs, outputs, inits)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=max(model.ir_version, 4))
    sub.functions.extend(model.functions)
    return Light(sub, {k: v for k, v in light.values.items() if k in read})


def _vi(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def _concrete(facts: Facts, name: str, batch: int, dims_override=None) -> list[int]:
    """An input's shape: the native (or given) size, the batch ``batch`` where
    it is free (and not fixed by --input-shape), else as declared or given."""
    info = facts.in_infos[name]
    dims = list(dims_override or facts.native.get(name) or info.shape)
    if facts.batch_free and not isinstance(info.shape[0], int):
        dims[0] = batch
    elif not isinstance(dims[0], int):
        dims[0] = info.shape[0] if isinstance(info.shape[0], int) else batch
    return [int(d) for d in dims]


# ------------------------------------------------------------------- steps ---

def _native(facts, s_orig, s_dense, native_shapes, seed, model, found, errors) -> None:
    """At the native size the map is 1x1 and equals the original output."""
    feeds = random_inputs(model, native_shapes, seed)
    try:
        expected = run(s_orig, feeds)
    except Exception as exc:  # a model that cannot run is bad input
        raise Fc2ConvError(f"onnxruntime cannot run the original model: {str(exc).splitlines()[0]}") from None
    try:
        got = run(s_dense, feeds)
    except Exception as exc:
        errors.append(f"onnxruntime cannot run the dense model at the native size: {str(exc).splitlines()[0]}")
        return
    for name, e in expected.items():
        if name not in got:
            errors.append(f"output {name!r} is missing from the dense model")
            continue
        a = got[name]
        if a.size != e.size:
            errors.append(f"output {name!r}: at the native size the dense output has shape {list(a.shape)}, "
                          f"expected {list(e.shape)} with 1x1 maps")
            continue
        found.add(f"{name} @native", e, a.reshape(e.shape), facts.out_types.get(name, 0), _step(facts, name, e))


def _step(facts: Facts, name: str, like: np.ndarray):
    """The output's quantization step, shaped for ``like`` (a per-axis step
    runs along the class axis, 1, in the dense map as in the original)."""
    step = facts.steps.get(name)
    if step is None or step.ndim == 0:
        return step
    return step.reshape([-1 if i == 1 else 1 for i in range(like.ndim)])


def _windows(facts, h: HeadFacts, s_head, t, dense_out, label, rng, found, errors) -> list:
    """The original's head on the windows of its trunk's map against the
    dense map; returns the positions compared."""
    win = h.window
    grid = [t.shape[h.axes[k]] - win[k] + 1 for k in range(len(win))]
    if any(g < 1 for g in grid):
        errors.append(f"the map {h.source!r} is smaller than the window at input size {label}")
        return []
    for o in h.outputs:
        shape = list(dense_out[o].shape[-len(win):])
        if shape != grid:
            errors.append(f"output {o!r} at input size {label}: map {shape}, expected {grid}")
            return []
    positions = list(itertools.product(*[range(g) for g in grid]))
    if len(positions) > MAX_POSITIONS:
        picks = rng.choice(len(positions), MAX_POSITIONS, replace=False)
        positions = [positions[i] for i in sorted(picks)]
    with Step("dense", "head"):
        results = _run_head(facts, s_head, h, t, positions)
    for o in h.outputs:
        e = np.stack([r[o] for r in results])
        a = np.stack([dense_out[o][(Ellipsis,) + pos] for pos in positions])
        found.add(f"{o} @{label} windows", e, a, facts.out_types.get(o, 0), _step(facts, o, e[0]))
    return positions


def _run_head(facts: Facts, s_head, h: HeadFacts, t: np.ndarray, positions) -> list[dict]:
    """The head on each window, in batches of bounded size where the batch is
    free (one window at a time where the model fixes it)."""
    extra = [i.name for i in s_head.get_inputs() if i.name != h.source]

    def feeds_for(x):
        f = {h.source: x}
        for n in extra:  # another graph input the head reads (zeros: it is the same for the dense model)
            dims = [x.shape[0]] + list(facts.native.get(n, facts.in_infos[n].shape))[1:]
            f[n] = np.zeros(dims, dtype=np_dtype(facts.in_infos[n].elem_type))
        return f

    def window(pos):
        cut = [slice(None)] * t.ndim
        for ax, p, w in zip(h.axes, pos, h.window):
            cut[ax] = slice(p, p + w)
        return t[tuple(cut)]

    n = t.shape[0]
    per = max(1, WINDOW_BATCH_BYTES // max(1, window(positions[0]).nbytes)) if facts.batch_free else 1
    results = []
    for i in range(0, len(positions), per):
        group = positions[i:i + per]
        out = run(s_head, feeds_for(np.ascontiguousarray(np.concatenate([window(p) for p in group], axis=0))))
        for j in range(len(group)):
            results.append({o: out[o][j * n:(j + 1) * n] for o in h.outputs})
    return results


class _Crops:
    """The original on the pixels each position sees (module docstring)."""

    def __init__(self, facts: Facts, runner: Runner, parts: dict, s_orig, native_shapes):
        self.facts, self.runner, self.parts, self.s_orig = facts, runner, parts, s_orig
        self.native_shapes = native_shapes
        self._free = None          # the original with free spatial dims, built when needed
        self.notes: list = []      # native-size crops where a position sees more than the native size
        self.skipped: list = []

    def free(self):
        if self._free is None:
            whole: Light = self.parts["original"]
            model = onnx.ModelProto()
            model.CopyFrom(whole.model)  # light: headers only
            for inp in model.graph.input:
                for axis in self.facts.image_inputs.get(inp.name, ()):
                    d = inp.type.tensor_type.shape.dim[axis]
                    d.Clear()
                    d.dim_param = f"{inp.name}_s{axis}"
            self._free = self.runner.session(Light(model, whole.values), "the original with free spatial dims")
        return self._free

    def compare(self, h: HeadFacts, feeds, positions, dense_out, label, found) -> None:
        facts = self.facts
        natives = [self.native_shapes[a.input][a.input_axis] for a in h.geometry]
        rfs = [h.rf(k) for k in range(len(h.geometry))]
        span = [max(n, rf) for n, rf in zip(natives, rfs)]
        exact, by_native, skipped = [], [], 0
        for pos in positions:
            crop = self._crop(h, feeds, pos, span, clip=True)
            got = None
            if all(crop[a.input].shape[a.input_axis] == n for a, n in zip(h.geometry, natives)):
                got = run(self.s_orig, crop)
            else:
                try:
                    got = run(self.free(), crop)
                except Exception:  # the original does not take this size (a Reshape, a fixed FC)
                    got = None
            if got is not None:
                exact.append((pos, got))
            else:
                skipped += 1
            if any(rf > n for n, rf in zip(natives, rfs)):
                crop = self._crop(h, feeds, pos, natives, clip=False)
                if crop is not None:
                    by_native.append((pos, run(self.s_orig, crop)))
        for o in h.outputs:
            if exact:
                e = np.stack([g[o] for _, g in exact])
                a = np.stack([dense_out[o][(Ellipsis,) + pos] for pos, _ in exact])
                found.add(f"{o} @{label} pixel crops", e, a, facts.out_types.get(o, 0), _step(facts, o, e[0]))
            if by_native:
                e = np.stack([g[o] for _, g in by_native])
                a = np.stack([dense_out[o][(Ellipsis,) + pos] for pos, _ in by_native])
                diff = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)))) if e.size else 0.0
                self.notes.append((o, label, diff, len(by_native), natives, rfs, len(exact)))
        if skipped:
            self.skipped.append((h.outputs, label, skipped, span))

    def lines(self) -> list[str]:
        out = []
        for o, label, diff, n, natives, rfs, exact in self.notes:
            size = "x".join(map(str, natives))
            window = "x".join(map(str, rfs))
            out.append(f"NOTE  {o} @{label} native-size crops: a position sees {window} px, the classifier's own "
                       f"input is {size} (its pools take a partial window at the border, as ceil-mode pools do): "
                       f"on {size} crops it differs from the map by max abs {diff:.3g} at {n} position"
                       f"{'s' if n != 1 else ''}, by construction, not a verdict; "
                       + (f"the {window} px crops above are compared" if exact else
                          f"the original does not run on {window} px crops, the windows above prove the map"))
        for outputs, label, n, span in self.skipped:
            out.append(f"NOTE  {', '.join(outputs)} @{label} pixel crops: {n} position{'s' if n != 1 else ''} "
                       f"not compared (the original does not run on its {'x'.join(map(str, span))} px crop "
                       "clipped to the image); the windows prove them")
        return out

    def _crop(self, h: HeadFacts, feeds, pos, span, clip: bool):
        """The crop of ``span`` pixels per axis at ``pos``, clipped to the
        image (None where it does not fit and ``clip`` is off)."""
        out = dict(feeds)
        for a, p, n in zip(h.geometry, pos, span):
            x = out[a.input]
            start = a.offset + p * a.stride
            stop = min(start + n, x.shape[a.input_axis])
            if stop < start + n and not clip:
                return None
            idx = [slice(None)] * x.ndim
            idx[a.input_axis] = slice(start, stop)
            out[a.input] = x[tuple(idx)]
        return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _shift(facts: Facts, s_dense, native_shapes, rng, found: Comparisons, errors, notes) -> int:
    """Compare dense(x[s:]) with dense(x[:-s]) shifted by one position, per
    image input axis and map stride; returns the number of dense runs."""
    kept = facts.kept_global
    if kept:
        named = ", ".join(kept[:3])
        if len(kept) > 3:
            named = f"{len(kept)} pools ({named} and {len(kept) - 3} more)"
        notes.append(f"SKIPPED  translation equivariance: does not apply, the trunk keeps {named} global over "
                     "the whole input (--keep-global-pools), so every position depends on the whole image by design")
        return 0
    several = len(facts.image_inputs) > 1
    groups: dict[tuple, list] = {}
    for h in facts.heads:
        for k, a in enumerate(h.geometry):
            groups.setdefault((a.input, a.input_axis, a.stride), []).append((h, k, a))
    # Batch 1 where the batch dim is free: the test is per image and the sizes can be large.
    base = {n: [1 if (i == 0 and facts.batch_free) else d for i, d in enumerate(dims)]
            for n, dims in native_shapes.items()}
    runs = 0
    for (inp, axis, s), members in groups.items():
        native = base[inp][axis]
        where = f"{inp} axis {axis}" if several else f"axis {axis}"
        spans = [(h.rf(k), a.offset, max(0, math.ceil(-a.offset / s))) for h, k, a in members]
        # Two positions p = p0, p0+1 need off + (p0+2)*s + rf - 1 <= L' - 1.
        need = max(rf + off + (p0 + 2) * s for rf, off, p0 in spans)
        steps = max(1, math.ceil((need - native) / s))
        cap = max(MAX_SHIFT_FACTOR * native, native + MAX_SHIFT_STEPS * s)
        steps = min(steps, max(1, (cap - native) // s - 1))
        length = native + steps * s  # L' = L - s, the size of both crops
        shapes = {n: list(d) for n, d in base.items()}
        shapes[inp][axis] = length + s
        feeds = _random(facts, shapes, int(rng.integers(1 << 30)))
        x = feeds[inp]
        crop = [slice(None)] * x.ndim
        results = []
        for lo in (0, s):
            crop[axis] = slice(lo, lo + length)
            f = dict(feeds)
            f[inp] = np.ascontiguousarray(x[tuple(crop)])
            try:
                results.append(run(s_dense, f))
            except Exception as exc:  # a dense model that cannot run at this size fails its check
                errors.append(f"onnxruntime cannot run the dense model with {inp} of shape {list(f[inp].shape)}: "
                              f"{str(exc).splitlines()[0]}")
                break
            runs += 1
        if len(results) < 2:
            continue
        res_a, res_b = results
        for (h, k, a), (rf, off, p0) in zip(members, spans):
            last = (length - rf - off) // s - 1  # the largest p with p+1 inside in xa
            for o in h.outputs:
                da, db = res_a[o], res_b[o]
                if da.shape != db.shape:
                    errors.append(f"output {o!r}: the dense maps of two equal-size inputs differ in shape "
                                  f"({list(da.shape)} and {list(db.shape)})")
                    continue
                oax = da.ndim - len(h.window) + k
                ps = list(range(p0, min(last, da.shape[oax] - 2) + 1))
                label = f"{o} @shift {where} by {s} px"
                if not ps:
                    notes.append(f"SKIPPED  {label}: no map position has its receptive field ({rf} px from "
                                 f"offset {off}) inside the image at sizes up to {length} px; equivariance not tested")
                    continue
                e = np.take(da, [p + 1 for p in ps], axis=oax)
                got = np.take(db, ps, axis=oax)
                n = len(ps)
                found.add(f"{label} ({n} interior position{'s' if n != 1 else ''})", e, got,
                          facts.out_types.get(o, 0), _step(facts, o, e))
    return runs


def _random(facts: Facts, shapes: dict, seed: int) -> dict:
    """Seeded inputs (run.random_inputs, from the facts: the graph is gone)."""
    model = onnx.ModelProto()
    model.graph.input.extend(_vi(n, i.elem_type, shapes[n]) for n, i in facts.in_infos.items())
    return random_inputs(model, shapes, seed)
