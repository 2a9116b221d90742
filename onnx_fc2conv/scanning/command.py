"""``onnx-fc2conv scan``: the command around :func:`scanning.scan` (its
options, the progress bar on stderr, the summary on stdout, exit codes:
0 done, 1 ``--check`` found a mismatch, 2 bad input, 130 interrupted)."""

from __future__ import annotations

import logging
import os
import sys


def add_parser(sub, parents) -> None:
    """The ``scan`` block of the CLI's parser."""
    sc = sub.add_parser("scan", parents=parents, help="score map of an image of any size, tile by tile, to zarr",
                        description="Make MODEL dense (unless it is already) and evaluate it on IMAGE tile by tile, "
                                    "in bounded memory, writing the score map to a zarr group equal to the one-pass "
                                    "map (needs the 'scan' extra).")
    sc._sub = "scan"
    sc.add_argument("input", metavar="MODEL.onnx")
    sc.add_argument("image", metavar="IMAGE", help="PNG/JPEG, TIFF, whole-slide, .npy or zarr image")
    sc.add_argument("-o", "--output", required=True, metavar="OUT.zarr")
    sc.add_argument("--tile", type=int, default=2048, metavar="T",
                    help="input pixels a tile reads per axis, halo included (default 2048)")
    where = sc.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N", help="run N tiles at once in N local processes (dask)")
    where.add_argument("--scheduler", metavar="ADDRESS", help="run the tiles on this dask.distributed scheduler "
                                                              "(tcp://host:8786); OUT and IMAGE must be paths "
                                                              "every worker sees")
    sc.add_argument("--threads", type=int, metavar="T", help="onnxruntime threads per tile (default: cores / workers)")
    sc.add_argument("--scale", default="1/255", metavar="S", help="multiply pixel values by S first (default 1/255)")
    sc.add_argument("--mean", metavar="M", help="then subtract M (one value or one per channel)")
    sc.add_argument("--std", metavar="S", help="then divide by S (one value or one per channel)")
    sc.add_argument("--level", type=int, default=0, metavar="L", help="pyramid level of IMAGE (default 0, full size)")
    sc.add_argument("--dense-stride", type=int, metavar="S", help="a finer map of stride S (à trous)")
    sc.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime provider")
    sc.add_argument("--overview", metavar="OUT.png", help="draw the map over the downsampled image")
    what = sc.add_mutually_exclusive_group()
    what.add_argument("--class", dest="cls", type=int, metavar="K", help="overview: paint P(class K)")
    what.add_argument("--top", type=int, metavar="N", help="overview: paint the N best classes (default 1)")
    sc.add_argument("--labels", metavar="FILE.txt", help="overview: class names, one per line")
    again = sc.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted scan in OUT")
    again.add_argument("--overwrite", action="store_true", help="replace an existing scan in OUT")
    sc.add_argument("--check", action="store_true", help="prove the written map (exit 1 on a mismatch)")
    sc.add_argument("--samples", type=int, default=4, metavar="K", help="--check: regions and positions sampled")


class _Bar:
    """tqdm on stderr: tiles, pixels per second, time left."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.pixels = 0
        self.t0 = None

    def __call__(self, done: int, total: int, pixels: int) -> None:
        if not self.enabled:
            return
        import time

        if self.bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                self.enabled = False
                return
            self.bar = tqdm(total=total, initial=done, unit="tile", file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.5, desc="scan", smoothing=0.1)
            self.t0 = time.perf_counter()
            return
        self.pixels += pixels
        self.bar.update(done - self.bar.n)
        rate = self.pixels / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate / 1e6:.2f} Mpx/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _quiet_dask(quiet: bool) -> None:
    """dask.distributed's logs are not this command's to print.

    In this process, imported after the CLI configured logging, it adds no
    handler of its own and sends its INFO chatter (cluster start, workers
    joining, comms closing with tracebacks) through the CLI's stderr handler:
    keep its warnings (a lost worker), nothing under ``-q``. A LocalCluster's
    worker processes write to the same stderr and log errors with tracebacks
    when they are closed in the middle of a tile (after an unreadable region
    stopped the scan, their heartbeat finds the scheduler gone): they read
    their log level from the environment they inherit, so it is set there
    (a worker's real failure reaches this process as the task's error)."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
    try:
        import distributed  # noqa: F401  (its import sets its logger's level)
    except ImportError:
        return                # engine.dask_client names the extra to install
    logging.getLogger("distributed").setLevel(logging.CRITICAL if quiet else logging.WARNING)


def command(args, out) -> int:
    from ..heatmap import read_labels
    from . import scan

    if args.workers is not None or args.scheduler is not None:
        _quiet_dask(args.quiet)
    bar = _Bar(not args.quiet)
    labels = read_labels(args.labels) if args.labels else None
    done = [0, 0]

    def progress(n, total, pixels):
        done[0], done[1] = n, total
        bar(n, total, pixels)

    try:
        result = scan(args.input, args.image, args.output, tile=args.tile, workers=args.workers,
                      scheduler=args.scheduler, scale=args.scale, mean=args.mean, std=args.std, level=args.level,
                      dense_stride=args.dense_stride, input_shapes=args.input_shape, provider=args.provider,
                      resume=args.resume, overwrite=args.overwrite, check=args.check, samples=args.samples,
                      overview=args.overview, cls=args.cls, top=args.top, labels=labels, progress=progress,
                      stage=args.progress, threads=args.threads)
    except KeyboardInterrupt:
        bar.close()
        print(f"onnx-fc2conv: interrupted; {done[0]} of {done[1]} tiles are in {args.output}; run the same command "
              "with --resume to finish", file=sys.stderr)
        return 130
    finally:
        bar.close()
    a = result.geometry
    fmt = lambda key: "x".join(str(getattr(x, key)) for x in a)  # noqa: E731
    first = next(iter(result.shapes.values()))
    out(f"{args.image}: {'x'.join(map(str, result.image_size))} px, map {'x'.join(map(str, first[1:]))} of "
        f"{first[0]} classes (stride {fmt('stride')}, window {fmt('receptive_field')}, offset {fmt('offset')} px)"
        + ("" if result.converted else "; the model was dense already"))
    out(f"{result.tiles} tiles: {result.computed} computed in {result.seconds:.1f} s "
        f"({result.pixels_per_second / 1e6:.2f} Mpx/s)" + (f", {result.resumed} done before" if result.resumed else ""))
    code = 0
    if result.check is not None:
        for line in result.check.lines:
            out(line)
        if not result.check.ok:
            print(f"onnx-fc2conv: the check of {args.output} failed", file=sys.stderr)
            code = 1
    out(f"wrote {args.output}" + (f", {result.overview}" if result.overview else ""))
    return code
