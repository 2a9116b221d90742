"""Issue 22's contract on files real exporters write (tests/fixtures/exporters22,
made by tools/fixtures/exporters22.py): every FC converts in keep mode and,
except the MeanVarianceNormalization row, in dense mode, each proven by the
check in onnxruntime against the ORIGINAL model; `inspect` names every region
step between and after the FCs; MobileNetV3's squeeze-excitation trunk goes
dense with keep_global_pools; QOperator files keep their quantization; a
forking head (MTCNN R-Net/O-Net) gives every output a map of one geometry;
shapes ONNX inference cannot give come from the runtime probe, and `inspect`
says so.

What each test expects is read from the fixture file itself (its FCs, the
nodes between them, its outputs), never from the code under test."""

from pathlib import Path

import onnx
import pytest

from onnx_fc2conv import Fc2ConvError, cli, convert
from onnx_fc2conv.api import check_result

FIXTURES = Path(__file__).parent / "fixtures" / "exporters22"
FC_OPS = {"Gemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger"}

# file: (row of issue 22's table, dense mode: "dense" | "dense, keep global pools" | "refused: <name>")
ROWS = {
    "gelu_mlp_ts.onnx": ("GELU (erf) between FCs", "dense"),
    "gelu_tanh_mlp_ts.onnx": ("GELU tanh between FCs", "dense"),
    "silu_mlp_ts.onnx": ("SiLU between FCs", "dense"),
    "silu_mlp_dynamo.onnx": ("SiLU between FCs", "dense"),
    "mish_mlp_ts.onnx": ("Mish between FCs", "dense"),
    "act_chain_ts.onnx": ("GELU, Mish between FCs, SiLU after the last", "dense"),
    "rmsnorm_mlp_dynamo.onnx": ("RMSNorm between FCs", "dense"),
    "mobilenet_v3_small_w025_op13_ts.onnx": ("Hardswish as x*HardSigmoid(x)", "dense, keep global pools"),
    "kws_ln_mlp_op16_ts.onnx": ("LayerNorm decomposed between FCs", "dense"),
    "nhwc_mean_cast_ts.onnx": ("NHWC ReduceMean(axes=[1,2], keepdims=0), Casts around", "dense"),
    "nhwc_mean_cast_dynamo.onnx": ("NHWC ReduceMean(axes=[1,2], keepdims=0), Casts around", "dense"),
    "resnet_narrow_qop.onnx": ("QOperator (onnxruntime quantizer)", "dense"),
    "resnet_narrow_qop_pc.onnx": ("QOperator (onnxruntime quantizer)", "dense"),
    "alexnet_narrow_qop.onnx": ("QOperator (onnxruntime quantizer)", "dense"),
    "mvn_trunk_op13.onnx": ("MeanVarianceNormalization, default axes, in the trunk",
                            "refused: MeanVarianceNormalization"),
    "mtcnn_rnet_ts.onnx": ("forking head", "dense"),
    "mtcnn_rnet_dynamo.onnx": ("forking head", "dense"),
    "mtcnn_onet_ts.onnx": ("forking head", "dense"),
    "mtcnn_rnet_tf2onnx.onnx": ("forking head (after a PReLU region: Relu, Neg, Relu, Mul, Add)", "dense"),
}
# MTCNN's P-Net has no FC (issue 19's fully convolutional model with a fixed input)
NO_FC = {"mtcnn_pnet_ts.onnx", "mtcnn_pnet_dynamo.onnx"}
QOPERATOR = sorted(n for n, (row, _) in ROWS.items() if row.startswith("QOperator"))
PROBED = QOPERATOR + ["mvn_trunk_op13.onnx"]   # ONNX shape inference leaves their head's shapes unknown
DENSE = sorted(n for n, (_, dense) in ROWS.items() if dense.startswith("dense"))


def load(name) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / name))


