"""scan on dask.distributed: ``--workers 2`` (a LocalCluster of two worker
processes) and ``--scheduler`` (a real ``dask scheduler`` and two real
``dask worker`` processes on 127.0.0.1), one of which is killed mid-scan:
the map is the one-pass map either way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
import distributed

from onnx_fc2conv import scan
from onnx_fc2conv.scanning import store

from scan_models import assert_exact, one_pass

ROOT = Path(__file__).resolve().parents[1]


def _pixels(shape, seed=0):
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def test_local_workers_give_the_one_pass_map(tmp_path):
    pixels = _pixels((150, 140, 3))
    np.save(tmp_path / "img.npy", pixels)
    result = scan("models/vgg_small.onnx", tmp_path / "img.npy", tmp_path / "o.zarr", tile=90, workers=2)
    assert result.computed == result.tiles > 4
    got = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["prob"][...]
    assert_exact(got, one_pass("models/vgg_small.onnx", pixels)["prob"], "--workers 2")


def _worker_settings():
    import os

    import dask

    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"), \
        dask.config.get("distributed.worker.profile.enabled")


def test_local_workers_run_without_profiler_or_malloc_trim():
    """--workers' LocalCluster: no 10 ms profiler on the task thread and
    glibc's own mmap threshold (tools/bench_scan.py (c)), one OpenMP thread kept."""
    from onnx_fc2conv.scanning import engine

    with engine.dask_client(workers=1) as client:
        settings = list(client.run(_worker_settings).values())
    assert settings == [(None, "1", False)]


