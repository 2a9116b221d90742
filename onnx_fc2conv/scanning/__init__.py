"""``scan``: the dense score map of an image of any size, tile by tile, in
bounded memory, written to a zarr group, exactly equal to the one-pass map.

The flow: prepare the dense model (model.py) -> open the image region by
region (images/) -> plan the tiles from the traced geometry (tiling.py) ->
create or reopen OUT (store.py) -> run the missing tiles here, on a local
dask cluster or on a remote one (engine.py) -> optionally prove the map
(check.py) and draw an overview (overview.py).

Nothing is created before the model, the image and OUT have been checked; a
tile is written whole or not at all, so an interrupted scan keeps every
finished tile and ``resume=True`` computes only the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import Fc2ConvError

log = logging.getLogger(__name__)

DEFAULT_TILE = 2048


@dataclass
class ScanResult:
    """What a scan did. ``out`` is the zarr group's path."""
    out: str
    image_size: tuple
    shapes: dict                 # output -> [classes, *map]
    geometry: tuple              # geometry.MapAxis per spatial axis
    tiles: int                   # in the tiling
    computed: int                # by this call
    resumed: int                 # found finished
    seconds: float               # computing tiles: from loading the model (dask: from the cluster ready) to the last
    pixels: int                  # image pixels the computed tiles account for
    converted: bool
    check: object = None         # check.ScanCheck when check=True
    overview: str | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def pixels_per_second(self) -> float:
        return self.pixels / self.seconds if self.seconds > 0 else float("nan")


def scan(model, image, out, *, tile=DEFAULT_TILE, workers: int | None = None, scheduler: str | None = None,
         scale=1 / 255, mean=None, std=None, level: int = 0, dense_stride: int | None = None, input_shapes=None,
         provider: str = "cpu", resume: bool = False, overwrite: bool = False, check: bool = False,
         samples: int = 4, overview=None, cls: int | None = None, top: int | None = None, labels=None,
         progress=None, stage=None, threads: int | None = None, seed: int = 0) -> ScanResult:
    """Scan ``image`` with ``model`` (made dense unless it is) into the zarr group ``out``.

    Args:
        model: path or ``onnx.ModelProto``: a classifier with FC layers, or a dense model.
        image: a path (``.npy``, and the formats of ``images.FORMATS``) or an ndarray
            ``[*spatial]`` / ``[*spatial, C]``.
        tile: input pixels a tile reads per axis, halo included (int, or one per axis).
        workers: run N tiles at once in N local processes (dask LocalCluster).
        scheduler: address of a running dask.distributed scheduler.
        scale, mean, std: ``x = (pixels * scale - mean) / std`` per channel.
        resume: continue an interrupted scan of the same model, image and settings.
        overwrite: replace an existing scan at ``out``.
        check: prove the written map (check.py); the result's ``check`` says how it went.
        overview: write a PNG of the map over the downsampled image there.
        progress: called as ``progress(done, total, pixels)`` after each tile (and once at the start).
        stage: called with a one-line message at each stage.
        threads: onnxruntime threads per session (default: cores / workers).
    """
    from ..heatmap import parse_channels, parse_scale
    from ..images import open_image
    from . import engine, model as model_mod, store, tiling as tiling_mod

    stage = stage or (lambda message: None)
    if workers is not None and scheduler is not None:
        raise Fc2ConvError("give --workers or --scheduler, not both")
    if workers is not None and workers < 1:
        raise Fc2ConvError(f"--workers {workers}: give 1 or more")
    if resume and overwrite:
        raise Fc2ConvError("give --resume or --overwrite, not both")
    if cls is not None and top is not None:
        raise Fc2ConvError("give --class or --top, not both")
    if level < 0:
        raise Fc2ConvError(f"--level {level}: levels count from 0")
    store.zarr()
    scale = parse_scale(scale)
    tiles_arg = tuple(int(t) for t in tile) if isinstance(tile, (tuple, list)) else int(tile)
    if min(np.atleast_1d(tiles_arg)) < 1:
        raise Fc2ConvError(f"--tile {tile}: give a positive number of pixels")
    exists = store.prepare_destination(out, resume=resume, overwrite=overwrite)
    if overview is not None:
        _check_overview_path(overview, out)
    stage(f"making {model if isinstance(model, (str, os.PathLike)) else 'the model'} dense")
    dense = model_mod.prepare(model, dense_stride=dense_stride, input_shapes=input_shapes)
    if overview is not None and dense.rank != 2:
        raise Fc2ConvError(f"--overview draws 2-D maps; this model's map has {dense.rank} spatial axes")
    img = open_image(image, level=level, spatial_rank=dense.rank)
    try:
        model_mod.channels_of(img.channels, dense.channels, str(image) if not isinstance(image, np.ndarray)
                              else "the image")
        prep = model_mod.Preprocessing(scale, tuple(parse_channels(mean, "--mean", dense.channels).tolist()),
                                       tuple(parse_channels(std, "--std", dense.channels).tolist()))
        sizes = tuple(img.shape)
        at = model_mod.at_size(dense, sizes)
        if isinstance(tiles_arg, tuple) and len(tiles_arg) != dense.rank:
            raise Fc2ConvError(f"--tile: {len(tiles_arg)} sizes for an image with {dense.rank} spatial axes")
        first = at.shapes[dense.outputs[0]][1:]
        tiling = tiling_mod.plan(sizes, [a.stride for a in at.axes], [a.receptive_field for a in at.axes],
                                 [a.offset for a in at.axes], first, tiles_arg)
        image_path = None if isinstance(image, np.ndarray) else os.fspath(getattr(image, "path", None) or image)
        block = tiling_mod.block_positions(tiling.axes) if provider == "cpu" else None
        attrs = _attrs(dense, model, image_path, img, level, prep, tiling, at, block)
    finally:
        img.close()
    with contextlib.ExitStack() as stack:
        client = None if workers is None and scheduler is None else \
            stack.enter_context(engine.dask_client(workers=workers, scheduler=scheduler))
        result = _run(out, exists, overwrite, attrs, at, tiling, block, dense, image, image_path, level, prep,
                      provider, threads, workers, scheduler, client, progress, stage)
    if check:
        from . import check as check_mod

        stage(f"checking the map ({samples} sampled regions)")
        result.check = check_mod.check(out, dense, image, level=level, samples=samples, provider=provider,
                                       seed=seed)
    if overview is not None:
        from . import overview as overview_mod

        stage(f"drawing {overview}")
        overview_mod.write(out, image, overview, level=level, cls=cls, top=top, labels=labels)
        result.overview = os.fspath(overview)
    return result


