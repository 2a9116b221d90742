"""Running tiles: in this process, on a local dask cluster (``--workers N``)
or on a running dask.distributed cluster (``--scheduler ADDRESS``).

One function computes a tile wherever it runs (:func:`run_tile`): read the
tile's region of the image, preprocess it, run the dense model, keep the
positions the tile owns (tiling.py) and write them to their chunk of OUT,
then set the tile's flag (store.py). Each process keeps one :class:`Worker`
per scan (the onnxruntime session, the open image and the open arrays), so
a dask worker loads the dense model once however many tiles it runs.

Threads: onnxruntime's intra-op threads are ``cores // N`` for N local
workers (each with one dask thread), so N x threads = cores; in this process
alone, two tiles in flight on one session (two lanes, ``cores // 2``
threads each; :func:`lanes_for`). On a remote cluster each worker process
uses ``cores // nthreads`` of
its machine.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

import numpy as np

from ..errors import Fc2ConvError
from . import model as model_mod, store

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything a worker needs besides the model's bytes (picklable)."""
    key: str
    dense: model_mod.DenseModel       # without its bytes
    image: object                     # a path, or an ndarray (scattered to the cluster)
    level: int
    tiling: object                    # tiling.Tiling
    prep: model_mod.Preprocessing
    out: str
    provider: str = "cpu"
    threads: int | None = None        # onnxruntime intra-op threads (None: cores // worker threads)
    block: tuple | None = None        # map positions per block per axis (None: a tile is one block)


def new_job(dense, image, level, tiling, prep, out, provider, threads, block=None) -> Job:
    return Job(uuid.uuid4().hex, replace(dense, data=b"", original=None), image, level, tiling, prep, str(out),
               provider, threads, None if block is None else tuple(int(k) for k in block))


