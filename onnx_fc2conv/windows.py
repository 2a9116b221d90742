"""The dense-mode check: prove the window property against the ORIGINAL model.

For each head, with ``T`` the trunk map the head reads and ``(h, w)`` its
native size, the original model is cut in two and both halves run in
onnxruntime: the trunk (input -> T, with symbolic spatial dims) on a larger
input, and the head (T -> outputs) on each window ``T[:, :, i:i+h, j:j+w]``.
Each window's head output must equal ``dense[..., i, j]``. Larger inputs are
the native size + 2 strides per spatial axis and a non-square size; all
positions are checked on small maps, a seeded sample on large ones. At the
native size the dense map is 1x1 and must equal the original output.

When no op of the trunk pads (offset 0), the windows are also pixel crops:
``dense[..., i, j]`` must equal the original run on
``x[..., i*s : i*s + H, j*s : j*s + W]``. With zero padding the two
legitimately differ (a crop sees zeros where the big image has pixels).

Both comparisons above run the ORIGINAL trunk, which the dense model shares:
they test the head, not whether the trunk is the same local function at every
position. Translation equivariance of the DENSE model tests that. Along each
spatial input axis, with ``s`` the map's stride, ``rf`` the full receptive
field of a position and ``off`` its offset (dense.DenseHead.geometry_dict),
take ``x`` of length ``L`` and its two crops ``xa = x[0 : L-s]`` and
``xb = x[s : L]``. Position ``p`` of ``dense(xb)`` and position ``p+1`` of
``dense(xa)`` see the same pixels of ``x``; where neither window reaches the
border (``off + p*s >= 0`` and ``off + (p+1)*s + rf - 1 <= L-s-1``) no padding
enters either, so a trunk that acts the same at every position gives::

    dense(xb)[..., p, ...] == dense(xa)[..., p+1, ...]

A position-mixing op (a normalisation over H and W, a Softmax that flattens
C*H*W) breaks it at every such position. ``L - s`` is the native size plus a
whole number of strides (so SAME padding and floor rounding stay as at the
native size), large enough for at least two such positions; the other axes
stay native. Global pools the plan keeps global (``plan.kept_global``) make
every position depend on the whole image by design: the test then does not
apply and the report says so.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from . import dense as dense_mod, find, shapes as shapes_mod
from .errors import Fc2ConvError
from .graph import node_key
from .verify import CheckReport, OutputReport, _merge, compare, random_inputs, session

MAX_POSITIONS = 48
# The shift test enlarges one axis at a time up to this many times its native
# size (or native + MAX_SHIFT_STEPS strides, if more) to find interior positions.
MAX_SHIFT_FACTOR = 16
MAX_SHIFT_STEPS = 64


@dataclass
class DenseCheckReport(CheckReport):
    """A CheckReport with notes: tests that did not run, and why (neither
    passed nor failed)."""
    notes: list = field(default_factory=list)

    def lines(self) -> list[str]:
        return super().lines() + ["  " + n for n in self.notes]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "notes": list(self.notes)}


def _analyse(model, infos, heads, layers, overrides):
    """The dense plan, leniently: the check must still run (and fail, by
    measurement) on a dense model whose trunk conversion would refuse; what
    conversion would refuse is listed as notes, global pools stay global."""
    return dense_mod.analyse(model, infos, heads, layers, overrides, lenient=True)


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


def _submodel(model: onnx.ModelProto, nodes, inputs: list, outputs: list) -> onnx.ModelProto:
    read = {i for n in nodes for i in n.input if i}
    inits = [t for t in model.graph.initializer if t.name in read]
    graph = helper.make_graph(nodes, "part", inputs, outputs, inits)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=max(model.ir_version, 4))
    sub.functions.extend(model.functions)
    return sub


def _vi(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def check_dense(original: onnx.ModelProto, converted, *, provider="cpu", atol=None, rtol=None,
                input_shapes=None, seed: int = 0, batch: int = 2) -> CheckReport:
    overrides = input_shapes or {}
    infos = shapes_mod.infer(original, overrides)
    from .probe import fill  # shapes ONNX inference leaves unknown, as convert read them

    fill(original, infos, overrides)
    heads, layers = find.find_heads(original, infos)
    if not heads:  # nothing was made dense: the models must simply be equal
        from .load import load
        from .verify import check_models

        conv_proto = converted if isinstance(converted, onnx.ModelProto) else load(converted, check=False).model
        return check_models(original, converted, provider=provider, atol=atol, rtol=rtol,
                            input_shapes=input_shapes, seed=seed, converted_proto=conv_proto)
    plan = _analyse(original, infos, heads, layers, overrides)
    out_types = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    in_infos = shapes_mod.input_infos(original)
    s_orig = session(original, provider, "the original model")
    errors: list[str] = []
    reports: dict[str, list[OutputReport]] = {}
    rng = np.random.default_rng(seed)

    def concrete(name, dims_override=None):
        info = in_infos[name]
        dims = list(dims_override or plan.native.get(name) or info.shape)
        return [batch if (i == 0 and not isinstance(info.shape[0], int)) else
                (info.shape[0] if i == 0 else int(d)) for i, d in enumerate(dims)]

    def add(label, e, a, elem):
        reports.setdefault(label, []).append(compare(label, e, a, elem, atol, rtol))

    # 1. native size: the map is 1x1 and equals the original output
    native_shapes = {n: concrete(n) for n in in_infos}
    feeds = random_inputs(original, native_shapes, seed)
    try:
        expected = dict(zip([o.name for o in s_orig.get_outputs()], s_orig.run(None, feeds)))
    except Exception as exc:  # a model that cannot run is bad input
        raise Fc2ConvError(f"onnxruntime cannot run the original model: {str(exc).splitlines()[0]}") from None
    try:
        s_dense = session(converted, provider, "the dense model")
    except Fc2ConvError as exc:
        return CheckReport(False, provider, 0, native_shapes, [], [str(exc)])
    got = dict(zip([o.name for o in s_dense.get_outputs()], s_dense.run(None, feeds)))
    for name, e in expected.items():
        if name not in got:
            errors.append(f"output {name!r} is missing from the dense model")
            continue
        a = got[name]
        if a.size != e.size:
            errors.append(f"output {name!r}: at the native size the dense output has shape {list(a.shape)}, "
                          f"expected {list(e.shape)} with 1x1 maps")
            continue
        add(f"{name} @native", e, a.reshape(e.shape), out_types.get(name, 0))

    # 2. windows on larger inputs, against the original's trunk and head
    trunk_outputs = sorted({h.source for h in plan.heads})
    trunk_source = original
    if plan.trunk_reshapes:
        # Reshapes that pin the native size (a channel shuffle) cannot run the
        # original's trunk on a larger input: use it with those Reshapes taking
        # their shape from their input, the only change dense mode makes there
        # (the native-size comparison above covers the original end to end).
        from . import rewrite
        from .graph import GraphIndex
        from .plan import Namer, plan_trunk_fixes

        trunk_source = onnx.ModelProto()
        trunk_source.CopyFrom(original)
        fixed_plan = _analyse(trunk_source, infos, find.find_heads(trunk_source, infos)[0], layers, overrides)
        rewrite.apply(trunk_source, plan_trunk_fixes(GraphIndex(trunk_source), Namer(trunk_source.graph), fixed_plan))
    trunk_inputs = []
    for name in in_infos:
        dims = list(in_infos[name].shape)
        for axis in plan.image_inputs.get(name, ()):
            dims[axis] = f"s{axis}"
        trunk_inputs.append(_vi(name, in_infos[name].elem_type, dims))
    elem_of = {t: infos[t].elem_type for t in trunk_outputs}
    trunk = _submodel(trunk_source, _cone(trunk_source, trunk_outputs, set()), trunk_inputs,
                      [_vi(t, elem_of[t], None) for t in trunk_outputs])
    s_trunk = session(trunk, provider)
    head_models = []
    for h in plan.heads:
        nodes = _cone(original, list(h.outputs), {h.source})
        read = {i for n in nodes for i in n.input}
        tshape = list(infos[h.source].shape)
        free_batch = not isinstance(tshape[0], int)
        inputs = [_vi(h.source, elem_of[h.source], ["B" if free_batch else tshape[0]] + tshape[1:])]
        extra = [n for n in in_infos if n in read and n != h.source]
        inputs += [_vi(n, in_infos[n].elem_type, list(in_infos[n].shape)) for n in extra]
        outs = [_vi(o, out_types[o], None) for o in h.outputs]
        head_models.append((h, session(_submodel(original, nodes, inputs, outs), provider), free_batch, extra))

    sizes = dense_mod.window_sizes(plan)
    # pixel crops equal windows only without padding, and only where no pool
    # in the trunk sees the whole (larger) input
    no_padding = all(not a.padded and a.offset == 0 for h in plan.heads for a in h.geometry) \
        and not plan.kept_global
    for size in sizes:
        shapes = {n: concrete(n, size.get(n)) for n in in_infos}
        feeds = random_inputs(original, shapes, int(rng.integers(1 << 30)))
        dense_out = dict(zip([o.name for o in s_dense.get_outputs()], s_dense.run(None, feeds)))
        t_out = dict(zip(trunk_outputs, s_trunk.run(None, feeds)))
        size_label = "x".join(str(d) for n in plan.image_inputs for d in
                              [shapes[n][a] for a in sorted(plan.image_inputs[n])])
        for h, s_head, free_batch, extra in head_models:
            t = t_out[h.source]
            win, axes = h.window, h.source_axes
            grid = [t.shape[axes[k]] - win[k] + 1 for k in range(len(win))]
            if any(g < 1 for g in grid):
                errors.append(f"the map {h.source!r} is smaller than the window at input size {size_label}")
                continue
            positions = list(itertools.product(*[range(g) for g in grid]))
            if len(positions) > MAX_POSITIONS:
                picks = rng.choice(len(positions), MAX_POSITIONS, replace=False)
                positions = [positions[i] for i in sorted(picks)]
            for o in h.outputs:
                d = dense_out[o]
                if list(d.shape[-len(win):]) != grid:
                    errors.append(f"output {o!r} at input size {size_label}: map {list(d.shape[-len(win):])}, "
                                  f"expected {grid}")
            windows = []
            for pos in positions:
                cut = [slice(None)] * t.ndim
                for ax, start, size in zip(axes, pos, win):
                    cut[ax] = slice(start, start + size)
                windows.append(t[tuple(cut)])
            results = _run_head(s_head, h, windows, free_batch, extra, in_infos, plan, t.shape[0])
            for o_i, o in enumerate(h.outputs):
                d = dense_out[o]
                e = np.stack([r[o_i] for r in results])
                a = np.stack([d[(Ellipsis,) + pos] for pos in positions])
                add(f"{o} @{size_label} windows", e, a, out_types.get(o, 0))
            if no_padding:
                crops = _pixel_crops(s_orig, h, plan, feeds, positions, shapes, native_shapes)
                if crops is not None:
                    for o_i, o in enumerate(h.outputs):
                        e = np.stack([c[o_i] for c in crops])
                        a = np.stack([dense_out[o][(Ellipsis,) + pos] for pos in positions])
                        add(f"{o} @{size_label} pixel crops", e, a, out_types.get(o, 0))

    # 3. translation equivariance of the dense model itself
    notes: list[str] = [f"NOTE  {r}" for r in plan.refusals]
    shift_runs = _shift_check(original, s_dense, plan, in_infos, native_shapes, out_types, rng, add, errors, notes)
    outputs = [_merge(v) for v in reports.values()]
    ok = not errors and bool(outputs) and all(r.passed for r in outputs)
    report = DenseCheckReport(ok, provider, 1 + len(sizes) + shift_runs, native_shapes, outputs, errors, notes=notes)
    report.mode = "dense"
    return report


def _shift_check(original, s_dense, plan, in_infos, native_shapes, out_types, rng, add, errors, notes) -> int:
    """Compare dense(x[s:]) with dense(x[:-s]) shifted by one position, per
    image input axis and map stride; returns the number of dense runs."""
    kept = list(plan.kept_global)
    if kept:
        op_of = {n.name: n.op_type for n in original.graph.node}
        named = ", ".join(f"{op_of[k]} {k!r}" if k in op_of else repr(k) for k in kept[:3])
        if len(kept) > 3:
            named = f"{len(kept)} pools ({named} and {len(kept) - 3} more)"
        notes.append(f"SKIPPED  translation equivariance: does not apply, the trunk keeps {named} global over "
                     "the whole input (--keep-global-pools), so every position depends on the whole image by design")
        return 0
    several = len(plan.image_inputs) > 1
    groups: dict[tuple, list] = {}
    for h in plan.heads:
        for k, a in enumerate(h.geometry):
            groups.setdefault((a.input, a.input_axis, a.stride), []).append((h, k, a))
    out_names = [o.name for o in s_dense.get_outputs()]
    # Batch 1 where the batch dim is free: the test is per image and the sizes can be large.
    base = {n: [1 if (i == 0 and not isinstance(in_infos[n].shape[0], int)) else d
                for i, d in enumerate(dims)] for n, dims in native_shapes.items()}
    runs = 0
    for (inp, axis, s), members in groups.items():
        native = base[inp][axis]
        where = f"{inp} axis {axis}" if several else f"axis {axis}"
        # Per member: full receptive field rf, offset off, first interior p.
        spans = []
        for h, k, a in members:
            rf = a.receptive_field + (h.window[k] - 1) * a.stride
            spans.append((rf, a.offset, max(0, math.ceil(-a.offset / s))))
        # Two positions p = p0, p0+1 need off + (p0+2)*s + rf - 1 <= L' - 1.
        need = max(rf + off + (p0 + 2) * s for rf, off, p0 in spans)
        steps = max(1, math.ceil((need - native) / s))
        cap = max(MAX_SHIFT_FACTOR * native, native + MAX_SHIFT_STEPS * s)
        steps = min(steps, max(1, (cap - native) // s - 1))
        length = native + steps * s  # L' = L - s, the size of both crops
        shapes = {n: list(d) for n, d in base.items()}
        shapes[inp][axis] = length + s
        feeds = random_inputs(original, shapes, int(rng.integers(1 << 30)))
        x = feeds[inp]
        crop = [slice(None)] * x.ndim
        results = []
        for lo in (0, s):
            crop[axis] = slice(lo, lo + length)
            f = dict(feeds)
            f[inp] = np.ascontiguousarray(x[tuple(crop)])
            try:
                results.append(dict(zip(out_names, s_dense.run(None, f))))
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
                add(f"{label} ({n} interior position{'s' if n != 1 else ''})", e, got, out_types.get(o, 0))
    return runs


def _run_head(s_head, h, windows, free_batch, extra, in_infos, plan, batch):
    names = [o.name for o in s_head.get_outputs()]
    order = [names.index(o) for o in h.outputs]

    def feeds_for(t):
        f = {h.source: t}
        for n in extra:
            dims = [t.shape[0]] + list(plan.native.get(n, in_infos[n].shape))[1:]
            f[n] = np.zeros(dims, dtype=helper.tensor_dtype_to_np_dtype(in_infos[n].elem_type))
        return f

    if free_batch:
        stacked = np.concatenate(windows, axis=0)
        outs = s_head.run(None, feeds_for(stacked))
        return [[outs[k][i * batch:(i + 1) * batch] for k in order] for i in range(len(windows))]
    results = []
    for w in windows:
        outs = s_head.run(None, feeds_for(np.ascontiguousarray(w)))
        results.append([outs[k] for k in order])
    return results


def _pixel_crops(s_orig, h, plan, feeds, positions, shapes, native_shapes):
    """Run the original on the pixel crop each position sees."""
    results = []
    names = [o.name for o in s_orig.get_outputs()]
    order = [names.index(o) for o in h.outputs]
    for pos in positions:
        crop_feeds = dict(feeds)
        for a, p in zip(h.geometry, pos):
            x = crop_feeds[a.input]
            native = native_shapes[a.input][a.input_axis]
            start = a.offset + p * a.stride
            idx = [slice(None)] * x.ndim
            idx[a.input_axis] = slice(start, start + native)
            crop_feeds[a.input] = x[tuple(idx)]
        crop_feeds = {k: np.ascontiguousarray(v) for k, v in crop_feeds.items()}
        outs = s_orig.run(None, crop_feeds)
        results.append([outs[k] for k in order])
    return results
