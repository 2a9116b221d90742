"""Saving: atomic files, external data in and out (copied by default, shared
on request), the 2 GB switch, byte-identical reruns, data files that never
grow, weights reused without copies."""

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import head_model
from helpers import feeds_for, run, external_data_model
from onnx_fc2conv import check, cli, convert, save
from onnx_fc2conv.save import estimated_size


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def external_model(tmp_path):
    """A model whose weights live in model.onnx.data, as the dynamo exporter writes."""
    return external_data_model(tmp_path / "in", "model.onnx", "model.onnx.data")


def _locations(path):
    m = onnx.load(path, load_external_data=False)
    return {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}


def test_external_in_external_out_copied(external_model, tmp_path, capsys):
    src, original = external_model
    data_before = sha(src.with_suffix(".onnx.data"))
    out = src.parent / "conv.onnx"
    assert cli.main(["convert", str(src), "-o", str(out), "--check"]) == 0
    assert _locations(out) == {"conv.onnx.data"}, "the output must be self-contained by default"
    assert sha(src.with_suffix(".onnx.data")) == data_before
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for p in (out, out.with_suffix(".onnx.data")):
        os.replace(p, moved / p.name)
    feeds = feeds_for(original)
    np.testing.assert_allclose(run(onnx.load(moved / "conv.onnx"), feeds)[0], run(original, feeds)[0],
                               rtol=1e-5, atol=1e-6)


def test_share_data_references_the_input_file(external_model, capsys):
    src, original = external_model
    out = src.parent / "conv.onnx"
    assert cli.main(["convert", str(src), "-o", str(out), "--share-data"]) == 0
    assert "model.onnx.data" in _locations(out)
    assert not out.with_suffix(".onnx.data").exists() or out.with_suffix(".onnx.data").stat().st_size < \
        src.with_suffix(".onnx.data").stat().st_size
    assert check(src, out)


def test_share_data_elsewhere_copies(external_model, tmp_path, capsys):
    src, _ = external_model
    out = tmp_path / "conv.onnx"
    assert cli.main(["convert", str(src), "-o", str(out), "--share-data"]) == 0
    assert _locations(out) == {"conv.onnx.data"}
    assert check(src, out)


def test_overwriting_the_input_with_its_own_data_file(external_model, capsys):
    """Output == input: its data file is replaced, so everything is copied
    first (read before the rename), and the result still runs."""
    src, original = external_model
    assert cli.main(["convert", str(src), "-o", str(src), "--overwrite", "--share-data"]) == 0
    assert _locations(src) == {"model.onnx.data"}
    feeds = feeds_for(original)
    np.testing.assert_allclose(run(onnx.load(src), feeds)[0], run(original, feeds)[0], rtol=1e-5, atol=1e-6)


def test_rerun_is_byte_identical_and_data_does_not_grow(external_model, capsys):
    src, _ = external_model
    out = src.parent / "conv.onnx"
    digests = []
    for _ in range(3):
        assert cli.main(["convert", str(src), "-o", str(out)]) == 0
        digests.append((sha(out), sha(out.with_suffix(".onnx.data")), out.with_suffix(".onnx.data").stat().st_size))
    assert digests[0] == digests[1] == digests[2]


def test_in_file_rerun_is_byte_identical(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(head_model(), src)
    out = tmp_path / "o.onnx"
    assert cli.main(["convert", str(src), "-o", str(out)]) == 0
    first = sha(out)
    assert cli.main(["convert", str(src), "-o", str(out)]) == 0
    assert sha(out) == first


def test_two_gigabyte_switch(tmp_path):
    """Over the limit the output goes external by itself (limit lowered here)."""
    result = convert(head_model(feature_shape=(8, 4, 4), m1=32))
    out = tmp_path / "big.onnx"
    files = save(result.model, out, limit=estimated_size(result.model) - 1)
    assert files == [out, tmp_path / "big.onnx.data"]
    assert _locations(out) == {"big.onnx.data"}
    small = tmp_path / "small.onnx"
    assert save(result.model, small) == [small] and not _locations(small)
    a, b = onnx.load(out), onnx.load(small)
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        assert x.name == y.name and np.array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))


def test_external_data_flag(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(head_model(feature_shape=(8, 4, 4), m1=32), src)
    out = tmp_path / "o.onnx"
    assert cli.main(["convert", str(src), "-o", str(out), "--external-data", "--check"]) == 0
    assert _locations(out) == {"o.onnx.data"}


def test_save_leaves_the_model_as_it_was(tmp_path):
    result = convert(head_model(feature_shape=(8, 4, 4), m1=32))
    before = result.model.SerializeToString()
    save(result.model, tmp_path / "a.onnx", external_data=True)
    assert result.model.SerializeToString() == before


def test_several_external_files_and_relative_locations(tmp_path, capsys):
    folder = tmp_path / "multi"
    (folder / "weights").mkdir(parents=True)
    m = head_model(feature_shape=(8, 4, 4), m1=32)
    onnx.save_model(m, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
                    location="weights", size_threshold=256)
    header = onnx.load(folder / "m.onnx", load_external_data=False)
    assert len({e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}) > 1
    out = tmp_path / "o.onnx"
    assert cli.main(["convert", str(folder / "m.onnx"), "-o", str(out), "--check"]) == 0


def test_output_files_get_the_usual_mode(tmp_path):
    """mkstemp creates 0600 files; the saved model and its data follow the umask."""
    old = os.umask(0o022)
    try:
        result = convert(head_model(feature_shape=(8, 4, 4), m1=32))
        files = save(result.model, tmp_path / "m.onnx", external_data=True)
        for f in files:
            assert (f.stat().st_mode & 0o777) == 0o644, f
    finally:
        os.umask(old)
