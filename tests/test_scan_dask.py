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