def _run(out, exists, overwrite, attrs, at, tiling, block, dense, image, image_path, level, prep, provider, threads,
         workers, scheduler, client, progress, stage) -> ScanResult:
    """Create or reopen OUT and compute its missing tiles (the cluster, if any, is up)."""
    from . import engine, store

    if exists:
        group = store.open_existing(out, attrs)
        done = store.done_flags(group)
        # the blocks the scan began with, so that the resumed map is the same bits
        # (a scan without the record ran each tile whole)
        block = (dict(group.attrs).get(store.ATTR, {}).get("blocks") or {}).get("positions")
    else:
        group = store.create(out, attrs, at.shapes, tiling.chunks, tiling.grid, replace=overwrite)
        done = np.zeros(tiling.grid, bool)
    todo = [t for t in tiling.tiles() if not done[t]]
    resumed = len(tiling) - len(todo)
    job = engine.new_job(dense, image if isinstance(image, np.ndarray) else image_path, level, tiling, prep, out,
                         provider, threads, block)
    total = len(tiling)
    progress = progress or (lambda done, total, pixels: None)
    count = [resumed, 0]

    def on_tile(t, pixels):
        count[0] += 1
        count[1] += pixels
        progress(count[0], total, pixels)

    where = (f"on the dask cluster at {scheduler}" if scheduler else
             f"on {workers} local worker{'s' if workers != 1 else ''}" if workers else "in this process")
    stage(f"scanning {'x'.join(str(a.size) for a in tiling.axes)} px in {len(todo)} of {total} tiles {where}"
          + (f" ({resumed} done already)" if resumed else ""))
    progress(resumed, total, 0)
    if client is None:
        lanes, job.threads = engine.lanes_for(provider, threads)
        seconds = engine.run_here(job, dense.data, todo, on_tile, lanes)
    else:
        if workers is not None and threads is None:
            job.threads = max(1, (os.cpu_count() or 1) // workers)
        seconds = engine.run_dask(job, dense.data, todo, on_tile, client)
    sizes = tuple(a.size for a in tiling.axes)
    return ScanResult(str(out), sizes, at.shapes, at.axes, total, count[0] - resumed, resumed, seconds, count[1],
                      dense.converted, attrs=attrs)


def _check_overview_path(path, out) -> None:
    from ..save import destination

    destination(path, "overview")
    import importlib.util

    if importlib.util.find_spec("onnx_fc2conv.draw") is None:   # known before an hour of scanning, not after
        raise Fc2ConvError("--overview needs the heatmap renderer (onnx_fc2conv.draw), which this installation lacks")
    from ..heatmap import pillow

    pillow()


def _attrs(dense, model, image_path, img, level, prep, tiling, at, block) -> dict:
    return {
        "format": 1,
        "model": os.fspath(model) if isinstance(model, (str, os.PathLike)) else None,
        "model_sha256": dense.sha256,
        "converted_to_dense": dense.converted,
        "dense_stride": dense.dense_stride,
        "input": dense.input,
        "layout": "channels_last" if dense.channels_last else "channels_first",
        "image": {"path": image_path, "size": list(img.shape), "level": level, "channels": img.channels,
                  "dtype": str(img.dtype)},
        "preprocessing": prep.to_dict(),
        "tile": {"size": list(tiling.tile), "positions": list(tiling.chunks), "grid": list(tiling.grid),
                 "rule": "tile c owns map positions [c*positions, (c+1)*positions) per axis; each output "
                         "array's chunk c is tile c"},
        "blocks": {"positions": list(block or tiling.chunks),
                   "rule": "the model ran on each tile's owned positions in runs of this many per axis, each "
                           "reading its own exact region out of the tile (tiling.py)"},
        "geometry": {"axes": [a.to_dict() for a in at.axes],
                     "box": "position p along an axis covers image pixels [offset + p*stride, offset + "
                            "p*stride + receptive_field - 1] at the scanned level"},
        "outputs": {o: list(s) for o, s in at.shapes.items()},
    }


__all__ = ["scan", "ScanResult", "DEFAULT_TILE"]
