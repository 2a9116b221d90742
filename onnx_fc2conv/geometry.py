"""Where each position of a dense score map looks in the input image.

Along every path from the image input to the head's window source, each
Conv/Pool with kernel ``k``, dilation ``d``, stride ``s`` and leading pad
``p`` updates, per spatial axis (the standard receptive-field recursion)::

    k_eff  = d * (k - 1) + 1
    rf'    = rf + (k_eff - 1) * jump
    offset'= offset - p * jump
    jump'  = jump * s

starting from ``jump = 1, rf = 1, offset = 0`` at the input. The head's Conv
(kernel = the native map size ``h``, stride 1) adds ``(h - 1) * jump`` to the
receptive field. Position ``i`` of the score map then sees input pixels
``[offset + i * stride, offset + i * stride + rf - 1]`` along that axis
(negative or past-the-end pixels are the trunk's zero padding).

Where paths join (residual Add, Concat) strides must agree; the receptive
field is the widest and the offset the smallest of the joined paths.
"""

from __future__ import annotations

from dataclasses import dataclass


from .errors import Fc2ConvError
from .graph import GraphIndex, attr, node_label


@dataclass(frozen=True)
class Axis:
    """One input axis as seen by one tensor axis."""
    input: str
    input_axis: int
    stride: int
    receptive_field: int
    offset: int
    padded: bool = False

    def to_dict(self) -> dict:
        return {"input": self.input, "input_axis": self.input_axis, "stride": self.stride,
                "receptive_field": self.receptive_field, "offset": self.offset}


def compose(layers, start: Axis) -> Axis:
    """Apply ``(kernel, stride, pad_begin, dilation)`` layers in order."""
    a = start
    for k, s, p, d in layers:
        k_eff = d * (k - 1) + 1
        a = Axis(a.input, a.input_axis, a.stride * s, a.receptive_field + (k_eff - 1) * a.stride,
                 a.offset - p * a.stride, a.padded or p > 0)
    return a


WINDOWED = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
MIXING = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "InstanceNormalization", "Resize",
                    "Upsample", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
                    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Reshape", "Flatten",
                    "ConvTranspose", "MatMul", "Gemm", "GroupNormalization", "LayerNormalization",
                    "SpaceToDepth", "DepthToSpace", "RoiAlign", "MaxRoiPool", "Einsum", "ScatterND",
                    "GatherND", "GridSample", "Expand", "Tile"})


