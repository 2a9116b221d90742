"""Finer score maps: the à trous rewrite of a dense model (DeepLab's "hole"
algorithm, OverFeat's offset pooling).

A dense map has the trunk's total stride ``T`` (the product of its layers'
strides). For ``S`` dividing ``T`` the rewrite gives a map of stride ``S``
with the same receptive field and offset, by sampling every layer's output
``min(J, S)`` input pixels apart instead of ``J`` (``J`` the layer's jump:
the product of the strides before it). Per layer and axis, with ``J_in`` and
``J_out`` its input's and output's jumps and ``m = J_in / min(J_in, S)`` the
factor already removed before it::

    stride'   = min(J_out, S) / min(J_in, S)    (1 for the layers after the map reaches S)
    dilation' = dilation * m
    pads'     = pads * m                         (explicit Pad nodes too)

so the last strided layers lose their strides and every later kernel
(the head's window Conv and its 1x1 Convs included) is dilated by the factor
removed before it. Layers whose input has ``J_in <= S`` and output
``J_out <= S`` are untouched.

What it computes (r = T / S per axis): the fine map at ``i*r + a`` equals the
plain dense map at ``i`` of the input shifted by ``a*S`` pixels (the image
without its first ``a*S`` rows/columns), at every position whose receptive
field lies inside the image. Near the borders, where the plain map pads the
shifted image and the fine map the whole one, the two may differ, as any two
crops padded differently do. check/fine.py proves this with
onnxruntime.

Refused, with the reason: ``S`` not dividing ``T``, or a strided layer whose
input jump does not divide ``S`` (strides 2 then 3 cannot give stride 3);
``auto_pad=SAME_*`` on a strided layer (its padding depends on the input size
and changes with the stride, so the fine map would not line up); a dilated
MaxPool below opset 10, LpPool below 18, and AveragePool below opset 19 when
it cannot be written as a depthwise Conv (padding without
``count_include_pad``, ``ceil_mode``, an unknown channel count); a pool over
all positions (a kept squeeze-excitation pool) or MaxPool's Indices output
after the rewritten layers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from . import ops, rewrite, shapes as shapes_mod
from .errors import Fc2ConvError
from .geometry import MapAxis, MapGeometry, trace
from .graph import GraphIndex, attr, is_default, node_key, node_label
from .plan import HeadPlan, Namer

log = logging.getLogger(__name__)

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


@dataclass
class Fine:
    """The rewritten model, its geometry (stride ``dense_stride``) and what changed."""
    model: onnx.ModelProto
    geometry: list                                # geometry.MapGeometry per head
    dense_stride: int
    layers: list = field(default_factory=list)    # one line per rewritten node


def traced_geometry(model: onnx.ModelProto) -> list[MapGeometry]:
    """Geometry of a model that is fully convolutional already: one entry per
    output whose axes 2.. trace back to an input."""
    idx, infos = GraphIndex(model), shapes_mod.infer(model)
    out = []
    for o in model.graph.output:
        geo = trace(idx, infos, [o.name], keep_global=True).geo.get(o.name) or {}
        if geo and sorted(geo) == list(range(2, 2 + len(geo))):
            axes = tuple(MapAxis(geo[a].input, geo[a].input_axis, geo[a].stride, geo[a].receptive_field,
                                 geo[a].offset) for a in sorted(geo))
            out.append(MapGeometry((o.name,), axes, padded=any(geo[a].padded for a in geo)))
    return out


def _jumps(model: onnx.ModelProto, geometry: list[MapGeometry]) -> tuple[dict, dict]:
    """tensor -> {axis: jump} for every trunk tensor with positions, and the
    shapes at a concrete input size (auto_pad=SAME layers need one to trace)."""
    overrides = {}
    for g in geometry:
        for a in g.axes:
            inp = next(i for i in model.graph.input if i.name == a.input)
            dims = overrides.setdefault(a.input, [d.dim_value if d.HasField("dim_value") else 1
                                                  for d in inp.type.tensor_type.shape.dim])
            size = a.receptive_field + 2 * abs(a.offset) + 2 * a.stride
            dims[a.input_axis] = max(dims[a.input_axis], size)
    idx, infos = GraphIndex(model), shapes_mod.infer(model, overrides)
    outputs = [o for g in geometry for o in g.outputs]
    # lenient: the model is dense already (convert traced its trunk strictly);
    # a Reshape whose shape is now computed from Shape(x) keeps its axes last
    tr = trace(idx, infos, outputs, keep_global=True, lenient=True)
    for why in tr.refusals:
        log.debug("à trous trace: %s", why)
    return {t: {a: ax.stride for a, ax in g.items()} for t, g in tr.geo.items()}, infos


def apply(model: onnx.ModelProto, geometry: list[MapGeometry] | None, dense_stride: int, *,
          inplace: bool = False) -> Fine:
    """Rewrite the dense ``model`` so its score maps have stride ``dense_stride``.

    Args:
        geometry: the maps of ``model`` (``ConversionResult.maps``; None: traced here).
        inplace: rewrite ``model`` itself (the API's own copy) instead of a copy.
    """
    s = dense_stride
    if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1:
        raise Fc2ConvError(f"--dense-stride {s!r}: give a positive integer that divides the map's stride")
    s = int(s)
    if geometry is None:
        geometry = traced_geometry(model)
    if not geometry:
        raise Fc2ConvError("--dense-stride needs a dense model: the model has no score map output")
    for g in geometry:
        strides = [a.stride for a in g.axes]
        bad = [t for t in strides if t % s]
        if bad:
            divisors = sorted({d for t in strides for d in range(1, t + 1) if all(u % d == 0 for u in strides)})
            raise Fc2ConvError(f"--dense-stride {s} does not divide the map's stride "
                               f"{'x'.join(map(str, strides))}; choose one of {', '.join(map(str, divisors))}")
    out = model if inplace else copy.deepcopy(model)
    fine = Fine(out, [], s)
    if all(a.stride == s for g in geometry for a in g.axes):
        fine.geometry = [fine_geometry(g, s) for g in geometry]
        return fine
    jumps, infos = _jumps(out, geometry)
    _expressible(out, jumps, geometry, s)
    rewrite.apply(out, _plans(out, jumps, infos, s, fine))
    del out.graph.value_info[:]
    fine.geometry = [fine_geometry(g, s) for g in geometry]
    log.info("à trous: stride %d via %d rewritten node(s)", s, len(fine.layers))
    return fine


def _plans(model: onnx.ModelProto, jumps: dict, infos: dict, s: int, fine: Fine) -> list[HeadPlan]:
    """One plan per node the rewrite changes (its strides, dilations, pads);
    rewrite.apply swaps them in. Decides and refuses; touches nothing."""
    idx = GraphIndex(model)
    namer = Namer(model.graph)
    opset = idx.opset
    plans = []
    for node in model.graph.node:
        j_in = jumps.get(node.input[0], {}) if node.input else {}
        op = node.op_type
        new_inits: list = []
        if not j_in:
            continue
        if op in ops.WINDOWED_FLOAT and is_default(node):
            new = _windowed(node, j_in, jumps.get(node.output[0], {}), s, opset, idx, infos, fine, new_inits, namer)
        elif not any(j > s for j in j_in.values()):
            continue                     # before the rewritten layers: as it is
        elif op == "Pad":
            new = _pad(node, {a: max(1, j // s) for a, j in j_in.items()}, idx, opset, fine, new_inits, namer)
        elif node.output and node.output[0] and not jumps.get(node.output[0]) and op not in ("Shape", "Size"):
            raise Fc2ConvError(f"{op} {node_label(node)!r} pools over all positions after the layers the à trous "
                               f"rewrite changes; the fine map would pool the interleaved map, so --dense-stride "
                               "cannot be used with this model")
        else:
            continue                     # per position: the interleaved map is still a map
        if new is not node:
            plans.append(HeadPlan(node_key(node), (new,), tuple(new_inits), frozenset({node_key(node)})))
    return plans


def _expressible(model: onnx.ModelProto, jumps: dict, geometry: list[MapGeometry], s: int) -> None:
    """Every stride the map passes through must divide S or be a multiple of it."""
    def fits(j, d):
        return j % d == 0 or d % j == 0

    for node in model.graph.node:
        if node.op_type not in ops.WINDOWED_FLOAT or not node.output or node.output[0] not in jumps:
            continue
        bad = [j for j in jumps[node.output[0]].values() if not fits(j, s)]
        if bad:
            strides = {a.stride for g in geometry for a in g.axes}
            every = {j for g in jumps.values() for j in g.values()}
            ok = [d for d in range(1, min(strides) + 1) if all(t % d == 0 for t in strides)
                  and all(fits(j, d) for j in every)]
            raise Fc2ConvError(f"--dense-stride {s} is not expressible: {node.op_type} {node_label(node)!r} takes the "
                               f"map to stride {bad[0]}, and {s} is neither a multiple nor a divisor of {bad[0]}; "
                               f"choose one of {', '.join(map(str, ok))}")


def _removed(node, jump: int, s: int, verb: str = "reads") -> int:
    """The factor removed before a tensor of jump ``jump``: ``J / min(J, S)``
    (a jump below S must divide it, a jump above it be a multiple of it)."""
    if jump <= s:
        if s % jump:
            raise Fc2ConvError(f"--dense-stride {s} is not expressible: {node.op_type} {node_label(node)!r} {verb} a "
                               f"map of stride {jump}, which does not divide {s}")
        return 1
    if jump % s:
        raise Fc2ConvError(f"--dense-stride {s} is not expressible: {node.op_type} {node_label(node)!r} {verb} a "
                           f"map of stride {jump}, which is not a multiple of {s}")
    return jump // s


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _windowed(node, j_in: dict, j_out: dict, s: int, opset: int, idx, infos, fine: Fine, new_inits, namer):
    """The node with its strides, dilations and pads for stride ``s`` (the node itself when it keeps them)."""
    op = node.op_type
    label = f"{op} {node_label(node)!r}"
    if op == "Conv":
        wshape = idx.const_shape(node.input[1]) or (infos[node.input[1]].shape if node.input[1] in infos else None)
        kernel = attr(node, "kernel_shape", None) or (list(wshape[2:]) if wshape else None)
    else:
        kernel = attr(node, "kernel_shape", None)
    if kernel is None:
        raise Fc2ConvError(f"{label} has no known kernel shape; --dense-stride cannot dilate it")
    n = len(kernel)
    strides = _ints(attr(node, "strides", None) or [1] * n)
    dilations = _ints(attr(node, "dilations", None) or [1] * n)
    pads = _ints(attr(node, "pads", None) or [0] * (2 * n))
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    new_strides, mult = list(strides), [1] * n
    for i in range(n):
        axis = i + 2
        if axis not in j_in:
            continue
        jin, jout = j_in[axis], j_out.get(axis)
        if jout != jin * strides[i]:
            raise Fc2ConvError(f"{label}: the strides of the map cannot be traced through it (stride {strides[i]} "
                               f"takes {jin} to {jout}); --dense-stride cannot rewrite this model")
        mult[i] = _removed(node, jin, s)
        _removed(node, jout, s, "writes")
        a, b = min(jin, s), min(jout, s)
        if b % a:
            raise Fc2ConvError(f"--dense-stride {s} is not expressible: {label} (stride {strides[i]}) takes the map "
                               f"from stride {jin} to {jout}, and {s} is not a multiple of {jin}")
        new_strides[i] = b // a
    if all(f == 1 for f in mult) and new_strides == strides:
        return node              # before the rewritten layers
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if any(st > 1 for st in strides):
            raise Fc2ConvError(f"{label} pads by auto_pad={auto} with stride {'x'.join(map(str, strides))}: its "
                               "padding depends on the input size and changes with the stride, so the à trous map "
                               "would not line up; export the model with explicit pads to use --dense-stride")
        for i in range(n):  # stride 1: the padding is fixed, write it out
            total = dilations[i] * (int(kernel[i]) - 1)
            begin = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + n] = begin, total - begin
        auto = "NOTSET"
    elif auto == "VALID":
        pads, auto = [0] * (2 * n), "NOTSET"
    new_dil = [d * f for d, f in zip(dilations, mult)]
    new_pads = [p * mult[i % n] for i, p in enumerate(pads)]
    dilated = any(f > 1 for f in mult)
    if op == "MaxPool" and len(node.output) > 1 and node.output[1] and idx.uses(node.output[1]):
        raise Fc2ConvError(f"{label}'s Indices output is used; the à trous rewrite changes what the indices mean")
    if dilated and op == "MaxPool" and opset < 10:
        raise Fc2ConvError(f"{label} would need dilations, which MaxPool has from opset 10 (the model has opset "
                           f"{opset})")
    if dilated and op == "LpPool" and opset < 18:
        raise Fc2ConvError(f"{label} would need dilations, which LpPool has from opset 18 (the model has opset "
                           f"{opset})")
    fine.layers.append(f"{label}: stride {'x'.join(map(str, strides))} -> {'x'.join(map(str, new_strides))}, "
                       f"dilation {'x'.join(map(str, dilations))} -> {'x'.join(map(str, new_dil))}")
    if dilated and op == "AveragePool" and opset < 19:
        return _average_as_conv(node, kernel, new_strides, new_dil, new_pads, infos, idx, new_inits, namer)
    new = onnx.NodeProto()
    new.CopyFrom(node)
    for a in [a for a in new.attribute if a.name in ("strides", "dilations", "pads", "auto_pad")]:
        new.attribute.remove(a)
    new.attribute.extend([helper.make_attribute("strides", new_strides),
                          helper.make_attribute("pads", new_pads)])
    if dilated or attr(node, "dilations", None) is not None:
        new.attribute.append(helper.make_attribute("dilations", new_dil))
    return new


def _average_as_conv(node, kernel, strides, dilations, pads, infos, idx, new_inits, namer):
    """An AveragePool with dilations below opset 19: the same average as a
    depthwise Conv whose weights are 1/prod(kernel)."""
    label = f"AveragePool {node_label(node)!r}"
    why = None
    if attr(node, "ceil_mode", 0):
        why = "it uses ceil_mode"
    elif any(pads) and not attr(node, "count_include_pad", 0):
        why = "it pads without count_include_pad"
    info = infos.get(node.input[0])
    channels = info.shape[1] if info is not None and info.shape is not None and len(info.shape) > 1 else None
    if why is None and not isinstance(channels, int):
        why = "its channel count is unknown"
    elem = info.elem_type if info is not None else 0
    if why is None and elem not in FLOAT_TYPES:
        why = f"its dtype ({onnx.TensorProto.DataType.Name(elem) if elem else 'unknown'}) is not float"
    if why is not None:
        raise Fc2ConvError(f"{label} would need dilations, which AveragePool has from opset 19 (the model has "
                           f"opset {idx.opset}), and it cannot be written as a depthwise Conv: {why}")
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    weight = np.full([channels, 1] + [int(k) for k in kernel], 1.0 / float(np.prod(kernel)), dtype=dtype)
    name = namer(f"{node.output[0]}_atrous_mean_w")
    new_inits.append((name, weight))
    return helper.make_node("Conv", [node.input[0], name], [node.output[0]], name=node.name or node.output[0],
                            kernel_shape=[int(k) for k in kernel], strides=strides, dilations=dilations, pads=pads,
                            group=channels)


def _pad(node, m: dict, idx, opset: int, fine: Fine, new_inits, namer):
    """A Pad after the rewritten layers pads ``m`` times as many positions."""
    label = f"Pad {node_label(node)!r}"
    if len(node.input) > 3 and node.input[3]:
        raise Fc2ConvError(f"{label} pads given axes; --dense-stride cannot rescale it")
    new = onnx.NodeProto()
    new.CopyFrom(node)
    if opset < 11:
        pads = _ints(attr(node, "pads"))
    else:
        v = idx.value(node.input[1])
        if v is None:
            raise Fc2ConvError(f"{label} has pads that are not constant; --dense-stride cannot rescale them")
        pads = _ints(v.reshape(-1))
    rank = len(pads) // 2
    scaled = [p * m.get(i % rank, 1) for i, p in enumerate(pads)]
    if scaled == pads:
        return node
    fine.layers.append(f"{label}: pads {pads} -> {scaled}")
    if opset < 11:
        for a in [a for a in new.attribute if a.name == "pads"]:
            new.attribute.remove(a)
        new.attribute.append(helper.make_attribute("pads", scaled))
    else:
        name = namer(f"{node.input[1]}_atrous")
        new_inits.append((name, np.array(scaled, np.int64)))
        new.input[1] = name
    return new


def fine_geometry(g: MapGeometry, s: int) -> MapGeometry:
    """The geometry of the à trous map of stride ``s``: the trunk's stride kept as ``plain_stride``."""
    axes = tuple(dataclasses.replace(a, stride=s, plain_stride=a.stride) for a in g.axes)
    return dataclasses.replace(g, axes=axes, dense_stride=s)


def for_convert(model: onnx.ModelProto, dense: bool, maps: list[MapGeometry], dense_stride) -> list[MapGeometry]:
    """``convert(..., dense_stride=S)``: rewrite the freshly made dense model
    in place; ``maps`` is its geometry, the fine maps' is returned (``maps``
    itself when there is nothing to refine)."""
    if dense_stride is None:
        return maps
    if not dense:
        raise Fc2ConvError("--dense-stride needs --dense: it refines a dense score map")
    if not maps:
        log.warning("--dense-stride: no head was made dense, nothing to refine")
        return maps
    return apply(model, maps, dense_stride, inplace=True).geometry