@pytest.mark.parametrize("quiet", [False, True])
def test_local_workers_print_nothing_of_dask_with_port_8787_taken(tmp_path, quiet):
    """--workers' scheduler serves no dashboard, yet an HTTP server (health, metrics)
    on 8787 unless told otherwise: with 8787 taken (another scan, a dask dashboard)
    distributed warned on the CLI's stderr. Only the progress bar there, nothing under -q."""
    np.save(tmp_path / "img.npy", _pixels((150, 140, 3)))
    argv = [sys.executable, "-m", "onnx_fc2conv", "scan", str(ROOT / "models/vgg_small.onnx"), "img.npy",
            "-o", "o.zarr", "--workers", "2", "--tile", "90"] + (["-q"] if quiet else [])
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", 8787))
            held.listen()
        except OSError:
            pass                                  # taken already: the case under test
        proc = subprocess.run(argv, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "distributed" not in proc.stderr and "8787" not in proc.stderr, proc.stderr
    assert all(ln.startswith("scan: ") for ln in lines) and (lines == []) == quiet, proc.stderr
    assert "wrote o.zarr" in proc.stdout or quiet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask(*args) -> list:
    return [sys.executable, "-m", "distributed.cli.dask_" + args[0]] + list(args[1:])


@pytest.fixture
def cluster(tmp_path):
    """A scheduler and two workers (no nanny: a killed worker stays dead), torn down after."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = open(tmp_path / "dask.log", "wb")
    procs = [subprocess.Popen(_dask("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"),
                              env=env, stdout=log, stderr=log, cwd=tmp_path)]
    try:
        for i in range(2):
            procs.append(subprocess.Popen(_dask("worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                                "--name", f"w{i}", "--host", "127.0.0.1"),
                                          env=env, stdout=log, stderr=log, cwd=tmp_path))
        with distributed.Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield address, procs
    finally:
        for p in reversed(procs):   # test processes of our own: no graceful shutdown to wait for
            if p.poll() is None:
                p.kill()
            p.wait()
        log.close()


def test_scheduler_with_two_workers_one_killed_mid_scan(tmp_path, cluster):
    address, procs = cluster
    pixels = _pixels((300, 300, 3), 1)
    np.save(tmp_path / "img.npy", pixels)
    out = tmp_path / "o.zarr"
    from onnx_fc2conv import cli

    code = []
    runner = threading.Thread(target=lambda: code.append(cli.main(
        ["scan", "models/vgg_small.onnx", str(tmp_path / "img.npy"), "-o", str(out), "--tile", "100",
         "--scheduler", address, "-q"])))
    runner.start()
    flags = out / store.DONE / "c"
    deadline = time.monotonic() + 90
    while runner.is_alive() and time.monotonic() < deadline:
        if flags.exists() and sum(1 for p in flags.rglob("*") if p.is_file()) >= 8:
            break
        time.sleep(0.01)
    killed = runner.is_alive()
    if killed:
        procs[1].send_signal(signal.SIGKILL)   # a lost worker: its tiles go to the other one
    runner.join(120)
    assert not runner.is_alive() and code == [0]
    assert killed, "the scan finished before a worker could be killed"
    group = zarr.open_group(str(out), mode="r")
    assert store.done_flags(group).all()
    assert_exact(group["prob"][...], one_pass("models/vgg_small.onnx", pixels)["prob"], "--scheduler")


BLIND_SCHEDULER = """
import sys
class Blind:                      # this environment has no onnx_fc2conv
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnx_fc2conv":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Blind())
from distributed.cli.dask_scheduler import main
sys.argv[0] = "dask-scheduler"
main()
"""


def test_a_scheduler_without_onnx_fc2conv_is_one_line_naming_the_install(tmp_path, capsys):
    """A real scheduler whose environment lacks the package cannot unpickle scan's tasks:
    exit 2 and one line that says what the cluster needs, not dask's traceback."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("DASK_LOGGING__DISTRIBUTED", None)    # an earlier CLI scan in this process set it to critical
    log = open(tmp_path / "dask.log", "wb")
    procs = [subprocess.Popen([sys.executable, "-c", BLIND_SCHEDULER, "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=log, stderr=log, cwd=tmp_path)]
    try:
        procs.append(subprocess.Popen(_dask("worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                            "--host", "127.0.0.1"), env=env, stdout=log, stderr=log, cwd=tmp_path))
        with distributed.Client(address, timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
        np.save(tmp_path / "img.npy", _pixels((150, 140, 3)))
        from onnx_fc2conv import cli

        code = cli.main(["scan", "models/vgg_small.onnx", str(tmp_path / "img.npy"), "-o", str(tmp_path / "o.zarr"),
                         "--tile", "90", "--scheduler", address, "-q"])
    finally:
        for p in reversed(procs):
            p.terminate()            # not kill: the scheduler's log must reach the file
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "dask cluster" in err and "need onnx-fc2conv" in err and "Traceback" not in err
    assert b"No module named 'onnx_fc2conv" in (tmp_path / "dask.log").read_bytes()


def _truncated_tiff(path, shape=(256, 256)):
    """A tiled TIFF cut in half (the lower tiles unreadable), and its pixels to repair it with."""
    pixels = _pixels(shape, 3)
    tifffile.imwrite(path, pixels, tile=(32, 32), compression="zlib")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return pixels


@pytest.mark.parametrize("where", ["workers", "scheduler"])
def test_unreadable_region_on_dask_stops_with_one_line_and_resumes_once_repaired(tmp_path, where, request):
    """A truncated TIFF read by dask workers (a LocalCluster, or real worker processes of a scheduler): exit 2 with
    one stderr line naming the region, no traceback; the tiles finished before it stay in OUT with their flags; once
    the file is repaired, --resume completes the map, identical to a clean run."""
    how = ["--workers", "2"] if where == "workers" else ["--scheduler", request.getfixturevalue("cluster")[0]]
    img, out = tmp_path / "slide.tif", tmp_path / "o.zarr"
    pixels = _truncated_tiff(img)
    argv = [sys.executable, "-m", "onnx_fc2conv", "scan", str(ROOT / "models/digits.onnx"), str(img), "-o", str(out),
            "--tile", "64", "--threads", "1", "-q"] + how
    proc = subprocess.run(argv, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{img}: cannot read region rows " in proc.stderr and ", cols " in proc.stderr, proc.stderr
    assert proc.stdout == ""
    group = zarr.open_group(str(out), mode="r")
    flags = store.done_flags(group)
    assert 0 < flags.sum() < flags.size, flags       # the tiles before the bad rows are kept
    ref = one_pass("models/digits.onnx", pixels)["logits"]
    k = store.read_attrs(out)["tile"]["positions"]
    for t in zip(*np.nonzero(flags)):
        box = (slice(None), slice(t[0] * k[0], (t[0] + 1) * k[0]), slice(t[1] * k[1], (t[1] + 1) * k[1]))
        assert_exact(group["logits"][box], ref[box], f"tile {t} kept")
    tifffile.imwrite(img, pixels, tile=(32, 32), compression="zlib")       # repaired
    kw = {} if where == "workers" else dict(scheduler=how[1])   # (a second LocalCluster would add seconds)
    result = scan("models/digits.onnx", img, out, tile=64, threads=1, resume=True, **kw)
    assert result.resumed == flags.sum() and result.computed == flags.size - flags.sum()
    scan("models/digits.onnx", img, tmp_path / "ref.zarr", tile=64, threads=1)
    got, want = (zarr.open_group(str(p), mode="r")["logits"][...] for p in (out, tmp_path / "ref.zarr"))
    assert not np.isnan(got).any() and np.array_equal(got, want)
