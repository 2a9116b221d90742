"""``scan --check``: prove a written map.

1. **Regions across tiles and blocks.** For each sample, a region of map
   positions that straddles a corner where tiles meet (each axis split by a
   tile boundary where there is one), or, every other sample when the tiles
   ran in blocks, a corner where blocks meet inside a tile, is recomputed by
   ONE run of the dense model on the region's read region (tiling.read_region,
   the same exactness rule) and compared with the stored map. A map stitched
   from tiles or blocks that did not read their halo, or that kept positions
   near their artificial border, differs right there. Corners are drawn
   without repeats while unused ones remain. Also checked: no NaN (unfinished
   tile) in the region.

2. **Windows against the original classifier** (a model that was made dense
   here, plain stride): at sampled positions whose window lies inside the
   image, the ORIGINAL model's trunk runs on a crop that holds the position's
   support and the original head on the trunk's window of the native size;
   the result must equal the stored map there (the dense window property,
   check/dense.py, on the real image). The crop starts on the stride grid
   ``(P - q0) * s`` with ``q0 = ceil(-offset / s)`` so that trunk position
   ``q0`` of the crop is map position ``P``, and its length is ``≡ N (mod s)``
   so that ``auto_pad=SAME`` pads as in one pass.

Tolerance: ``|d| <= 1e-5 * max|ref|`` (float reordering between tile and
region sizes), per comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from onnx import helper

from . import engine, model as model_mod, store, tiling as tiling_mod

RTOL = 1e-5


@dataclass
class ScanCheck:
    ok: bool
    lines: list = field(default_factory=list)
    worst: float = 0.0           # largest |d| / max|ref| seen

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict:
        return {"ok": self.ok, "lines": list(self.lines), "worst_relative": self.worst}


def _compare(label, ref, got, report: ScanCheck) -> None:
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    nan = int(np.isnan(got).sum())
    d = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size and not nan else float("inf")
    rel = d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))
    ok = nan == 0 and d <= RTOL * scale
    report.worst = max(report.worst, rel)
    report.ok = report.ok and ok
    why = f"{nan} positions never written (NaN)" if nan else f"max |d| {d:.3g} = {rel:.2g} x max|ref| {scale:.3g}"
    report.lines.append(f"{'PASSED' if ok else 'FAILED'}  {label}: {why} (limit {RTOL:g} x max|ref|)")


def plan_from(attrs: dict) -> tiling_mod.Tiling:
    axes = attrs["geometry"]["axes"]
    first = next(iter(attrs["outputs"].values()))[1:]
    return tiling_mod.plan(attrs["image"]["size"], [a["stride"] for a in axes],
                           [a["receptive_field"] for a in axes], [a["offset"] for a in axes], first,
                           attrs["tile"]["size"])


def check(out, dense: model_mod.DenseModel, image, *, level: int = 0, samples: int = 4, provider: str = "cpu",
          seed: int = 0) -> ScanCheck:
    from ..images import open_image

    attrs = store.read_attrs(out)
    group = store.zarr().open_group(str(out), mode="r")
    tiling = plan_from(attrs)
    p = attrs["preprocessing"]
    prep = model_mod.Preprocessing(p["scale"], tuple(p["mean"]), tuple(p["std"]))
    sess = engine.session(dense.data, provider, None)
    rng = np.random.default_rng(seed)
    report = ScanCheck(True)
    blocks = (attrs.get("blocks") or {}).get("positions") or list(tiling.chunks)
    seams = _Seams(tiling, blocks, rng)
    with open_image(image, level=level, spatial_rank=dense.rank) as img:
        for i in range(max(1, samples)):
            block = seams.region(inside=i % 2 == 1)
            box = tuple(tiling_mod.read_region(p0, p1 - 1, a.size, a.stride, a.receptive_field, a.offset)
                        for a, (p0, p1) in zip(tiling.axes, block))
            x = model_mod.to_input(img.read(box), dense, prep)
            outs = sess.run(list(dense.outputs), {dense.input: x})
            local = tiling.local(block, box)
            where = ", ".join(f"{p0}:{p1}" for p0, p1 in block)
            spans = seams.spans(block)
            for o, y in zip(dense.outputs, outs):
                got = np.asarray(group[o][(slice(None),) + tuple(slice(p0, p1) for p0, p1 in block)])
                _compare(f"{o} positions [{where}] ({spans}) vs one pass on pixels "
                         f"{', '.join(f'{a}:{b}' for a, b in box)}", y[0][(slice(None),) + local], got, report)
        if dense.converted and not dense.dense_stride:
            _windows(dense, img, group, tiling, prep, samples, rng, provider, report)
        elif dense.dense_stride:
            report.lines.append("NOTE  windows against the original classifier: not compared on a --dense-stride "
                                "map (convert --dense --dense-stride --check proves the fine map)")
        else:
            report.lines.append("NOTE  windows against the original classifier: the model was dense already, "
                                "there is no classifier to compare with")
    return report


class _Seams:
    """Regions of map positions around corners where tiles meet, or where
    blocks meet inside a tile; corners drawn without repeats while unused
    ones remain (the image's own positions when an axis has one tile)."""

    def __init__(self, tiling, blocks, rng):
        self.tiling, self.blocks, self.rng = tiling, [int(b) for b in blocks], rng
        self.used = set()

    def _edges(self, a, kb, inside: bool) -> list:
        k = a.per_tile
        if inside and kb < k:
            return [c * k + j for c in range(a.tiles) for j in range(kb, k, kb) if c * k + j < a.positions]
        return [c * k for c in range(1, a.tiles)]

    def region(self, inside: bool) -> list:
        axes = self.tiling.axes
        edges = [self._edges(a, kb, inside) for a, kb in zip(axes, self.blocks)]
        if inside and not any(edges):                 # no blocks: tile corners instead
            return self.region(False)
        corner = None
        for _ in range(32):
            corner = tuple(int(e[self.rng.integers(len(e))]) if e else int(self.rng.integers(0, a.positions))
                           for a, e in zip(axes, edges))
            if corner not in self.used:
                break
        self.used.add(corner)
        half = [max(1, min(a.per_tile, 3)) for a in axes]
        return [(max(0, q - w), min(a.positions, q + w)) for a, q, w in zip(axes, corner, half)]

    def spans(self, region) -> str:
        """How many tiles and blocks ``region`` covers."""
        tiles, blocks = 1, 1
        for a, kb, (p0, p1) in zip(self.tiling.axes, self.blocks, region):
            ends = (p0, p1 - 1)
            tiles *= len({q // a.per_tile for q in ends})
            blocks *= len({(q // a.per_tile, (q % a.per_tile) // kb) for q in ends})
        return f"{tiles} tile{'s' if tiles != 1 else ''}" + (f", {blocks} blocks" if blocks > tiles else "")


def _windows(dense, img, group, tiling, prep, samples, rng, provider, report) -> None:
    from .. import shapes as shapes_mod
    from ..find import find_heads
    from ..load import load
    from .. import dense as dense_mod
    from ..check.dense import _cone, _vi
    from ..check.run import session

    def _analyse(model, infos, heads, layers, overrides):  # lenient, as the dense check analyses
        return dense_mod.analyse(model, infos, heads, layers, overrides, lenient=True)

    def _submodel(model, nodes, inputs, outputs):
        read = {i for n in nodes for i in n.input if i}
        graph = helper.make_graph(nodes, "part", inputs, outputs, [t for t in model.graph.initializer if t.name in read])
        sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=max(model.ir_version, 4))
        sub.functions.extend(model.functions)
        return sub

    original = load(dense.original, check=False).model
    overrides = dict(dense.input_shapes)
    infos = shapes_mod.infer(original, overrides)
    heads, layers = find_heads(original, infos)
    plan = _analyse(original, infos, heads, layers, overrides)
    if plan.trunk_reshapes or plan.kept_global:
        report.lines.append("NOTE  windows against the original classifier: not compared (the trunk reshapes or "
                            "pools globally)")
        return
    in_infos = shapes_mod.input_infos(original)
    name = dense.input
    h = next((h for h in plan.heads if set(dense.outputs) & set(h.outputs)), None)
    if h is None or len(in_infos) != 1:
        report.lines.append("NOTE  windows against the original classifier: not compared (no single head)")
        return
    dims = list(in_infos[name].shape)
    for ax in dense.spatial_axes:
        dims[ax] = f"s{ax}"
    dims[0] = "batch"
    elem = infos[h.source].elem_type
    trunk = _submodel(original, _cone(original, [h.source], set()), [_vi(name, in_infos[name].elem_type, dims)],
                      [_vi(h.source, elem, None)])
    tshape = list(infos[h.source].shape)
    head_outs = [o for o in h.outputs if o in dense.outputs]
    out_types = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    head = _submodel(original, _cone(original, head_outs, {h.source}),
                     [_vi(h.source, elem, ["batch"] + tshape[1:])], [_vi(o, out_types[o], None) for o in head_outs])
    s_trunk, s_head = session(trunk, provider), session(head, provider)
    axes = tiling.axes
    # positions whose crop fits in the image
    choices = []
    for a, win in zip(axes, h.window):
        s, off, rf, n = a.stride, a.offset, a.receptive_field, a.size
        q0 = max(0, math.ceil(-off / s))
        need = off + q0 * s + rf
        length = need + ((n - need) % s)              # >= need, ≡ n (mod s)
        ps = [p for p in range(a.positions) if (p - q0) * s >= 0 and (p - q0) * s + length <= n
              and off + p * s >= 0 and off + p * s + rf <= n]
        choices.append((ps, q0, length, win))
    if any(not ps for ps, *_ in choices):
        report.lines.append("NOTE  windows against the original classifier: no position has its window and crop "
                            "inside the image")
        return
    worst_label = f"{', '.join(head_outs)} at {samples} sampled positions vs the original classifier " \
                  "(its trunk on the crop, its head on the window)"
    refs, gots = [], []
    for _ in range(max(1, samples)):
        pos = [int(rng.choice(ps)) for ps, *_ in choices]
        box = tuple(((p - q0) * a.stride, (p - q0) * a.stride + length)
                    for p, (ps, q0, length, win), a in zip(pos, choices, axes))
        x = model_mod.to_input(img.read(box), dense, prep).astype(helper.tensor_dtype_to_np_dtype(
            in_infos[name].elem_type))
        f = s_trunk.run(None, {name: x})[0]
        window = f[(slice(None), slice(None)) + tuple(slice(q0, q0 + win) for (ps, q0, length, win) in choices)]
        ys = s_head.run(None, {h.source: np.ascontiguousarray(window)})
        for o, y in zip(head_outs, ys):
            refs.append(np.asarray(y).reshape(-1))
            gots.append(np.asarray(group[o][(slice(None),) + tuple(pos)]).reshape(-1))
    _compare(worst_label, np.concatenate(refs), np.concatenate(gots), report)