def fc_nodes(model) -> list:
    """The FCs as the exporter wrote them: Gemm, QGemm, MatMul with a constant 2-D weight."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in FC_OPS
            and (n.op_type != "MatMul" or any(i in inits and len(inits[i].dims) == 2 for i in n.input))]


def regions(model) -> list[list[str]]:
    """The op types (graph order) between each FC and the next FC or the output it reaches,
    where that is more than one node: the region steps inspect must name. (In these files
    there is at most one region after an FC; a region is the whole run of nodes there.)"""
    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    fcs = {id(n) for n in fc_nodes(model)}
    order = {id(n): k for k, n in enumerate(g.node)}
    found = []
    inits = {t.name for t in g.initializer}
    for fc in fc_nodes(model):
        out = fc.output[0]
        after = consumers.get(out, [])
        if fc.op_type == "MatMul" and len(after) == 1 and after[0].op_type == "Add" and set(after[0].input) & inits:
            out = after[0].output[0]       # MatMul + Add (the bias) is the FC
        seen, todo = {}, list(consumers.get(out, []))
        while todo:                        # everything downstream of the FC up to the next FC
            n = todo.pop()
            last = not any(consumers.get(o) for o in n.output)
            if id(n) in seen or id(n) in fcs or (last and n.op_type in ("Softmax", "Sigmoid")):
                continue                   # a final Softmax/Sigmoid on an output is a plain step, not a region
            seen[id(n)] = n
            todo += [c for o in n.output for c in consumers.get(o, [])]
        # Constants, and a Relu after a LayerNorm, are not part of a region
        ops = [n.op_type for n in sorted(seen.values(), key=lambda n: order[id(n)])
               if n.op_type not in ("Constant", "Relu", "Identity")]
        if len(ops) > 1:
            found.append(ops)
    return found


def inspect_text(capsys, *args) -> str:
    capsys.readouterr()
    code = cli.main(["inspect", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, f"inspect exited {code}: {out.err}"
    return out.out


def unconverted(result) -> str:
    return "; ".join(f"{layer.name} ({layer.op}): {layer.reason}" for layer in result.layers if not layer.converted)


def test_every_fixture_is_listed():
    files = sorted(p.name for p in FIXTURES.glob("*.onnx"))
    assert files == sorted(set(ROWS) | NO_FC)
    readme = (FIXTURES.parent / "README.md").read_text()
    missing = [f for f in files if f not in readme]
    assert not missing, f"tests/fixtures/README.md does not table {missing}"


def test_the_fixtures_hold_the_rows_patterns():
    """The files are what the rows say (guards the fixtures, not the tool): decomposed forms, no fused op."""
    def types(name):
        return {n.op_type for n in load(name).graph.node}

    assert {"Erf"} <= types("gelu_mlp_ts.onnx") and "Gelu" not in types("gelu_mlp_ts.onnx")
    assert {"Tanh"} <= types("gelu_tanh_mlp_ts.onnx") and "Gelu" not in types("gelu_tanh_mlp_ts.onnx")
    assert {"Softplus", "Tanh"} <= types("mish_mlp_ts.onnx") and "Mish" not in types("mish_mlp_ts.onnx")
    assert {"HardSigmoid", "GlobalAveragePool"} <= types("mobilenet_v3_small_w025_op13_ts.onnx")
    assert "HardSwish" not in types("mobilenet_v3_small_w025_op13_ts.onnx")
    assert "LayerNormalization" not in types("kws_ln_mlp_op16_ts.onnx")
    assert {"ReduceMean", "Cast"} <= types("nhwc_mean_cast_ts.onnx")
    assert {"QLinearAdd", "QLinearGlobalAveragePool", "QGemm"} <= types("resnet_narrow_qop.onnx")
    assert "MeanVarianceNormalization" in types("mvn_trunk_op13.onnx")
    assert [o.name for o in load("mtcnn_onet_ts.onnx").graph.output] == ["box", "landmarks", "prob"]
    for name in NO_FC:
        assert not fc_nodes(load(name))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_keep_mode_converts_every_fc(name):
    fcs = len(fc_nodes(load(name)))
    result = convert(FIXTURES / name)
    assert len(result.layers) == fcs, f"{ROWS[name][0]}: found {len(result.layers)} of the file's {fcs} FCs"
    assert result.converted == fcs, f"{ROWS[name][0]}: {result.converted}/{fcs} FCs converted; {unconverted(result)}"
    report = check_result(result)
    assert report.ok, "\n".join(report.lines())


@pytest.mark.parametrize("name", QOPERATOR)
def test_qoperator_keeps_the_quantization(name):
    result = convert(FIXTURES / name)
    assert result.converted == len(result.layers), unconverted(result)
    plain = [layer.name for layer in result.layers if layer.conv == "Conv"]
    assert not plain, f"these quantized FCs became float Convs: {plain}"
    left = [n.name for n in result.model.graph.node if n.op_type in FC_OPS]
    assert not left, f"FC nodes left in the keep-mode model: {left}"


@pytest.mark.parametrize("name", DENSE)
def test_dense_mode_converts_every_fc(name):
    keep_pools = ROWS[name][1] == "dense, keep global pools"
    fcs = len(fc_nodes(load(name)))
    try:
        result = convert(FIXTURES / name, dense=True, keep_global_pools=keep_pools)
    except Fc2ConvError as exc:
        pytest.fail(f"{ROWS[name][0]}: dense mode refused: {exc}")
    assert result.converted == fcs, f"{ROWS[name][0]}: {result.converted}/{fcs} FCs converted; {unconverted(result)}"
    report = check_result(result, keep_global_pools=keep_pools)
    assert report.ok, "\n".join(report.lines())


def test_mobilenet_v3_se_trunk_needs_keep_global_pools():
    """Without keep_global_pools the squeeze-excitation pools in the trunk refuse dense mode, by name."""
    with pytest.raises(Fc2ConvError, match="GlobalAveragePool"):
        convert(FIXTURES / "mobilenet_v3_small_w025_op13_ts.onnx", dense=True)


@pytest.mark.parametrize("name", sorted(n for n in ROWS if n.startswith("mtcnn_")))
def test_a_forking_head_gives_every_output_a_map_of_one_geometry(name):
    outputs = [o.name for o in load(name).graph.output]
    try:
        result = convert(FIXTURES / name, dense=True)
    except Fc2ConvError as exc:
        pytest.fail(f"dense mode refused: {exc}")
    dense_out = {o.name: len(o.type.tensor_type.shape.dim) for o in result.model.graph.output}
    assert sorted(dense_out) == sorted(outputs)
    flat = [o for o, rank in dense_out.items() if rank != 4]
    assert not flat, f"outputs that are not [N,C,H,W] maps in dense mode: {flat}"
    mapped = {o for g in result.maps for o in g.outputs}
    assert mapped == set(outputs), f"outputs with a geometry: {sorted(mapped)}, outputs: {outputs}"
    axes = {g.axes for g in result.maps}
    assert len(axes) == 1, f"the outputs' maps differ in geometry: {axes}"


def test_mvn_dense_mode_is_refused_naming_it():
    with pytest.raises(Fc2ConvError) as exc:
        convert(FIXTURES / "mvn_trunk_op13.onnx", dense=True)
    message = str(exc.value)
    assert "MeanVarianceNormalization" in message or "'mvn1'" in message, (
        f"dense mode must refuse naming the MVN node (it mixes positions); it said: {message}")
    assert "is unknown" not in message, f"the refusal should be the MVN's, not a missing shape's: {message}"


@pytest.mark.parametrize("name", sorted(n for n in ROWS if regions(load(n))))
def test_inspect_names_each_region_step(name, capsys):
    text = inspect_text(capsys, FIXTURES / name)
    lines = [ln for ln in text.splitlines() if "region" in ln.lower()]
    for ops in regions(load(name)):
        named = [ln for ln in lines if all(op in ln for op in set(ops))]
        assert named, f"no inspect line names the region ({', '.join(ops)}); inspect said:\n{text}"


@pytest.mark.parametrize("name", PROBED)
def test_inspect_says_which_shapes_came_from_the_runtime_probe(name, capsys):
    text = inspect_text(capsys, FIXTURES / name)
    assert "onnxruntime" in text, f"inspect does not say which shapes came from the runtime probe:\n{text}"
    assert "is unknown" not in text, f"a shape the FCs need is still unknown:\n{text}"
