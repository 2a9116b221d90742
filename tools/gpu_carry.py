"""Get onnxruntime-gpu (and scan's extras) onto a lent device machine, which
reaches no package index and takes at most 64 MiB a call (working tree
included, ~20 MiB here), then run tools/gpu_check.py there.

The onnxruntime-gpu 1.31.1 wheel for the device's Python 3.12 / CUDA 13 is
255 MB, so it travels in parts, one ignored folder per call, while the
machine stays warm (it goes back after 30 s idle: make the calls back to
back). The device's image already holds CUDA 13's cuBLAS/cuDNN, numpy, onnx,
tifffile, pillow, psutil, msgpack, toolz, cloudpickle, pyyaml and click.

Here (needs PyPI)::

    python tools/gpu_carry.py            # -> gpu-carry/part1 .. partN, gpu-carry/small (ignored by git)

Then, with the device tool, the calls in order (each prints what to send next)::

    run(command="bash tools/gpu_device.sh receive", carry=["gpu-carry/part1"])
    ...                                               (one call per part)
    run(command="bash tools/gpu_device.sh check", carry=["gpu-carry/small", "gpu-carry/partN"],
        timeout_s=540)

``check`` joins the parts, verifies the sha256 recorded here, installs the
wheels into ``gpu-carry/site`` (no index), and runs ``tools/gpu_check.py``
(the check rows prove keep/dense conversions on CUDA, with the check's
weights shared through add_initializer; the scan row is ``scan --provider
cuda``), writing its table to ``$OUT/gpu_check.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORT = "onnxruntime-gpu==1.31.1"
SMALL = ["onnx-graphsurgeon", "zarr", "numcodecs", "donfig", "crc32c", "dask", "distributed", "tornado", "tblib",
         "zict", "partd", "locket", "tqdm"]
PLATFORM = ["--python-version", "3.12", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any"]
PART = 40 * 2 ** 20


def download(names, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(dest), *names],
                   check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-carry")
    args = ap.parse_args(argv)
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    download(SMALL, out / "small")
    big = out / "big"
    download([ORT], big)
    wheel = next(big.glob("*.whl"))
    data = wheel.read_bytes()
    (out / "small" / "ort.name").write_text(wheel.name + "\n")
    (out / "small" / "ort.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    n = -(-len(data) // PART)
    for i in range(n):
        part = out / f"part{i + 1}"
        part.mkdir()
        (part / f"ort.{i + 1:02d}").write_bytes(data[i * PART:(i + 1) * PART])
    (out / "small" / "ort.parts").write_text(f"{n}\n")
    shutil.rmtree(big)
    sizes = ", ".join(f"part{i + 1}" for i in range(n))
    print(f"{out}: {wheel.name} ({len(data) / 2**20:.0f} MiB) in {n} parts ({sizes}) + small "
          f"({sum(f.stat().st_size for f in (out / 'small').iterdir()) / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
