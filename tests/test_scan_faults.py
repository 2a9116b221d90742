"""scan's faults: an existing OUT, an unreadable region, a killed scan that
resumes to the identical map, the progress bar, a missing extra."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from onnx_fc2conv import Fc2ConvError, cli, scan
from onnx_fc2conv.images import ArrayImage
from onnx_fc2conv.scanning import store

ROOT = Path(__file__).resolve().parents[1]


def _image(tmp_path, shape=(120, 100, 3), seed=0):
    path = tmp_path / "img.npy"
    np.save(path, (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8))
    return path


def _main(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_existing_out_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    img = _image(tmp_path)
    out = tmp_path / "o.zarr"
    assert _main(capsys, "scan", "models/vgg_small.onnx", img, "-o", out, "--tile", "200", "-q")[0] == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, _, err = _main(capsys, "scan", "models/vgg_small.onnx", img, "-o", out, "--tile", "200")
    assert code == 2 and err.count("\n") == 1 and "exists; --resume" in err and "--overwrite" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    code, _, err = _main(capsys, "scan", "models/vgg_small.onnx", img, "-o", out, "--tile", "100", "--overwrite", "-q")
    assert code == 0 and store.read_attrs(out)["tile"]["size"] == [100, 100]


def test_overwrite_never_removes_a_folder_scan_did_not_write(tmp_path, capsys):
    img = _image(tmp_path)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "data.txt").write_text("keep me")
    code, _, err = _main(capsys, "scan", "models/vgg_small.onnx", img, "-o", out, "--overwrite")
    assert code == 2 and "not a scan written by onnx-fc2conv" in err
    assert (out / "data.txt").read_text() == "keep me"


def test_resume_refuses_a_scan_of_other_settings(tmp_path):
    img = _image(tmp_path)
    out = tmp_path / "o.zarr"
    scan("models/vgg_small.onnx", img, out, tile=200)
    with pytest.raises(Fc2ConvError, match="cannot resume: its tile differs"):
        scan("models/vgg_small.onnx", img, out, tile=100, resume=True)
    with pytest.raises(Fc2ConvError, match="cannot resume: its preprocessing differs"):
        scan("models/vgg_small.onnx", img, out, tile=200, resume=True, scale=1.0)


class _Truncated(ArrayImage):
    """An image whose rows from ``bad`` on cannot be read (as a truncated file's)."""

    def __init__(self, array, bad):
        super().__init__(array, 2, "slide.tif")
        self.bad = bad

    def _read(self, box):
        if box[0][1] > self.bad:
            raise OSError("unexpected end of data")
        return super()._read(box)


def test_unreadable_region_stops_with_one_line_naming_it_and_keeps_finished_tiles(tmp_path, capsys, monkeypatch):
    pixels = (np.random.default_rng(1).random((200, 120, 3)) * 255).astype(np.uint8)
    import onnx_fc2conv.images as images

    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda src, **kw: _Truncated(pixels, 150) if str(src) == "slide.tif"
                        else real(src, **kw))
    (tmp_path / "slide.tif").write_bytes(b"")  # exists; its regions are read through _Truncated
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.zarr"
    code, _, err = _main(capsys, "scan", ROOT / "models/vgg_small.onnx", "slide.tif", "-o", out, "--tile", "100", "-q")
    assert code == 2 and err.count("\n") == 1
    assert "slide.tif: cannot read region rows " in err and "OSError: unexpected end of data" in err
    flags = store.done_flags(zarr.open_group(str(out), mode="r"))
    assert 0 < flags.sum() < flags.size           # the tiles before the bad rows are kept
    prob = zarr.open_group(str(out), mode="r")["prob"][...]
    k = store.read_attrs(out)["tile"]["positions"]
    for t in zip(*np.nonzero(flags)):
        assert not np.isnan(prob[:, t[0] * k[0]:(t[0] + 1) * k[0], t[1] * k[1]:(t[1] + 1) * k[1]]).any()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_killed_scan_resumes_to_the_identical_map(tmp_path, sig):
    img = _image(tmp_path, (300, 300, 3), 2)
    out, ref = tmp_path / "o.zarr", tmp_path / "ref.zarr"
    argv = [sys.executable, "-m", "onnx_fc2conv", "scan", "models/vgg_small.onnx", str(img), "-o", str(out),
            "--tile", "100", "-q", "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    flags_dir = out / store.DONE / "c"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if flags_dir.exists() and sum(1 for p in flags_dir.rglob("*") if p.is_file()) >= 10:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the scan ended before it could be killed"
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGINT:
        err = proc.stderr.read().decode()
        assert proc.returncode == 130 and "interrupted;" in err and "--resume" in err, err
    before = store.done_flags(zarr.open_group(str(out), mode="r"))
    assert 10 <= before.sum() < before.size
    result = scan("models/vgg_small.onnx", img, out, tile=100, resume=True, threads=1)
    assert result.resumed == before.sum() and result.computed == before.size - before.sum()
    scan("models/vgg_small.onnx", img, ref, tile=100, threads=1)
    got, want = (zarr.open_group(str(p), mode="r")["prob"][...] for p in (out, ref))
    assert not np.isnan(got).any() and np.array_equal(got, want)


def test_progress_bar_on_stderr_and_quiet(tmp_path, capsys):
    img = _image(tmp_path, (150, 150, 3))
    code, out, err = _main(capsys, "scan", "models/vgg_small.onnx", img, "-o", tmp_path / "a.zarr", "--tile", "90")
    assert code == 0 and "tile" in err and "px/s" in err and "100%" in err
    assert "wrote" in out and "tiles:" in out
    code, out, err = _main(capsys, "scan", "models/vgg_small.onnx", img, "-o", tmp_path / "b.zarr", "--tile", "90",
                           "-q")
    assert code == 0 and err == "" and out == ""


def test_without_the_scan_extra_it_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)
    code, _, err = _main(capsys, "scan", "models/vgg_small.onnx", _image(tmp_path), "-o", tmp_path / "o.zarr")
    assert code == 2 and "pip install 'onnx-fc2conv[scan]'" in err
    assert not (tmp_path / "o.zarr").exists()


