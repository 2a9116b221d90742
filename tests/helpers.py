"""Model builders and the one round-trip assertion the tests share."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

FC_OPS = {"Gemm", "MatMul"}


def parse(text: str, **inits) -> onnx.ModelProto:
    """A model from ONNX text, with initializers given as numpy arrays."""
    model = onnx.parser.parse_model(text)
    for name, value in inits.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def signature(model: onnx.ModelProto):
    inits = {t.name for t in model.graph.initializer}
    return ([(i.name, i.type.SerializeToString()) for i in model.graph.input if i.name not in inits],
            [(o.name, o.type.SerializeToString()) for o in model.graph.output])


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def feeds_for(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        # a free dim (symbolic, unknown, or -1 as paddle2onnx writes it) gets ``batch``
        dims = [d.dim_value if d.dim_value > 0 else batch for d in i.type.tensor_type.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = rng.standard_normal(dims).astype(dt)
    return feeds


def assert_converts(model: onnx.ModelProto, *, convs: int, fcs_left: int = 0, batch: int = 2,
                    input_shapes=None, rtol: float = 1e-4, atol: float = 1e-5):
    """Convert ``model``, then assert: the checker accepts the result, FC ops
    are gone (``fcs_left`` remain) and ``convs`` Convs took their place, the
    I/O signature is unchanged, the input model is untouched, and onnxruntime
    gives the same outputs (tolerances relative to the output's magnitude)."""
    from onnx_fc2conv import convert

    before = model.SerializeToString()
    result = convert(model, input_shapes=input_shapes)
    assert model.SerializeToString() == before, "convert mutated its argument"
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    n_conv_before = ops(model).count("Conv")
    assert ops(out).count("Conv") - n_conv_before == convs, ops(out)
    assert sum(op in FC_OPS for op in ops(out)) == fcs_left, ops(out)
    assert signature(out) == signature(model)
    feeds = feeds_for(model, batch)
    for e, a in zip(run(model, feeds), run(out, feeds)):
        assert e.shape == a.shape and e.dtype == a.dtype
        scale = max(1.0, float(np.max(np.abs(e.astype(np.float64))))) if e.size else 1.0
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol * scale)
    return result


def external_data_model(folder, name: str, location: str):
    """``(path, twin)``: a head model saved in ``folder`` with its weights in the
    data file ``location`` (as the dynamo exporter writes), and its in-memory
    twin (onnx strips the weights from the model it saves)."""
    from builders import head_model

    folder.mkdir()
    twin = head_model(feature_shape=(8, 4, 4), m1=32, fc="gemm_tb1")
    onnx.save_model(head_model(feature_shape=(8, 4, 4), m1=32, fc="gemm_tb1"), folder / name,
                    save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=256)
    return folder / name, twin