class Tracer:
    """Geometry of every spatial tensor axis, memoised; refuses ops that mix
    positions (a global pool or a Reshape in the trunk) with their name."""

    def __init__(self, idx: GraphIndex, shapes):
        self.idx = idx
        self.shapes = shapes
        self.memo: dict[str, dict[int, Axis]] = {}
        # Reshapes that only regroup the leading (non-spatial) axes but pin the
        # spatial size in a constant: dense mode rewrites their shape from
        # Shape(x). node id -> (node, spatial rank, middle dims)
        self.reshapes: dict[int, tuple] = {}

    def _shape(self, name):
        info = self.shapes.get(name)
        return None if info is None else info.shape

    def geo(self, name: str) -> dict[int, Axis]:
        if name in self.memo:
            return self.memo[name]
        self.memo[name] = {}
        result = self._compute(name)
        self.memo[name] = result
        return result

    def _compute(self, name: str) -> dict[int, Axis]:
        idx = self.idx
        if idx.value(name) is not None:
            return {}
        node = idx.producer.get(name)
        if node is None:
            if name in idx.inputs:
                rank = len(self._shape(name) or ())
                return {a: Axis(name, a, 1, 1, 0) for a in range(1, rank)}
            return {}
        op = node.op_type
        data = [i for i in node.input if i and idx.value(i) is None]
        if op == "Shape" or op == "Size":
            return {}
        if not data:
            return {}
        if op in WINDOWED:
            return self._windowed(node)
        if op == "Transpose":
            perm = list(attr(node, "perm", []) or reversed(range(len(self._shape(node.input[0]) or ()))))
            src = self.geo(node.input[0])
            return {i: src[p] for i, p in enumerate(perm) if p in src}
        if op == "Pad":
            return self._pad(node)
        if op == "Reshape" and node.domain in ("", "ai.onnx"):
            return self._reshape(node)
        if op in ("Slice", "Gather") and node.domain in ("", "ai.onnx"):
            return self._select(node)
        if op in MIXING or node.domain not in ("", "ai.onnx"):
            srcs = [self.geo(i) for i in data]
            if any(s for s in srcs):
                raise Fc2ConvError(f"{op} {node_label(node)!r} in the trunk mixes or fixes spatial positions, "
                                   "so the model cannot be made dense")
            return {}
        if op in ("Concat", "Split", "Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "CumSum",
                  "TopK", "LpNormalization"):
            axis = attr(node, "axis", 1 if op != "Softmax" else -1)
            rank = len(self._shape(node.output[0]) or self._shape(data[0]) or ())
            if rank and axis % rank >= 2:
                srcs = [self.geo(i) for i in data]
                if any(s for s in srcs):
                    raise Fc2ConvError(f"{op} {node_label(node)!r} in the trunk acts along a spatial axis, "
                                       "so the model cannot be made dense")
        return self._join(node, [self.geo(i) for i in data])

    def _join(self, node, srcs) -> dict[int, Axis]:
        out: dict[int, Axis] = {}
        for src in srcs:
            for axis, a in src.items():
                if axis not in out:
                    out[axis] = a
                    continue
                b = out[axis]
                if (a.input, a.input_axis) != (b.input, b.input_axis) or a.stride != b.stride:
                    raise Fc2ConvError(f"{node.op_type} {node_label(node)!r} joins maps of different strides "
                                       f"({a.stride} and {b.stride}); the dense geometry is undefined")
                out[axis] = Axis(a.input, a.input_axis, a.stride, max(a.receptive_field, b.receptive_field),
                                 min(a.offset, b.offset), a.padded or b.padded)
        return out

    def _refuse(self, node, why: str):
        raise Fc2ConvError(f"{node.op_type} {node_label(node)!r} in the trunk {why}, so the model cannot be made dense")

    def _reshape(self, node) -> dict[int, Axis]:
        """A Reshape that keeps the spatial axes last and untouched (a channel
        shuffle's [N,C,H,W] -> [N,g,C/g,H,W]) maps them through; anything
        else mixes positions."""
        src = self.geo(node.input[0])
        if not src:
            return {}
        ishape, oshape = self._shape(node.input[0]), self._shape(node.output[0])
        spatial = sorted(src)
        if ishape is None or oshape is None or len(node.input) < 2:
            self._refuse(node, "reshapes spatial axes")
        r_in, r_out, s = len(ishape), len(oshape), len(spatial)
        target = self.idx.value(node.input[1])
        # The spatial axes stay last with their sizes (where inference knows the
        # input's); the batch entry is replaced by Shape(x)[0] when rewritten.
        ok = (spatial == list(range(r_in - s, r_in)) and r_out > s
              and all(isinstance(d, int) for d in oshape[1:])
              and all(not isinstance(a, int) or a == b for a, b in zip(ishape[r_in - s:], oshape[r_out - s:]))
              and target is not None and target.ndim == 1 and len(target) == r_out
              and [int(d) for d in target[r_out - s:]] == [int(d) for d in oshape[r_out - s:]])
        if not ok:
            self._refuse(node, "reshapes spatial axes")
        self.reshapes[id(node)] = (node, s, [int(d) for d in oshape[1:r_out - s]])
        return {r_out - s + j: src[spatial[j]] for j in range(s)}

    def _select(self, node) -> dict[int, Axis]:
        """Slice/Gather along non-spatial axes (a channel split) keep positions."""
        src = self.geo(node.input[0])
        if not src:
            return {}
        rank = len(self._shape(node.input[0]) or ())
        if node.op_type == "Gather":
            axes = [int(attr(node, "axis", 0))]
            if self.idx.value(node.input[1]) is None or self.idx.value(node.input[1]).ndim != 1:
                self._refuse(node, "gathers with indices that change the rank")
        else:
            axes = attr(node, "axes", None)
            if axes is None and len(node.input) > 3 and node.input[3]:
                v = self.idx.value(node.input[3])
                axes = None if v is None else [int(a) for a in v.reshape(-1)]
            if axes is None:
                starts = attr(node, "starts", None)
                if starts is None and len(node.input) > 1:
                    v = self.idx.value(node.input[1])
                    starts = None if v is None else list(v.reshape(-1))
                axes = list(range(len(starts))) if starts is not None else None
        if axes is None or not rank or any(a % rank in src for a in axes):
            self._refuse(node, "slices along a spatial axis")
        return dict(src)

    def _windowed(self, node) -> dict[int, Axis]:
        src = self.geo(node.input[0])
        ishape = self._shape(node.input[0])
        if node.op_type == "Conv":
            wshape = self._shape(node.input[1])
            kernel = attr(node, "kernel_shape", None) or (list(wshape[2:]) if wshape else None)
        else:
            kernel = attr(node, "kernel_shape", None)
        if kernel is None:
            raise Fc2ConvError(f"{node.op_type} {node_label(node)!r} has no known kernel shape")
        n = len(kernel)
        strides = attr(node, "strides", None) or [1] * n
        dilations = attr(node, "dilations", None) or [1] * n
        pads = attr(node, "pads", None) or [0] * (2 * n)
        auto = attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        out: dict[int, Axis] = {}
        for i in range(n):
            axis = i + 2
            if axis not in src:
                continue
            k, s, d = int(kernel[i]), int(strides[i]), int(dilations[i])
            p = int(pads[i])
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                size = ishape[axis] if ishape else None
                if not isinstance(size, int):
                    raise Fc2ConvError(f"{node.op_type} {node_label(node)!r} pads by auto_pad={auto} on an unknown size")
                total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
                p = total // 2 if auto == "SAME_UPPER" else total - total // 2
            elif auto == "VALID":
                p = 0
            out[axis] = compose([(k, s, p, d)], src[axis])
        return out

    def _pad(self, node) -> dict[int, Axis]:
        src = self.geo(node.input[0])
        pads = attr(node, "pads", None)
        if pads is None and len(node.input) > 1:
            v = self.idx.value(node.input[1])
            pads = None if v is None else [int(x) for x in v.reshape(-1)]
        if pads is None or (len(node.input) > 3 and node.input[3]):
            raise Fc2ConvError(f"Pad {node_label(node)!r} in the trunk has unknown pads")
        rank = len(pads) // 2
        out = {}
        for axis, a in src.items():
            p = pads[axis] if axis < rank else 0
            out[axis] = Axis(a.input, a.input_axis, a.stride, a.receptive_field, a.offset - p * a.stride,
                             a.padded or p > 0)
        return out