def test_check_exit_code(tmp_path, capsys):
    img = _image(tmp_path, (90, 90, 3))
    code, out, _ = _main(capsys, "scan", "models/vgg_small.onnx", img, "-o", tmp_path / "o.zarr", "--tile", "80",
                         "--check", "--samples", "2")
    assert code == 0 and "PASSED" in out and "FAILED" not in out


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc (Linux)")
def test_reading_a_memory_mapped_image_does_not_grow_the_resident_set(tmp_path):
    """A scan reads every region once: the file's pages must not pile up in the process (RSS would grow with the
    image, 2.5 GB for a 20000^2 RGB .npy before this was fixed)."""
    from onnx_fc2conv.images import open_image

    path = tmp_path / "big.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(4096, 4096, 4))
    arr[:] = 7
    arr.flush()
    del arr
    img = open_image(path)
    before = _rss_file_kb()
    for r0 in range(0, 4096, 512):
        assert img.read(((r0, r0 + 512), (0, 4096))).sum() == 7 * 512 * 4096 * 4
    grown = _rss_file_kb() - before
    assert grown < 16 * 1024, f"the resident set grew by {grown} kB reading a 64 MiB file"


@pytest.mark.parametrize("zarr_present", [False, True], ids=["no-zarr", "zarr-2"])
def test_on_python_3_10_it_says_scan_needs_python_3_11(tmp_path, capsys, monkeypatch, zarr_present):
    """zarr 3 needs Python >= 3.11, so the scan extra installs no zarr on 3.10 (setup.cfg's marker); scan says why."""
    monkeypatch.setattr(store, "python_version", lambda: (3, 10))
    if zarr_present:
        monkeypatch.setattr(zarr, "__version__", "2.18.3")
    else:
        monkeypatch.setitem(sys.modules, "zarr", None)
    code, _, err = _main(capsys, "scan", "models/vgg_small.onnx", _image(tmp_path), "-o", tmp_path / "o.zarr")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "Python >= 3.11" in err and "this is Python 3.10" in err and "pip install 'onnx-fc2conv[scan]'" in err
    assert ("zarr 2.18.3 is installed" if zarr_present else "zarr is not installed") in err
    assert not (tmp_path / "o.zarr").exists()


def test_the_scan_extra_resolves_on_python_3_10():
    """setup.cfg: zarr (3 needs Python 3.11) is in the scan and test extras only under a python_version marker."""
    from configparser import ConfigParser

    from packaging.requirements import Requirement

    cfg = ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert Requirement("x" + cfg["options"]["python_requires"]).specifier.contains("3.10")
    for extra in ("scan", "test"):
        reqs = {r.name: r for r in map(Requirement, filter(None, cfg["options.extras_require"][extra].splitlines()))}
        assert reqs["zarr"].marker is not None and str(reqs["zarr"].specifier) == ">=3", extra
        assert not reqs["zarr"].marker.evaluate({"python_version": "3.10"}), extra
        assert reqs["zarr"].marker.evaluate({"python_version": "3.11"}), extra
        assert all(r.marker is None for n, r in reqs.items() if n != "zarr"), extra
