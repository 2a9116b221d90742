"""The infrastructure under load and save: the external-data leaf module (no
load<->save import cycle, one caller of onnx's private tensor walk), the
public atomic write, the constant-folding budget of GraphIndex.value, and
ModelProtos whose external data was never loaded."""

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import onnx_fc2conv
from helpers import feeds_for, run, external_data_model
from onnx_fc2conv import Fc2ConvError, extdata, graph
from onnx_fc2conv import load as load_mod

PACKAGE = Path(onnx_fc2conv.__file__).parent


# -- imports -------------------------------------------------------------

def _package_imports(module: str) -> set[str]:
    """The package modules ``module`` imports, at the top or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("onnx_fc2conv."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("onnx_fc2conv."))
    return {m for m in found if (PACKAGE / f"{m}.py").exists()}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for dep in _package_imports(m):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_load_and_save_do_not_import_each_other():
    assert "save" not in _reachable("load"), _reachable("load")
    assert "load" not in _reachable("save"), _reachable("save")


def test_extdata_is_a_leaf():
    assert _package_imports("extdata") <= {"errors"}
    assert _package_imports("errors") == set()


def test_one_caller_of_the_private_tensor_walk():
    callers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "_get_all_tensors" in p.read_text())
    assert callers == ["extdata.py"]


def test_old_names_still_importable():
    from onnx_fc2conv.load import declared_bytes, external_bytes, has_external, is_external, materialized
    from onnx_fc2conv.save import atomic_write, estimated_size  # noqa: F401

    assert (is_external, external_bytes, has_external, materialized, declared_bytes) == (
        extdata.is_external, extdata.external_bytes, extdata.has_external, extdata.materialized,
        extdata.declared_bytes)
    assert estimated_size is extdata.estimated_size


# -- all_tensors ---------------------------------------------------------

def _tensor_rich_model() -> onnx.ModelProto:
    """Tensors in every place onnx's walk looks: initializers, a Constant,
    an If's branches (initializer and Constant inside) and a local function."""
    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.asarray(value, np.float32), name + "_t"))

    then_g = helper.make_graph([const("t_c", [1.0]), helper.make_node("Add", ["t_c", "t_w"], ["t_out"])], "then",
                               [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1])],
                               [numpy_helper.from_array(np.array([2.0], np.float32), "t_w")])
    else_g = helper.make_graph([const("e_c", [3.0])], "else", [],
                               [helper.make_tensor_value_info("e_c", TensorProto.FLOAT, [1])])
    fn = helper.make_function("local", "AddK", ["a"], ["b"],
                              [const("k", [4.0]), helper.make_node("Add", ["a", "k"], ["b"])],
                              [helper.make_opsetid("", 17)])
    nodes = [const("c0", [5.0]),
             helper.make_node("If", ["cond"], ["y0"], then_branch=then_g, else_branch=else_g),
             helper.make_node("AddK", ["y0"], ["y1"], domain="local"),
             helper.make_node("Add", ["y1", "w0"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                          [numpy_helper.from_array(np.array([6.0], np.float32), "w0")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                             functions=[fn])


def _names(tensors):
    return [(t.name, t.SerializeToString()) for t in tensors]


def test_all_tensors_walks_what_onnx_walks():
    m = _tensor_rich_model()
    got = _names(extdata.all_tensors(m))
    assert got == _names(external_data_helper._get_all_tensors(m))
    assert {n for n, _ in got} == {"w0", "t_w", "c0_t", "t_c_t", "e_c_t", "k_t"}


def test_all_tensors_without_onnx_private_helper(monkeypatch):
    m = _tensor_rich_model()
    want = _names(external_data_helper._get_all_tensors(m))
    monkeypatch.delattr(external_data_helper, "_get_all_tensors")
    assert _names(extdata.all_tensors(m)) == want
    # and the walk still finds tensors to mutate, as materialized() needs
    for t in extdata.all_tensors(m):
        if t.name == "k_t":
            t.name = "renamed"
    assert "renamed" in [t.name for t in extdata.all_tensors(m)]


def test_declared_bytes():
    t = numpy_helper.from_array(np.zeros((3, 5), np.float16), "h")
    assert extdata.declared_bytes(t) == 30 == len(t.raw_data)
    t4 = helper.make_tensor("q", TensorProto.INT4, [3, 3], [1] * 9)
    assert extdata.declared_bytes(t4) == 5  # two per byte, rounded up
    unknown = TensorProto(name="u", data_type=999, dims=[2])
    assert extdata.declared_bytes(unknown) is None


# -- atomic_write --------------------------------------------------------

def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_bytes_and_callables(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    from onnx_fc2conv.save import atomic_write

    atomic_write(target, [b"ab", lambda: b"cd", b""])
    assert target.read_bytes() == b"abcd"
    assert _leftovers(tmp_path) == []


def test_atomic_write_relative_path(tmp_path, monkeypatch):
    from onnx_fc2conv.save import atomic_write

    monkeypatch.chdir(tmp_path)
    atomic_write("here.txt", [b"x\n"])
    assert (tmp_path / "here.txt").read_bytes() == b"x\n"


def test_atomic_write_refusals(tmp_path):
    from onnx_fc2conv.save import atomic_write

    with pytest.raises(Fc2ConvError, match="the output folder .* does not exist"):
        atomic_write(tmp_path / "nowhere" / "out.bin", [b"x"])
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "adir").mkdir()
    with pytest.raises(Fc2ConvError, match="is a directory"):
        atomic_write(tmp_path / "adir", [b"x"])


def test_atomic_write_failure_keeps_the_previous_file(tmp_path):
    from onnx_fc2conv.save import atomic_write

    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def broken():
        raise OSError(28, "No space left on device")

    with pytest.raises(Fc2ConvError, match="cannot write: No space left on device"):
        atomic_write(target, [b"half", broken])
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


# -- the constant-folding budget ------------------------------------------

def _add_chain(n: int) -> onnx.ModelProto:
    """t0 = 1 (an initializer), t{i} = Add(t{i-1}, one): t{n} = 1 + n."""
    nodes = [helper.make_node("Add", [f"t{i - 1}", "one"], [f"t{i}"]) for i in range(1, n + 1)]
    nodes.append(helper.make_node("Add", ["x", f"t{n}"], ["y"]))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                          [numpy_helper.from_array(np.array([1.0], np.float32), "t0"),
                           numpy_helper.from_array(np.array([1.0], np.float32), "one")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def counted(monkeypatch):
    """How many nodes GraphIndex evaluates."""
    calls = []
    real = graph.run_node

    def counting(node, feeds, opset):
        calls.append(node.output[0])
        return real(node, feeds, opset)

    monkeypatch.setattr(graph, "run_node", counting)
    return calls


def test_short_chain_is_folded(counted):
    n = 10
    assert graph._MAX_FOLD_NODES > n
    v = graph.GraphIndex(_add_chain(n)).value(f"t{n}")
    np.testing.assert_array_equal(v, np.array([1.0 + n], np.float32))
    assert len(counted) == n


@pytest.mark.parametrize("n", [graph._MAX_FOLD_NODES + 1, 200, 5000])
def test_long_chain_stays_within_the_budget(counted, n):
    idx = graph.GraphIndex(_add_chain(n))
    assert idx.value(f"t{n}") is None
    assert len(counted) <= graph._MAX_FOLD_NODES
    assert idx.value(f"t{n}") is None  # the answer is kept: no more work
    assert len(counted) <= graph._MAX_FOLD_NODES


def test_chain_of_exactly_the_budget_is_folded(counted):
    n = graph._MAX_FOLD_NODES
    v = graph.GraphIndex(_add_chain(n)).value(f"t{n}")
    np.testing.assert_array_equal(v, np.array([1.0 + n], np.float32))
    assert len(counted) == n


def test_values_found_earlier_are_free(counted):
    n = 100  # over the budget in one go, within it in two halves
    idx = graph.GraphIndex(_add_chain(n))
    assert idx.value("t50") is not None
    v = idx.value(f"t{n}")
    np.testing.assert_array_equal(v, np.array([1.0 + n], np.float32))
    assert len(counted) == n


def test_wide_expression_shares_one_budget(counted):
    """A Concat of many small constant branches: the budget covers the whole
    expression, not each branch."""
    k = 100
    nodes = [helper.make_node("Neg", [f"c{i}"], [f"n{i}"]) for i in range(k)]
    nodes.append(helper.make_node("Concat", [f"n{i}" for i in range(k)], ["cat"], axis=0))
    nodes.append(helper.make_node("Add", ["x", "cat"], ["y"]))
    inits = [numpy_helper.from_array(np.array([float(i)], np.float32), f"c{i}") for i in range(k)]
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert graph.GraphIndex(m).value("cat") is None
    assert len(counted) <= graph._MAX_FOLD_NODES


def test_cycle_is_not_a_constant(counted):
    nodes = [helper.make_node("Add", ["b", "one"], ["a"]), helper.make_node("Identity", ["a"], ["b"])]
    g = helper.make_graph(nodes, "cycle", [], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                          [numpy_helper.from_array(np.array([1.0], np.float32), "one")])
    idx = graph.GraphIndex(helper.make_model(g))
    assert idx.value("a") is None and idx.value("b") is None
    assert counted == []


# -- ModelProtos with external data never loaded ------------------------------

@pytest.fixture
def external_src(tmp_path):
    """(path of a model whose weights are in w.data, its in-memory twin)."""
    return external_data_model(tmp_path / "in", "m.onnx", "w.data")


def _header(path) -> onnx.ModelProto:
    m = onnx.load(path, load_external_data=False)
    assert extdata.has_external(m)
    return m


def _first_external(m: onnx.ModelProto) -> str:
    return next(t.name for t in extdata.all_tensors(m) if extdata.is_external(t))


@pytest.mark.parametrize("cwd", ["elsewhere", "beside"])
def test_unloaded_external_data_is_refused(external_src, tmp_path, monkeypatch, cwd):
    src, _ = external_src
    m = _header(src)
    before = m.SerializeToString()
    other = tmp_path / "other"
    other.mkdir()
    # beside the data file a relative read would work by chance: refused all the same
    monkeypatch.chdir(other if cwd == "elsewhere" else src.parent)
    with pytest.raises(Fc2ConvError) as info:
        onnx_fc2conv.convert(m)
    msg = str(info.value)
    assert repr(_first_external(m)) in msg and "'w.data'" in msg
    assert "never loaded" in msg and "pass the model's path" in msg
    assert m.SerializeToString() == before


def test_unloaded_external_data_refused_by_inspect_too(external_src, tmp_path, monkeypatch):
    src, _ = external_src
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Fc2ConvError, match="never loaded"):
        onnx_fc2conv.inspect(_header(src))


def _absolute(m: onnx.ModelProto, folder: Path, name: str = "w.data") -> onnx.ModelProto:
    for t in extdata.all_tensors(m):
        for e in t.external_data:
            if e.key == "location":
                e.value = str(folder / name)
    return m


def test_absolute_locations_convert(external_src, tmp_path, monkeypatch):
    """What the tool's own loaded models hold: absolute paths of real files."""
    src, twin = external_src
    m = _absolute(_header(src), src.parent)
    monkeypatch.chdir(tmp_path)
    result = onnx_fc2conv.convert(m)
    out = tmp_path / "conv.onnx"
    onnx_fc2conv.save(result.model, out)
    feeds = feeds_for(twin)
    np.testing.assert_allclose(run(onnx.load(out), feeds)[0], run(twin, feeds)[0], rtol=1e-5, atol=1e-6)
    # and a model loaded by the tool goes through again
    again = onnx_fc2conv.convert(load_mod.load(src).model)
    assert [layer.converted for layer in again.layers] == [layer.converted for layer in result.layers]


def test_absolute_location_missing_file(external_src, tmp_path):
    src, _ = external_src
    m = _absolute(_header(src), tmp_path, "gone.data")
    with pytest.raises(Fc2ConvError, match="gone.data.* is missing; pass the model's path") as info:
        onnx_fc2conv.convert(m)
    assert repr(_first_external(m)) in str(info.value)


def test_absolute_location_too_short(external_src, tmp_path):
    src, _ = external_src
    short = tmp_path / "short.data"
    short.write_bytes((src.parent / "w.data").read_bytes()[:100])
    m = _absolute(_header(src), tmp_path, "short.data")
    with pytest.raises(Fc2ConvError, match="reads past the end of"):
        onnx_fc2conv.convert(m)


def test_absolute_location_is_a_folder(external_src, tmp_path):
    src, _ = external_src
    m = _absolute(_header(src), tmp_path.parent, tmp_path.name)
    with pytest.raises(Fc2ConvError, match="is not a file"):
        onnx_fc2conv.convert(m)


# -- the check's reading of an original: weights left in the .onnx file ------

def _tensors(m: onnx.ModelProto) -> dict:
    return {t.name: (t.data_type, list(t.dims), graph.tensor_value(t).tobytes()) for t in m.graph.initializer}


def test_weights_in_file_reads_what_load_reads(tmp_path):
    from builders import head_model

    model = head_model(feature_shape=(16, 8, 8), m1=32, fc="gemm_tb1")   # a 32x1024 FC: 128 KiB
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    full = load_mod.load(path, check=False).model
    light = load_mod.load(path, check=False, weights_in_file=True).model
    in_file = [t for t in light.graph.initializer if extdata.is_external(t)]
    assert in_file and all(extdata.external_info(t)["location"] == str(path.resolve()) for t in in_file)
    assert light.ByteSize() < full.ByteSize() // 4         # the weights were not parsed
    assert _tensors(light) == _tensors(full)                # every value, byte for byte, from its offset
    assert sum(len(t.raw_data) for t in light.graph.initializer) < 1 << 16
    for m in (full, light):
        m.graph.ClearField("initializer")
    assert light.SerializeToString() == full.SerializeToString()
    # a check of the converted model against that file runs and passes
    converted = onnx_fc2conv.convert(path).model
    assert onnx_fc2conv.check(path, converted)


def test_weights_in_file_keeps_a_data_files_tensors(external_src):
    src, _ = external_src
    full = load_mod.load(src, check=False).model
    light = load_mod.load(src, check=False, weights_in_file=True).model
    assert light.SerializeToString() == full.SerializeToString()   # nothing inline to leave: the plain load


def test_weights_in_file_truncated_file_is_refused_as_by_load(tmp_path):
    from builders import head_model

    path = tmp_path / "m.onnx"
    data = head_model(feature_shape=(16, 8, 8), m1=32, fc="gemm_tb1").SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Fc2ConvError) as plain:
        load_mod.load(path, check=False)
    with pytest.raises(Fc2ConvError) as light:
        load_mod.load(path, check=False, weights_in_file=True)
    assert str(light.value) == str(plain.value)
