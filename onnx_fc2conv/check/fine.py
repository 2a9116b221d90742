"""The check of a finer map (``--dense-stride S``, atrous.py's rewrite).

The plain dense model is proved against the original first (check/dense.py).
Then the fine map against the plain one: with ``T`` the plain map's stride
and ``r = T / S`` per axis, the fine map at ``i*r + a`` equals the plain map
at ``i`` of the input without its first ``a*S`` pixels, at every position
whose receptive field lies inside the image (near the borders the two pad
different images, as any two crops padded differently do).

One seeded input of size ``max(native, rf + 2*pad) + (2 + k) * T`` on the
k-th spatial axis; for every shift ``a`` (``0 <= a < r`` per axis) the plain
model runs on the input without its first ``a*S`` pixels.

This module does not convert: the caller (api.py) hands it the plain dense
model and its geometry, so the check package never imports the pipeline.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper

from ..geometry import MapGeometry
from .compare import CheckReport, Comparisons
from .dense import check_dense
from .run import Runner, Step, run


def compare_fine(plain, fine, maps: list[MapGeometry], dense_stride: int, native: dict, *, provider: str = "cpu",
                 atol=None, rtol=None, seed: int = 0, batch: int = 2, runner: Runner | None = None) -> CheckReport:
    """The fine map against the plain one on shifted inputs (``maps``: the
    plain model's geometry). Returns a CheckReport (truthy when it passes)."""
    runner = runner or Runner(provider)
    errors = []
    images = {a.input for g in maps for a in g.axes}
    if len(images) != 1:
        return CheckReport(False, provider, 0, {}, [], ["the fine-map check needs exactly one image input"], "dense")
    name = images.pop()
    s_plain = runner.session(plain, "the dense model", reuse=True)   # the dense check's, when it ran first
    s_fine = runner.session(fine, "the fine dense model")
    inp = next(i for i in s_plain.get_inputs() if i.name == name)
    plain_proto = plain if isinstance(plain, onnx.ModelProto) else None
    elem = next(i.type.tensor_type.elem_type for i in plain_proto.graph.input if i.name == name) \
        if plain_proto is not None else onnx.TensorProto.FLOAT
    out_types = {o.name: o.type.tensor_type.elem_type for o in plain_proto.graph.output} if plain_proto else {}
    dims = list(native[name])
    dims[0] = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else batch
    order = sorted({a.input_axis for g in maps for a in g.axes})
    stride_of = {ax: max(a.stride for g in maps for a in g.axes if a.input_axis == ax) for ax in order}
    for j, ax in enumerate(order):
        # room for interior positions: a padded trunk's window is wider than the native size
        rf = max(a.receptive_field + 2 * max(0, -a.offset) for g in maps for a in g.axes if a.input_axis == ax)
        dims[ax] = max(int(dims[ax]), rf) + (2 + j) * stride_of[ax]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dims).astype(helper.tensor_dtype_to_np_dtype(elem))
    fine_out = run(s_fine, {inp.name: x})
    ratios = {ax: stride_of[ax] // dense_stride for ax in order}
    shifts = list(itertools.product(*[range(ratios[ax]) for ax in order]))
    found = Comparisons(atol, rtol)
    with Step("fine-map", "shifted inputs"):
        _shifted(x, shifts, order, ratios, dense_stride, maps, s_plain, name, fine_out, out_types, elem, found,
                 errors)
    return found.report(provider, 1 + len(shifts), {name: dims}, errors, "dense")


def _shifted(x, shifts, order, ratios, dense_stride, maps, s_plain, name, fine_out, out_types, elem, found,
             errors) -> None:
    """For every shift: the plain map of the shifted input against the fine
    map's interleaved positions, where the receptive field lies inside."""
    for shift in shifts:
        crop = [slice(None)] * x.ndim
        for ax, a in zip(order, shift):
            crop[ax] = slice(a * dense_stride, None)
        xa = np.ascontiguousarray(x[tuple(crop)])
        plain_out = run(s_plain, {name: xa})
        for g in maps:
            ga = {a.input_axis: a for a in g.axes}
            for o in g.outputs:
                p, f = plain_out[o], fine_out[o]
                k = len(order)
                inside = []
                for d, ax in enumerate(order):
                    a = ga[ax]
                    i = np.arange(p.shape[p.ndim - k + d])
                    start = a.offset + i * a.stride
                    inside.append(i[(start >= 0) & (start + a.receptive_field - 1 <= xa.shape[ax] - 1)])
                if any(len(v) == 0 for v in inside):
                    errors.append(f"output {o!r}: no position of the map lies inside the {list(xa.shape)} input")
                    continue
                grid = np.ix_(*inside)
                fine_idx = np.ix_(*[v * ratios[ax] + a for v, ax, a in zip(inside, order, shift)])
                need = [int(v[-1]) * ratios[ax] + a + 1 for v, ax, a in zip(inside, order, shift)]
                have = list(f.shape[f.ndim - k:])
                if any(nd > hv for nd, hv in zip(need, have)):
                    errors.append(f"output {o!r}: the fine map is {have}, too small for the positions {need} "
                                  f"it must hold")
                    continue
                label = (f"{o} fine map (stride {dense_stride}) vs plain map on {len(shifts)} shifted inputs, "
                         f"input {'x'.join(str(x.shape[ax]) for ax in order)}")
                found.add(label, p[(Ellipsis,) + grid], f[(Ellipsis,) + fine_idx], out_types.get(o, elem))


def check_fine(original, plain: onnx.ModelProto, maps: list[MapGeometry], input_shapes: dict, native: dict,
               fine: onnx.ModelProto, dense_stride: int, *, provider: str = "cpu", atol=None, rtol=None,
               seed: int = 0) -> CheckReport:
    """The dense check for a fine model: the plain dense model (``plain``,
    what ``convert(original, dense=True)`` gives, with its geometry ``maps``,
    ``input_shapes`` and the original's ``native`` input shapes) against the
    original, then the fine map against the plain one. One CheckReport for
    both; one store of weights."""
    runner = Runner(provider)
    first = check_dense(original, plain, provider=provider, atol=atol, rtol=rtol, input_shapes=input_shapes,
                        seed=seed, runner=runner)
    second = compare_fine(plain, fine, maps, dense_stride, native, provider=provider, atol=atol, rtol=rtol,
                          seed=seed, runner=runner)
    return first.extend(second)