def session(data: bytes, provider: str, threads: int | None):
    """An onnxruntime session tuned for throughput (the check's sessions turn
    optimizations off; the scan's map is proved against one-pass maps within
    float reordering)."""
    import onnxruntime as ort

    from ..check.run import PROVIDERS

    want = PROVIDERS.get(provider)
    if want is None or want not in ort.get_available_providers():
        raise Fc2ConvError(f"provider {provider!r} is not available in this onnxruntime "
                           f"(it has {', '.join(ort.get_available_providers())})"
                           + ("; install onnxruntime-gpu instead of onnxruntime" if provider == "cuda" else ""))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 4
    opts.inter_op_num_threads = 1
    # Idle intra-op threads must not spin: the next tile is read and
    # preprocessed on the same cores meanwhile (20% faster scans measured here).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
    providers = [want] if provider == "cpu" else [(want, {"use_tf32": "0"}), "CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise Fc2ConvError(f"onnxruntime cannot load the dense model: {first}") from None
    if sess.get_providers()[0] != want:
        raise Fc2ConvError(f"onnxruntime could not create the {provider!r} provider")
    return sess


class Worker:
    """One process's state for one scan: session, image, arrays."""

    def __init__(self, job: Job, data: bytes, image=None):
        from ..images import open_image

        self.job = job
        threads = job.threads
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // _dask_threads())
        self.session = session(data, job.provider, threads)
        self.image = open_image(job.image if image is None else image, level=job.level,
                                spatial_rank=job.dense.rank)
        group = store.zarr().open_group(job.out, mode="r+")
        self.arrays = {o: group[o] for o in job.dense.outputs}
        self.flags = group[store.DONE]
        self.reading = threading.Lock()
        self.cuda = job.provider == "cuda"

    def read(self, t) -> list:
        """Tile ``t``'s model inputs, one per block: ``[(owned, regions, x)]``
        (the tile is read once; raises Fc2ConvError naming an unreadable region)."""
        tiling = self.job.tiling
        box = tiling.read(t)
        with self.reading:            # lanes take turns in the reader (not every reader is thread-safe)
            pixels = self.image.read(box)
        blocks = []
        for owned, regions in tiling.blocks(t, self.job.block or tiling.chunks):
            crop = pixels[tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(regions, box))]
            blocks.append((owned, regions, model_mod.to_input(crop, self.job.dense, self.job.prep)))
        return blocks

    def infer(self, t, blocks) -> list:
        """Tile ``t``'s owned maps, one ``[C, *owned]`` array per output, from its blocks."""
        tiling = self.job.tiling
        tile_owned = tiling.owned(t)
        maps = [None] * len(self.job.dense.outputs)
        for owned, regions, x in blocks:
            local = tiling.local(owned, regions)
            at = tuple(slice(p0 - q0, p1 - q0) for (p0, p1), (q0, _) in zip(owned, tile_owned))
            for i, y in enumerate(self._run(x)):
                m = y[0]
                need = [sl.stop for sl in local]
                if any(n > d for n, d in zip(need, m.shape[1:])):
                    raise Fc2ConvError(f"tile {t} (pixels {tiling.read(t)}): the dense model gave a map of "
                                       f"{list(m.shape[1:])} positions where the tiling needs {need}; the "
                                       "model's geometry is not what scan traced")
                if maps[i] is None:
                    maps[i] = np.empty((m.shape[0],) + tuple(q1 - q0 for q0, q1 in tile_owned), np.float32)
                maps[i][(slice(None),) + at] = m[(slice(None),) + local]
        return maps

    def _run(self, x: np.ndarray) -> list:
        dense = self.job.dense
        if not self.cuda:
            return self.session.run(list(dense.outputs), {dense.input: x})
        # IO binding: the tile goes to the device once, the maps come back to host memory
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_ortvalue_input(dense.input, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for o in dense.outputs:
            binding.bind_output(o, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def write(self, t, maps) -> None:
        """Tile ``t``'s owned maps into their chunk of OUT, then its done flag."""
        owned = self.job.tiling.owned(t)
        for o, m in zip(self.job.dense.outputs, maps):
            self.arrays[o][(slice(None),) + tuple(slice(a, b) for a, b in owned)] = m
        self.flags[tuple(slice(c, c + 1) for c in t)] = np.ones((1,) * len(t), np.uint8)

    def run(self, t) -> int:
        self.write(t, self.infer(t, self.read(t)))
        return pixels_of(self.job.tiling, t)


def pixels_of(tiling, t) -> int:
    """Image pixels a tile accounts for: those its owned positions advance by (for pixels/s)."""
    n = 1
    for a, (p0, p1) in zip(tiling.axes, tiling.owned(t)):
        lo = 0 if p0 == 0 else a.offset + p0 * a.stride
        hi = a.size if p1 == a.positions else a.offset + p1 * a.stride
        n *= max(0, min(hi, a.size) - max(lo, 0))
    return n


def _dask_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except Exception:
        return 1


_WORKERS: dict = {}
_LOCK = threading.Lock()


def worker_for(job: Job, data: bytes, image=None) -> Worker:
    """This process's Worker for ``job``, made once (older scans' are dropped)."""
    with _LOCK:
        w = _WORKERS.get(job.key)
        if w is None:
            _WORKERS.clear()
            w = _WORKERS[job.key] = Worker(job, data, image)
        return w


def run_tile(job: Job, data: bytes, image, t) -> tuple:
    """The dask task: compute and write tile ``t``; returns ``(t, pixels)``,
    or ``(t, message)`` when the input is bad (an unreadable region): returned,
    not raised, so that no worker logs a failed task with its traceback on the
    scan's stderr, and the client stops with that one line.
    ``image``: None (open ``job.image``) or the array itself."""
    try:
        return tuple(t), worker_for(job, data, image).run(t)
    except Fc2ConvError as exc:
        return tuple(t), str(exc)


# --------------------------------------------------------------- engines ---

LANES = 2      # tiles in flight at once in this process, on the CPU


def lanes_for(provider: str, threads: int | None, cores: int | None = None) -> tuple:
    """``(lanes, threads)`` for a scan in this process: two tiles in flight,
    the cores split between them (lanes x threads = cores), or as many
    lanes as ``threads`` leaves cores for. One lane on a GPU (its next tile
    is read while this one runs). Two one-thread lanes beat one two-thread
    session on 2 cores: each tile's reading, preprocessing and writing
    overlap the other's inference, and onnxruntime's own thread pool
    scales less well than independent runs (tools/bench_scan.py (c))."""
    cores = cores or os.cpu_count() or 1
    if provider != "cpu":
        return 1, threads
    if threads is None:
        lanes = max(1, min(LANES, cores))
        return lanes, max(1, cores // lanes)
    return max(1, min(LANES, cores // max(1, threads))), threads


def run_here(job: Job, data: bytes, todo: list, on_tile, lanes: int = 1) -> float:
    """Tiles in this process; returns the seconds from loading the model to
    the last tile written. ``lanes`` tiles run at once on one session (its
    weights held once; onnxruntime runs concurrent calls, each on its own
    ``job.threads``); with one lane the next tile is read while this one runs."""
    t0 = time.perf_counter()
    worker = Worker(job, data)
    if not todo:
        return time.perf_counter() - t0
    if lanes <= 1:
        with ThreadPoolExecutor(1, thread_name_prefix="scan-read") as reader:
            ahead = reader.submit(worker.read, todo[0])
            for i, t in enumerate(todo):
                x = ahead.result()
                if i + 1 < len(todo):
                    ahead = reader.submit(worker.read, todo[i + 1])
                worker.write(t, worker.infer(t, x))
                on_tile(t, pixels_of(job.tiling, t))
        return time.perf_counter() - t0
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="scan-lane")
    pending = {}
    queue = iter(todo)
    try:
        for t in itertools.islice(queue, lanes):
            pending[pool.submit(worker.run, t)] = t
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                t = pending.pop(f)
                pixels = f.result()          # an unreadable region stops the scan here
                on_tile(t, pixels)
                for nxt in itertools.islice(queue, 1):
                    pending[pool.submit(worker.run, nxt)] = nxt
    finally:
        # finish (and so keep) the tile still running, start no other
        pool.shutdown(wait=True, cancel_futures=True)
    return time.perf_counter() - t0


@contextlib.contextmanager
def dask_client(*, workers: int | None = None, scheduler: str | None = None, timeout: float = 20.0):
    """A dask client on a LocalCluster of ``workers`` one-thread processes, or
    on ``scheduler``; entered before OUT is created, so a scheduler that
    cannot be reached leaves nothing behind."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise Fc2ConvError("--workers and --scheduler need dask.distributed (the 'scan' extra): "
                           "pip install 'onnx-fc2conv[scan]'") from None
    cluster = None
    try:
        if scheduler:
            try:
                client = Client(scheduler, timeout=timeout)
            except (OSError, TimeoutError, ValueError) as exc:
                raise Fc2ConvError(f"--scheduler {scheduler}: cannot connect ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else 'timed out'})") from None
        else:
            with _local_config():
                # No dashboard, but the scheduler still serves its health and
                # metrics routes over HTTP, on port 8787 unless told otherwise;
                # with 8787 taken (another scan, any dask dashboard) it warns on
                # this process's stderr. An ephemeral port on 127.0.0.1 instead.
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.ERROR,
                                       scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def _local_config():
    """Dask settings for the local cluster's workers, whose one task thread
    runs onnxruntime on a core of its own (tools/bench_scan.py (c) on 2
    cores, tile 1024: 2 workers / twice 1 worker went from 0.78 to 0.82 on
    6144^2, from 0.86 to 0.87 on 8192^2).

    - No statistical profiler: it samples the task thread every 10 ms.
    - No ``MALLOC_TRIM_THRESHOLD_`` (dask's default 65536): setting it freezes
      glibc's mmap threshold, so every tile's arrays are mmapped and
      page-faulted afresh, which two workers pay together on shared memory
      bandwidth. The one-thread settings for OpenMP/MKL/OpenBLAS are kept.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return dask.config.set({"distributed.worker.profile.enabled": False,
                            "distributed.nanny.pre-spawn-environ": environ})


def run_dask(job: Job, data: bytes, todo: list, on_tile, client) -> float:
    """Tiles as dask tasks on ``client``'s cluster; returns the seconds from
    the cluster being ready (the workers load the model on their first tile)
    to the last tile written."""
    from distributed import as_completed

    return _submit_all(client, as_completed, job, data, todo, on_tile)


def cluster_failure(exc: BaseException) -> str:
    """One line for a tile that failed on the cluster with something other
    than bad input: the scheduler or a worker could not run scan's tasks."""
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    line = f"a tile failed on the dask cluster: {type(exc).__name__}" + (f": {first}" if first else "")
    if "deserializ" in str(exc).lower() or isinstance(exc, (ImportError, ModuleNotFoundError)):
        line += (" (the scheduler and every worker need onnx-fc2conv with its scan extra installed, "
                 "the same version as here)")
    return line


def _submit_all(client, as_completed, job, data, todo, on_tile) -> float:
    if not todo:
        return 0.0
    if not client.scheduler_info().get("workers"):
        client.wait_for_workers(1, timeout=60)
    t0 = time.perf_counter()
    shared = client.scatter(data, broadcast=True, hash=False)
    image = None
    if isinstance(job.image, np.ndarray):  # an array in this process: every worker gets a copy once
        image = client.scatter(job.image, broadcast=True, hash=False)
        job = replace(job, image=None)
    # No retries: dask reschedules a lost worker's tiles by itself, and an
    # exception (an unreadable region) must stop the scan, not repeat.
    futures = [client.submit(run_tile, job, shared, image, t, key=f"scan-tile-{job.key}-{'-'.join(map(str, t))}",
                             pure=False) for t in todo]
    try:
        for f in as_completed(futures):
            if f.status == "error":
                exc = f.exception()
                if isinstance(exc, Fc2ConvError):
                    raise Fc2ConvError(str(exc)) from None
                raise Fc2ConvError(cluster_failure(exc)) from None
            t, pixels = f.result()
            if isinstance(pixels, str):     # run_tile's one line about bad input
                raise Fc2ConvError(pixels)
            on_tile(t, pixels)
    finally:
        client.cancel(futures)
    return time.perf_counter() - t0

