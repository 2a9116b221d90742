"""Build the sample models in models/ and the large benchmark layouts.

Everything here uses onnx.helper and numpy only (no torch). Weights are
He-scaled random normals (biases N(0, 0.01)) drawn from
``np.random.default_rng(seed)``, so the same seed gives byte-identical files:

    python tools/make_models.py              # writes models/*.onnx, prints sizes
    python tools/make_models.py --out DIR    # the same, into DIR

Written to models/ (all opset 13, IR 8, each well under 2 MB; see
models/README.md): ``lenet``, ``vgg_small``, ``conv1d_net``, ``conv3d_net``.

Other tools import this file (``sys.path.insert(0, "tools"); import
make_models``) for ``vgg16_layout`` and ``alexnet_layout`` (torchvision's
VGG16 and AlexNet layouts at 224x224, 553 MB (528 MiB) and 244 MB at defaults; built
at benchmark time, never committed) and ``save``. The large builders write
each initializer straight into the graph, so building VGG16 peaks at about
1.7 times its size in memory (~0.9 GiB) and takes a few seconds, most of it drawing the
random numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
OPSET = 13
IR_VERSION = 8
PRODUCER = "onnx-fc2conv tools/make_models.py"

__all__ = ["lenet", "vgg_small", "conv1d_net", "conv3d_net", "vgg16_layout", "alexnet_layout",
           "save", "SAMPLES", "VGG16_CFG", "main"]


class Net:
    """A tiny sequential graph builder with He-scaled random weights.

    Initializers are written straight into ``self.model.graph`` (never held in
    a list and copied), so a model of S bytes costs about S plus its largest
    tensor twice while it is built.
    """

    def __init__(self, seed: int, dtype=np.float32):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.model = onnx.ModelProto()
        self.graph = self.model.graph
        self.count: dict[str, int] = {}

    def _name(self, base: str) -> str:
        self.count[base] = self.count.get(base, 0) + 1
        return f"{base}{self.count[base]}"

    def _init(self, name: str, elem: int, dims, data: bytes) -> None:
        t = self.graph.initializer.add()
        t.name = name
        t.data_type = elem
        t.dims.extend(dims)
        t.raw_data = data

    @staticmethod
    def _raw(arr: np.ndarray) -> bytes:
        return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()

    def param(self, base: str, shape, fan_in: int, bias: bool = False) -> str:
        name = self._name(base)
        arr = self.rng.standard_normal(shape, dtype=np.float32)
        arr *= np.float32(0.01 if bias else np.sqrt(2.0 / fan_in))
        data = self._raw(arr.astype(self.dtype, copy=False))
        del arr  # free the array before the proto takes its copy of the bytes
        self._init(name, self.elem, shape, data)
        return name

    def const(self, base: str, arr) -> str:
        name = self._name(base)
        arr = np.asarray(arr)
        self._init(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape, self._raw(arr))
        return name

    def node(self, op: str, inputs, base: str | None = None, **attrs) -> str:
        name = self._name(base or op.lower())
        self.graph.node.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, k, stride=1, pad=0, relu=True) -> str:
        k = [k] * 2 if isinstance(k, int) else list(k)
        nd = len(k)
        w = self.param("conv_w", [cout, cin, *k], cin * int(np.prod(k)))
        b = self.param("conv_b", [cout], 1, bias=True)
        y = self.node("Conv", [x, w, b], "conv", kernel_shape=k, strides=[stride] * nd, pads=[pad] * (2 * nd))
        return self.node("Relu", [y]) if relu else y

    def maxpool(self, x: str, k: int, s: int, nd: int = 2) -> str:
        return self.node("MaxPool", [x], "pool", kernel_shape=[k] * nd, strides=[s] * nd)

    def fc(self, x: str, k: int, m: int) -> str:
        """Gemm(transB=1) with weight [m, k] and bias [m]."""
        w = self.param("fc_w", [m, k], k)
        b = self.param("fc_b", [m], 1, bias=True)
        return self.node("Gemm", [x, w, b], "fc", transB=1)

    def finish(self, x: str, input_shape, out_name: str) -> onnx.ModelProto:
        """Rename the last node's output to ``out_name`` and fill in the model's
        header, its input, and its output with the inferred shape."""
        g = self.graph
        g.node[-1].output[0] = out_name
        g.name = "net"
        g.input.append(helper.make_tensor_value_info(x, self.elem, input_shape))
        # Infer the output's shape on a weightless copy (initializers as typed inputs).
        light = helper.make_graph(
            list(g.node), "net",
            list(g.input) + [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in g.initializer],
            [helper.make_tensor_value_info(out_name, self.elem, None)])
        inferred = onnx.shape_inference.infer_shapes(
            helper.make_model(light, opset_imports=[helper.make_opsetid("", OPSET)]), strict_mode=True)
        out = next(vi for vi in inferred.graph.output if vi.name == out_name)
        g.output.append(out)
        m = self.model
        m.ir_version = IR_VERSION
        m.producer_name = PRODUCER
        m.opset_import.append(helper.make_opsetid("", OPSET))
        return m


# --------------------------------------------------------------- sample models


def lenet(seed: int = 0) -> onnx.ModelProto:
    """LeNet-5 style, no padding anywhere: input [1,1,28,28] -> map [1,16,4,4]
    -> Flatten -> Gemm 256->120 -> Relu -> Gemm 120->84 -> Relu -> Gemm 84->10
    -> "logits" [1,10]."""
    n = Net(seed)
    x = n.conv("input", 1, 6, 5)
    x = n.maxpool(x, 2, 2)
    x = n.conv(x, 6, 16, 5)
    x = n.maxpool(x, 2, 2)
    x = n.node("Flatten", [x], axis=1)
    x = n.node("Relu", [n.fc(x, 16 * 4 * 4, 120)])
    x = n.node("Relu", [n.fc(x, 120, 84)])
    x = n.fc(x, 84, 10)
    return n.finish("input", [1, 1, 28, 28], "logits")


def vgg_small(seed: int = 0, batch="N") -> onnx.ModelProto:
    """Three VGG blocks (8, 16, 32 channels) on [batch,3,32,32] -> map
    [batch,32,4,4] -> Flatten -> Gemm 512->128 -> Relu -> Dropout -> Gemm
    128->64 -> Relu -> Gemm 64->10 -> Softmax(axis=1) -> "prob"."""
    n = Net(seed)
    x, cin = "input", 3
    for cout in (8, 16, 32):
        x = n.conv(x, cin, cout, 3, pad=1)
        x = n.conv(x, cout, cout, 3, pad=1)
        x = n.maxpool(x, 2, 2)
        cin = cout
    x = n.node("Flatten", [x], axis=1)
    x = n.node("Relu", [n.fc(x, 32 * 4 * 4, 128)])
    x = n.node("Dropout", [x])
    x = n.node("Relu", [n.fc(x, 128, 64)])
    x = n.fc(x, 64, 10)
    x = n.node("Softmax", [x], axis=1)
    return n.finish("input", [batch, 3, 32, 32], "prob")


def conv1d_net(seed: int = 0) -> onnx.ModelProto:
    """Conv1d trunk, no padding: [N,4,64] -> map [N,16,13] -> Flatten -> Gemm
    208->32 -> Relu -> Gemm 32->10 -> "logits"."""
    n = Net(seed)
    x = n.conv("input", 4, 8, [5])
    x = n.maxpool(x, 2, 2, nd=1)
    x = n.conv(x, 8, 16, [5])
    x = n.maxpool(x, 2, 2, nd=1)
    x = n.node("Flatten", [x], axis=1)
    x = n.node("Relu", [n.fc(x, 16 * 13, 32)])
    x = n.fc(x, 32, 10)
    return n.finish("input", ["N", 4, 64], "logits")


def conv3d_net(seed: int = 0) -> onnx.ModelProto:
    """Conv3d trunk, pad 1: [N,2,8,8,8] -> map [N,8,2,2,2] -> Flatten -> Gemm
    64->16 -> Relu -> Gemm 16->5 -> "logits"."""
    n = Net(seed)
    x = n.conv("input", 2, 4, [3, 3, 3], pad=1)
    x = n.maxpool(x, 2, 2, nd=3)
    x = n.conv(x, 4, 8, [3, 3, 3], pad=1)
    x = n.maxpool(x, 2, 2, nd=3)
    x = n.node("Flatten", [x], axis=1)
    x = n.node("Relu", [n.fc(x, 8 * 2 * 2 * 2, 16)])
    x = n.fc(x, 16, 5)
    return n.finish("input", ["N", 2, 8, 8, 8], "logits")


# ----------------------------------------------------------- benchmark layouts

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_layout(seed: int = 0, batch="N", num_classes: int = 1000, fc_width: int = 4096,
                 dtype=np.float32) -> onnx.ModelProto:
    """torchvision's VGG16 at 224x224: 13 Conv 3x3 pad 1 + Relu, 5 MaxPool 2 s2
    -> map [batch,512,7,7] -> Flatten -> Gemm 25088->fc_width -> Relu -> Dropout
    -> Gemm fc_width->fc_width -> Relu -> Dropout -> Gemm -> num_classes ->
    "logits". ~553 MB at defaults (float32); ``dtype`` sets weights, input and
    output (e.g. np.float16)."""
    n = Net(seed, dtype)
    x, cin = "input", 3
    for v in VGG16_CFG:
        if v == "M":
            x = n.maxpool(x, 2, 2)
        else:
            x = n.conv(x, cin, v, 3, pad=1)
            cin = v
    x = n.node("Flatten", [x], axis=1)
    x = n.node("Dropout", [n.node("Relu", [n.fc(x, 512 * 7 * 7, fc_width)])])
    x = n.node("Dropout", [n.node("Relu", [n.fc(x, fc_width, fc_width)])])
    x = n.fc(x, fc_width, num_classes)
    return n.finish("input", [batch, 3, 224, 224], "logits")


def alexnet_layout(seed: int = 0, batch="N", num_classes: int = 1000, fc_width: int = 4096,
                   dtype=np.float32) -> onnx.ModelProto:
    """torchvision's AlexNet at 224x224: Conv 11x11 s4 p2 (64), MaxPool 3 s2,
    Conv 5x5 p2 (192), MaxPool 3 s2, Conv 3x3 p1 384/256/256, MaxPool 3 s2 ->
    map [batch,256,6,6] -> Flatten -> Dropout -> Gemm 9216->fc_width -> Relu ->
    Dropout -> Gemm -> Relu -> Gemm -> "logits". Its AdaptiveAvgPool2d((6,6)) is
    the identity at 224 and is left out. ~244 MB at defaults."""
    n = Net(seed, dtype)
    x = n.conv("input", 3, 64, 11, stride=4, pad=2)
    x = n.maxpool(x, 3, 2)
    x = n.conv(x, 64, 192, 5, pad=2)
    x = n.maxpool(x, 3, 2)
    x = n.conv(x, 192, 384, 3, pad=1)
    x = n.conv(x, 384, 256, 3, pad=1)
    x = n.conv(x, 256, 256, 3, pad=1)
    x = n.maxpool(x, 3, 2)
    x = n.node("Flatten", [x], axis=1)
    x = n.node("Relu", [n.fc(n.node("Dropout", [x]), 256 * 6 * 6, fc_width)])
    x = n.node("Relu", [n.fc(n.node("Dropout", [x]), fc_width, fc_width)])
    x = n.fc(x, fc_width, num_classes)
    return n.finish("input", [batch, 3, 224, 224], "logits")


# ------------------------------------------------------------------------ save


def save(model: onnx.ModelProto, path, external_data: bool = False) -> None:
    """Write ``model`` to ``path``. With ``external_data``, every tensor of 1 KiB
    or more goes to one ``<basename>.data`` file beside it (an old one is
    replaced, not appended to). ``model`` is left as it was: onnx moves the
    tensors out while saving, and they are read back afterwards."""
    path = Path(path)
    if not external_data:
        onnx.save_model(model, str(path))
        return
    location = path.name + ".data"
    data_path = path.with_name(location)
    if data_path.exists():
        data_path.unlink()  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    onnx.load_external_data_for_model(model, str(path.parent))


SAMPLES = {"lenet.onnx": lenet, "vgg_small.onnx": vgg_small, "conv1d_net.onnx": conv1d_net,
           "conv3d_net.onnx": conv3d_net}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the sample models (overwriting) and print their sizes.")
    ap.add_argument("--out", default=str(ROOT / "models"), help="folder to write into (default: models/)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, build in SAMPLES.items():
        model = build()
        onnx.checker.check_model(model, full_check=True)
        save(model, out / name)
        size = os.path.getsize(out / name)
        print(f"{out / name}: {size} bytes ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
