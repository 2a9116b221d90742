"""Command line: ``onnx-fc2conv convert|inspect|check|heatmap|scan``.

Exit codes: 0 success, 1 a check found a mismatch, 2 bad input or usage.
Errors are one line on stderr (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__, api
from .errors import Fc2ConvError
from .save import atomic_write, destination, save

PROG = "onnx-fc2conv"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other error
        self.exit(2, f"{PROG}: error: {message} (see {PROG} {self._sub or ''} --help)\n".replace("  ", " "))

    _sub = ""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Turn the fully connected layers of ONNX models into convolutions "
                                       "and prove the result equal with onnxruntime.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...", default=[],
                       help="fix an input's shape for shape inference and the check (NAME:D0,... also accepted); "
                            "repeat for several inputs")
    tol = argparse.ArgumentParser(add_help=False)
    tol.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime provider for the check")
    tol.add_argument("--atol", type=float, help="absolute tolerance (default by dtype, scaled by output magnitude)")
    tol.add_argument("--rtol", type=float, help="relative tolerance (default by dtype)")
    tol.add_argument("--report", metavar="FILE.json", help="write per-layer and per-output results as JSON")
    sub = p.add_subparsers(dest="command", metavar="{convert,inspect,check,heatmap,scan}", parser_class=_Parser)
    sub.required = True
    c = sub.add_parser("convert", parents=[common, shape, tol], help="convert FC layers into convolutions",
                       description="Convert FC layers into Conv layers (keep mode: same inputs and outputs).")
    c._sub = "convert"
    c.add_argument("input", metavar="IN.onnx")
    c.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    c.add_argument("--dense", action="store_true", help="fully convolutional output (score maps)")
    c.add_argument("--dense-stride", type=int, metavar="S", help="with --dense: a finer map of stride S (S divides "
                                                                  "the trunk's stride; à trous rewrite)")
    c.add_argument("--keep-global-pools", action="store_true",
                   help="dense mode: global pools inside the trunk (squeeze-excitation blocks) stay global over the "
                        "whole input instead of refusing; each position then sees the whole image's channel context")
    c.add_argument("--fold-batch", action="store_true",
                   help="keep mode: fold the batch into the first Conv's spatial axis so onnxruntime's CPU runs "
                        "the head as one matrix product per batch (use it when serving batches > 1 on the CPU; "
                        "without it the graph is plain Conv + Flatten, the most portable form for compilers)")
    c.add_argument("--all-fcs", action="store_true",
                   help="keep mode: also FCs on plain vectors [N,K], token MatMuls [N,T,C] and Gemms with transA=1 "
                        "become 1x1 Convs (for targets that accept only Conv)")
    c.add_argument("--check", action="store_true", help="prove the output equal with onnxruntime; "
                                                        "a model that fails is not written (exit 1)")
    c.add_argument("--inputs", metavar="FILE.npz", help="inputs for the check instead of seeded random ones")
    c.add_argument("--external-data", action="store_true",
                   help="write the weights to OUT.onnx.data (automatic over 2 GB and for inputs with external data)")
    c.add_argument("--share-data", action="store_true",
                   help="with an external-data input and OUT in the same folder: reference the unchanged weights in "
                        "the input's data file instead of copying them (OUT then needs that file)")
    c.add_argument("--overwrite", action="store_true", help="allow OUT.onnx to be the input file itself")
    i = sub.add_parser("inspect", parents=[common, shape], help="list the FC layers and what they would become",
                       description="List every FC layer: the map it consumes, its flatten layout, and what it "
                                   "would become or why it will not be converted.")
    i._sub = "inspect"
    i.add_argument("input", metavar="IN.onnx")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--keep-global-pools", action="store_true",
                   help="the dense geometry as convert --dense --keep-global-pools would give it")
    i.add_argument("--all-fcs", action="store_true", help="list the layers as convert --all-fcs would convert them")
    i.add_argument("--inputs", metavar="FILE.npz", help="inputs at the native size for the run that reads the shapes "
                                                        "ONNX inference leaves unknown (default: seeded random)")
    k = sub.add_parser("check", parents=[common, shape, tol], help="prove two models equal with onnxruntime",
                       description="Run ORIGINAL and CONVERTED in onnxruntime and compare every output.")
    k._sub = "check"
    k.add_argument("original", metavar="ORIGINAL.onnx")
    k.add_argument("converted", metavar="CONVERTED.onnx")
    k.add_argument("--dense", action="store_true", help="check the dense window property")
    k.add_argument("--inputs", metavar="FILE.npz", help="inputs instead of seeded random ones")
    hm = sub.add_parser("heatmap", parents=[common, shape], help="draw a classifier's dense score map over an image",
                        description="Make MODEL dense (unless it is already), run it once on IMAGE and draw each "
                                    "map position's classes over the centre of its window (needs Pillow).")
    hm._sub = "heatmap"
    hm.add_argument("input", metavar="MODEL.onnx")
    hm.add_argument("image", metavar="IMAGE", help="PNG or JPEG, grayscale or RGB as the model's input wants")
    hm.add_argument("-o", dest="png", required=True, metavar="OUT.png", help="the picture to write")
    what = hm.add_mutually_exclusive_group()
    what.add_argument("--class", dest="cls", type=int, metavar="K", help="paint the probability of class K")
    what.add_argument("--top", type=int, metavar="N", help="paint the N best classes per position (default 1)")
    hm.add_argument("--output", dest="map_output", metavar="NAME",
                    help="the model output to draw (default: the one holding class probabilities, or the only "
                         "one; every output's map goes into --json)")
    hm.add_argument("--scale", default="1/255", metavar="S", help="multiply pixel values (0..255) by S first "
                                                                  "(default 1/255; a fraction or a number)")
    hm.add_argument("--mean", metavar="M", help="then subtract M (one value or one per channel, comma-separated)")
    hm.add_argument("--std", metavar="S", help="then divide by S (one value or one per channel)")
    hm.add_argument("--size", metavar="H,W", help="resize the image to H,W (bilinear) first")
    hm.add_argument("--dense-stride", type=int, metavar="S", help="a finer map of stride S (S divides the "
                                                                   "model's stride; à trous rewrite)")
    hm.add_argument("--zoom", type=float, default=1.0, metavar="Z",
                    help="the picture is the image times Z (default 1; below 1 shrinks it)")
    hm.add_argument("--legend", action="store_true",
                    help="add a strip below the picture with the geometry and the colours")
    hm.add_argument("--labels", metavar="FILE.txt", help="class names, one per line")
    hm.add_argument("--json", dest="json_out", metavar="FILE.json",
                    help="write the score map, its geometry and the top classes per position")
    hm.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime provider")
    from .scanning.command import add_parser as _scan_parser

    _scan_parser(sub, [common, shape])
    return p


def _layer_table(layers) -> list[str]:
    rows = [("node", "op", "pattern", "input map", "layout", "becomes")]
    for layer in layers:
        shape = "[" + ",".join(str(d) for d in layer.input_shape) + "]"
        rows.append((layer.name, layer.op, layer.pattern, shape, layer.layout, layer.becomes))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    return ["  " + "  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5] for r in rows]


def _summary(name, layers, heads=None) -> str:
    n = len(layers)
    conv = sum(1 for layer in layers if layer.converted)
    if n == 0:
        return f"{name}: no FC layer found"
    s = f"{name}: {n} FC layer{'s' if n != 1 else ''}, {conv} convert{'ed' if heads is not None else 'ible'}"
    if heads is not None:
        s += f" in {heads} head{'s' if heads != 1 else ''}"
    return s


def _write_json(path, payload) -> None:
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise Fc2ConvError(f"{path}: the report folder does not exist")
    atomic_write(target, [json.dumps(payload, indent=2, default=str).encode() + b"\n"])


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class _Progress:
    """Stage lines on stderr for long work, only when stderr is a terminal
    (never in pipes, CI logs or under -q); results go to stdout."""

    def __init__(self, enabled: bool):
        import time
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._time = time.perf_counter

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"{PROG}: [{self._time() - self.t0:6.1f} s] {message}", file=sys.stderr, flush=True)


def _size(path) -> str:
    try:
        return f"{Path(path).stat().st_size / 2**20:.0f} MiB"
    except OSError:
        return "?"


def _cmd_convert(args, out) -> int:
    if _same_file(args.input, args.output) and not args.overwrite:
        raise Fc2ConvError(f"{args.output}: the output is the input file; choose another -o, "
                           "or pass --overwrite to replace the input")
    if args.fold_batch and args.dense:
        raise Fc2ConvError("--fold-batch is for keep mode; dense models already see one image per batch item")
    progress = args.progress
    progress(f"loading and converting {args.input} ({_size(args.input)})")
    if args.keep_global_pools and not args.dense:
        raise Fc2ConvError("--keep-global-pools is for dense mode; add --dense")
    result = api.convert(args.input, dense=args.dense, input_shapes=args.input_shape, fold_batch=args.fold_batch,
                         keep_global_pools=args.keep_global_pools, dense_stride=args.dense_stride,
                         all_fcs=args.all_fcs, inputs=args.inputs)
    out(_summary(args.input, result.layers, result.heads))
    if result.layers:
        for line in _layer_table(result.layers):
            out(line)
    if result.probed:
        out(_probed_line(result.probed))
    if not result.changed:
        out("nothing to convert: the output is the unchanged model")
    payload = {"input": args.input, "output": args.output, "conversion": result.to_dict(), "check": None}
    code = 0
    for line in _geometry_lines(result.geometry):
        out(line)
    if args.check:
        progress(f"checking on {args.provider} ({'dense windows' if args.dense else 'keep mode'})")
    if args.check:
        report = api.check_result(result, provider=args.provider, inputs=args.inputs, atol=args.atol,
                                  rtol=args.rtol, dense_stride=args.dense_stride,
                                  keep_global_pools=args.keep_global_pools)
    if args.check:
        for line in report.lines():
            out(line)
        payload["check"] = report.to_dict()
        if not report.ok:
            payload["written"] = False
            if args.report:
                _write_json(args.report, payload)
            print(f"{PROG}: the converted model failed its check; {args.output} was not written", file=sys.stderr)
            return 1
    progress(f"writing {args.output}")
    written = save(result.model, args.output, external_data=True if args.external_data else None,
                   share_data=args.share_data)
    payload["written"] = True
    payload["files"] = [str(p) for p in written]
    if args.report:
        _write_json(args.report, payload)
    progress("done")
    out(f"wrote {', '.join(str(p) for p in written)}")
    return code


def _geometry_lines(geometry, prefix: str = "dense") -> list[str]:
    lines = []
    for i, g in enumerate(geometry):
        axes = g["axes"]
        fmt = lambda key: "x".join(str(a[key]) for a in axes)  # noqa: E731
        where = (f"window {fmt('window')} of {g['window_source']!r}" if g["window_source"] is not None
                 else "a map already (no FC head)")
        lines.append(f"{prefix} head {i} -> {', '.join(g['outputs'])}: {where}; "
                     f"in input pixels: stride {fmt('stride')}, receptive field {fmt('receptive_field')}, "
                     f"offset {fmt('offset')}" + (" (trunk pads)" if g["padded"] else ""))
    if geometry:
        lines.append("  position p along an axis covers input pixels [offset + p*stride, offset + p*stride + "
                     "receptive field - 1]")
    return lines


def _probed_line(probed: dict, shown: int = 6) -> str:
    items = [f"{name} [{','.join(map(str, dims))}]" for name, dims in probed.items()]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return (f"shapes from one onnxruntime run at the native size (ONNX inference leaves them unknown): "
            f"{', '.join(items[:shown])}{more}")


def _cmd_inspect(args, out) -> int:
    result = api.inspect(args.input, input_shapes=args.input_shape, keep_global_pools=args.keep_global_pools,
                         all_fcs=args.all_fcs, inputs=args.inputs)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    out(_summary(args.input, result.layers))
    for line in _layer_table(result.layers):
        out(line)
    for i, line in enumerate(result.heads):
        out(f"head {i}: {line}")
    if result.probed:
        out(_probed_line(result.probed))
    for line in _geometry_lines(result.geometry, "with --dense:"):
        out(line)
    if result.dense_reason:
        out(f"dense mode: not possible: {result.dense_reason}")
    return 0


def _cmd_check(args, out) -> int:
    args.progress(f"checking {args.converted} against {args.original} on {args.provider}")
    report = api.check(args.original, args.converted, provider=args.provider, dense=args.dense,
                       inputs=args.inputs, atol=args.atol, rtol=args.rtol, input_shapes=args.input_shape)
    for line in report.lines():
        out(line)
    if args.report:
        _write_json(args.report, {"original": args.original, "converted": args.converted, "check": report.to_dict()})
    return 0 if report.ok else 1


def _read_labels(path) -> list[str]:
    from .heatmap import read_labels

    return read_labels(path)


MAX_ZOOM = 64


def _cmd_heatmap(args, out) -> int:
    """The PNG (and --json), written atomically once everything has worked;
    nothing is written on an error."""
    from . import draw
    from .heatmap import heatmap

    sources = [args.input, args.image]
    png = destination(args.png, "picture", sources)
    js = destination(args.json_out, "JSON", sources) if args.json_out else None
    if not 0 < args.zoom <= MAX_ZOOM:
        raise Fc2ConvError(f"--zoom {args.zoom:g}: give a number above 0 and at most {MAX_ZOOM}")
    zoom = int(args.zoom) if args.zoom == int(args.zoom) else args.zoom
    labels = _read_labels(args.labels) if args.labels else None
    result = heatmap(args.input, args.image, cls=args.cls, top=args.top, output=args.map_output, scale=args.scale,
                     mean=args.mean, std=args.std, size=args.size, dense_stride=args.dense_stride,
                     provider=args.provider, input_shapes=args.input_shape, labels=labels, progress=args.progress)
    args.progress(f"drawing {args.png}")
    several = len(result.outputs) > 1
    caption = f"output {result.output!r}" if several and args.legend else None
    try:
        image = draw.scaled(result.pixels, zoom)
        picture = draw.picture(image, result.probabilities, result.axes,
                               zoom=zoom, cls=args.cls, top=result.top if args.cls is None else None,
                               labels=labels, legend=args.legend, caption=caption)
        data = draw.png_bytes(picture)
    except draw.OutOfMemory as exc:
        raise Fc2ConvError(f"{args.png}: {exc}; draw a smaller one with a lower --zoom (now {zoom:g})") from None
    h, w = result.pixels.shape[:2]
    payload = None
    if js is not None:
        payload = json.dumps(result.to_dict(str(png), zoom, image.shape[:2])).encode() + b"\n"
    atomic_write(png, [data])
    if js is not None:
        atomic_write(js, [payload])
    ax = result.axes
    scores = result.scores
    out(f"{args.image}: {h}x{w} pixels (HxW), map {scores.shape[1]}x{scores.shape[2]} of "
        f"{scores.shape[0]} classes (stride {ax[0].stride}, window {ax[0].receptive_field} px)"
        + ("" if result.prep.converted else "; the model was dense already"))
    if several:
        others = [n for n in result.outputs if n != result.output]
        out(f"drew output {result.output!r} ({result.why}); also in --json: {', '.join(map(repr, others))}")
    out(f"wrote {png}" + (f", {js}" if js is not None else ""))
    return 0


def _cmd_scan(args, out) -> int:
    from .scanning.command import command

    return command(args, out)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s", stream=sys.stderr)

    def out(line: str) -> None:
        if not args.quiet:
            print(line)

    args.progress = _Progress(not args.quiet and sys.stderr.isatty())
    handler = {"convert": _cmd_convert, "inspect": _cmd_inspect, "check": _cmd_check,
               "heatmap": _cmd_heatmap, "scan": _cmd_scan}[args.command]
    try:
        return handler(args, out)
    except Fc2ConvError as exc:
        if args.debug:
            raise
        message = str(exc)
        source = getattr(args, "input", None) or getattr(args, "original", None)
        files = [str(v) for v in (getattr(args, k, None) for k in ("input", "output", "original", "converted",
                                                                    "inputs", "report", "image", "png",
                                                                    "json_out")) if v]
        if source and not any(f in message for f in files):
            message = f"{source}: {message}"  # every error names the file it is about
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
