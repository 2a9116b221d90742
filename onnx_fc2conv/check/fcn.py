"""The check of a convolutional model whose fixed spatial input size dense
mode freed (dense.convolutional: MTCNN's P-Net at 12x12).

With ``n`` the native size and a map's geometry ``(stride s, receptive
field r, offset o)`` per axis, the original run on the crop that starts at
``k*s`` equals the freed model run on the whole input at positions ``k + j``
for every position ``j`` of the crop's own map whose window lies inside the
crop (``o + j*s >= 0`` and ``o + j*s + r <= n``): the same pixels through
the same per-position trunk. The check runs the original at its native size
end to end, then on every crop ``k*s`` of a seeded input ``n + (3 + a)*s``
(``a`` the axis' index), against one run of the freed model.
"""

from __future__ import annotations

import itertools

import numpy as np
from onnx import helper

from ..geometry import MapGeometry
from ..shapes import input_infos
from .compare import CheckReport, compare
from .run import session


def check_convolutional(original, converted, maps: list[MapGeometry], *, provider: str = "cpu", atol=None,
                        rtol=None, input_shapes=None, seed: int = 0) -> CheckReport:
    """The freed model ``converted`` against ``original`` (ModelProtos) on
    the windows its ``maps`` name. Truthy when every output passes."""
    images = {a.input for g in maps for a in g.axes}
    infos = input_infos(original)
    if len(images) != 1 or set(infos) != images:
        return CheckReport(False, provider, 0, {}, [], ["the check of a freed convolutional model needs exactly one "
                                                        "input, the image"])
    name = images.pop()
    native = list((input_shapes or {}).get(name) or infos[name].shape)
    native[0] = native[0] if isinstance(native[0], int) and native[0] > 0 else 2
    dtype = helper.tensor_dtype_to_np_dtype(infos[name].elem_type)
    axes = sorted({a.input_axis for g in maps for a in g.axes})
    big = list(native)
    for j, ax in enumerate(axes):
        big[ax] = native[ax] + (3 + j) * max(a.stride for g in maps for a in g.axes if a.input_axis == ax)
    x = np.random.default_rng(seed).standard_normal(big).astype(dtype)
    s_orig = session(original, provider, "the original model")
    s_conv = session(converted, provider, "the dense model")
    names = [o.name for o in s_orig.get_outputs()]
    types = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}

    def run(sess, feed):
        return dict(zip(names, sess.run(names, {name: feed})))

    at_native = tuple(slice(0, n) for n in native)
    e, a = run(s_orig, x[at_native]), run(s_conv, x[at_native])
    outputs = [compare(f"{o} @native", e[o], a[o], types.get(o, 0), atol, rtol) for o in names]
    whole = run(s_conv, x)
    runs, errors = 3, []
    for g in maps:
        try:
            found = _windows(g, native, big, lambda crop: run(s_orig, x[crop]), whole)
        except _TooSmall as exc:
            errors.append(str(exc))
            continue
        runs += found.pop(None)
        for o in g.outputs:
            exp, act = found.get(o, ([], []))
            if not exp:
                errors.append(f"output {o!r}: no position of its map has its window inside a {native} crop")
                continue
            label = f"{o} windows @{'x'.join(str(big[ax]) for ax in axes)}"
            outputs.append(compare(label, np.concatenate(exp), np.concatenate(act), types.get(o, 0), atol, rtol))
    report = CheckReport(not errors and all(r.passed for r in outputs), provider, runs, {name: big}, outputs,
                         errors)
    report.mode = "dense"
    return report


class _TooSmall(Exception):
    pass


def _windows(g: MapGeometry, native: list, big: list, run_crop, whole: dict) -> dict:
    """output -> (expected values, actual values) over every crop ``k*s``,
    and under None the number of crops run."""
    spatial = len(g.axes)
    crops = [range((big[a.input_axis] - native[a.input_axis]) // a.stride + 1) for a in g.axes]
    out: dict = {None: 0}
    for ks in itertools.product(*crops):
        crop = [slice(None)] * len(big)
        for a, k in zip(g.axes, ks):
            crop[a.input_axis] = slice(k * a.stride, k * a.stride + native[a.input_axis])
        e = run_crop(tuple(crop))
        out[None] += 1
        for o in g.outputs:
            m = e[o].shape[e[o].ndim - spatial:]
            inside = [np.array([j for j in range(n) if a.offset + j * a.stride >= 0
                                and a.offset + j * a.stride + a.receptive_field <= native[a.input_axis]], int)
                      for a, n in zip(g.axes, m)]
            if any(len(v) == 0 for v in inside):
                continue
            have = whole[o].shape[whole[o].ndim - spatial:]
            if any(int(v[-1]) + k >= n for v, k, n in zip(inside, ks, have)):
                raise _TooSmall(f"output {o!r}: the dense map {list(have)} is too small for the crop at "
                                f"{[k * a.stride for a, k in zip(g.axes, ks)]}")
            exp = e[o][(Ellipsis,) + np.ix_(*inside)]
            act = whole[o][(Ellipsis,) + np.ix_(*[v + k for v, k in zip(inside, ks)])]
            pair = out.setdefault(o, ([], []))
            pair[0].append(exp.reshape(-1))
            pair[1].append(act.reshape(-1))
    return out
