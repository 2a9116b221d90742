"""Build the sample models in models/ and the large benchmark layouts.

Everything here uses onnx.helper and numpy only (no torch), with seeded
random weights, so the files are reproducible:

    python tools/make_models.py            # writes models/*.onnx, prints sizes

Other tools import it (``sys.path.insert(0, "tools"); import make_models``)
for ``vgg16_layout`` and ``alexnet_layout`` (torchvision's layouts, ~528 MB
and ~233 MB at defaults, never committed) and ``save``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


class Net:
    """A tiny graph builder: a chain of layers with He-scaled random weights."""

    def __init__(self, seed: int, dtype=np.float32):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count: dict[str, int] = {}

    def _name(self, base: str) -> str:
        self.count[base] = self.count.get(base, 0) + 1
        return f"{base}{self.count[base]}"

    def param(self, base: str, shape, fan_in: int, bias: bool = False) -> str:
        name = self._name(base)
        if bias:
            arr = (self.rng.standard_normal(shape, dtype=np.float32) * 0.01).astype(self.dtype)
        else:
            arr = self.rng.standard_normal(shape, dtype=np.float32)
            arr *= np.float32(np.sqrt(2.0 / fan_in))
            arr = arr.astype(self.dtype, copy=False)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs, base: str | None = None, **attrs) -> str:
        name = self._name(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
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
        w = self.param("fc_w", [m, k], k)
        b = self.param("fc_b", [m], 1, bias=True)
        return self.node("Gemm", [x, w, b], "fc", transB=1)

    def model(self, x: str, input_shape, y: str, out_name: str, opset: int = 13) -> onnx.ModelProto:
        self.nodes[-1].output[0] = out_name
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        graph = helper.make_graph(self.nodes, "net", [helper.make_tensor_value_info(x, elem, input_shape)],
                                  [helper.make_tensor_value_info(out_name, elem, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8,
                                  producer_name="onnx-fc2conv tools/make_models.py")
        inferred = onnx.shape_inference.infer_shapes(helper.make_model(
            helper.make_graph(self.nodes, "net", list(graph.input) + [
                helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in self.inits],
                list(graph.output)),
            opset_imports=[helper.make_opsetid("", opset)]))
        for vi in inferred.graph.output:
            if vi.name == out_name:
                model.graph.output[0].CopyFrom(vi)
        return model


def lenet(seed: int = 0) -> onnx.ModelProto:
    """LeNet-5 style, no padding anywhere: [1,1,28,28] -> [1,16,4,4] -> 120 -> 84 -> 10."""
    n = Net(seed)
    x = n.conv("input", 1, 6, 5)
    x = n.maxpool(x, 2, 2)
    x = n.conv(x, 6, 16, 5)
    x = n.maxpool(x, 2, 2)
    x = n.node("Flatten", [x], axis=1)
    x = n.node("Relu", [n.fc(x, 256, 120)])
    x = n.node("Relu", [n.fc(x, 120, 84)])
    x = n.fc(x, 84, 10)
    return n.model("input", [1, 1, 28, 28], x, "logits")


def vgg_small(seed: int = 0, batch="N") -> onnx.ModelProto:
    """Three VGG blocks (8, 16, 32 channels) on 32x32, then
    Flatten -> FC 512->128 -> Relu -> Dropout -> FC 128->64 -> Relu -> FC 64->10 -> Softmax."""
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
    return n.model("input", [batch, 3, 32, 32], x, "prob")


def conv1d_net(seed: int = 0) -> onnx.ModelProto:
    """Conv1d trunk: [N,4,64] -> [N,16,13] -> Flatten -> FC -> Relu -> FC(10)."""
    n = Net(seed)
    x = n.conv("input", 4, 8, [5], stride=1)
    x = n.maxpool(x, 2, 2, nd=1)
    x = n.conv(x, 8, 16, [5])
    x = n.maxpool(x, 2, 2, nd=1)
    x = n.node("Flatten", [x], axis=1)
    x = n.node("Relu", [n.fc(x, 16 * 13, 32)])
    x = n.fc(x, 32, 10)
    return n.model("input", ["N", 4, 64], x, "logits")


def conv3d_net(seed: int = 0) -> onnx.ModelProto:
    """Conv3d trunk: [N,2,8,8,8] -> [N,8,2,2,2] -> Reshape [0,-1] -> FC -> Relu -> FC(5)."""
    n = Net(seed)
    x = n.conv("input", 2, 4, [3, 3, 3], pad=1)
    x = n.maxpool(x, 2, 2, nd=3)
    x = n.conv(x, 4, 8, [3, 3, 3], pad=1)
    x = n.maxpool(x, 2, 2, nd=3)
    shape = "flat_shape"
    n.inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), shape))
    x = n.node("Reshape", [x, shape])
    x = n.node("Relu", [n.fc(x, 8 * 8, 16)])
    x = n.fc(x, 16, 5)
    return n.model("input", ["N", 2, 8, 8, 8], x, "logits")


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_layout(seed: int = 0, batch="N", num_classes: int = 1000, fc_width: int = 4096,
                 dtype=np.float32) -> onnx.ModelProto:
    """torchvision's VGG16 layout at 224x224 (~528 MB at defaults)."""
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
    return n.model("input", [batch, 3, 224, 224], x, "logits")


def alexnet_layout(seed: int = 0, batch="N", num_classes: int = 1000, fc_width: int = 4096,
                   dtype=np.float32) -> onnx.ModelProto:
    """torchvision's AlexNet layout at 224x224 (its AdaptiveAvgPool2d((6,6)) is
    the identity there and is left out)."""
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
    return n.model("input", [batch, 3, 224, 224], x, "logits")


def save(model: onnx.ModelProto, path, external_data: bool = False) -> None:
    path = Path(path)
    if external_data:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, path)


SAMPLES = {"lenet.onnx": lenet, "vgg_small.onnx": vgg_small, "conv1d_net.onnx": conv1d_net,
           "conv3d_net.onnx": conv3d_net}


def main(argv=None) -> int:
    out = ROOT / "models"
    out.mkdir(exist_ok=True)
    for name, build in SAMPLES.items():
        model = build()
        onnx.checker.check_model(model, full_check=True)
        save(model, out / name)
        print(f"{name}: {(out / name).stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
