"""How decoding and masking bitshuffle-LZ4 Eiger 4M frames scale with threads.

Writes Eiger 4M frames (uint32, 2167x2070) the way the DECTRIS file writer
does (bitshuffle-LZ4, HDF5 filter 32008, one chunk per frame), dense (about 3
counts per pixel) and sparse (0.05 photons per pixel, XPCS), then reads them
back side by side in one run:

- ``h5py``: ``dataset.read_direct`` frame by frame on one thread (HDF5 holds a
  global lock: more threads do not decode faster through h5py);
- ``h5py*mask``: the same, then one multiply by the mask in the frames' dtype;
- ``chunks xN``: raw chunks read in order (``read_direct_chunk``, under the
  HDF5 lock but no decoding), decompressed with the ``bitshuffle`` package and
  masked on a pool of N threads (the GIL is released while decoding and
  multiplying), output order kept; checked equal to ``h5py*mask``.

Every figure is frames per second and its ratio to ``h5py`` on one thread,
from the median of several interleaved repetitions. Needs numpy, h5py,
hdf5plugin and bitshuffle only (``pip install -e ".[bench]"``)::

    python benchmarks/decode.py                 # threads 1, 2, 4, ... up to the cores
    python benchmarks/decode.py --frames 32 --repeat 3 --json decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bitshuffle
import h5py
import hdf5plugin
import numpy as np

SHAPE = (2167, 2070)
DTYPE = np.dtype(np.uint32)


def frames(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` frames: "dense" (Poisson mean 3) or "sparse" (Poisson mean 0.05)."""
    rng = np.random.default_rng(seed)
    lam = 3.0 if kind == "dense" else 0.05
    out = rng.poisson(lam, size=(n, *SHAPE)).astype(DTYPE)
    out[:, 514:551, :] = np.iinfo(DTYPE).max  # a module gap, as the Eiger flags it
    return out


def write(path: Path, data: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "/entry/data/data", data=data, chunks=(1, *SHAPE), **hdf5plugin.Bitshuffle(cname="lz4")
        )


def read_h5py(dataset: h5py.Dataset, n: int, mask: np.ndarray | None) -> np.ndarray:
    out = np.empty((n, *SHAPE), DTYPE)
    for i in range(n):
        dataset.read_direct(out, np.s_[i : i + 1], np.s_[i : i + 1])
        if mask is not None:
            np.multiply(out[i], mask, out=out[i])
    return out


def decode_chunk(chunk: bytes, mask: np.ndarray, out: np.ndarray) -> None:
    raw = np.frombuffer(chunk, dtype=np.uint8)
    # HDF5 bitshuffle chunk: 8-byte big-endian size, 4-byte big-endian block
    # size in bytes, then the LZ4 blocks.
    block = int.from_bytes(chunk[8:12], "big") // DTYPE.itemsize
    frame = bitshuffle.decompress_lz4(raw[12:], SHAPE, DTYPE, block)
    np.multiply(frame, mask, out=out)


def read_chunks(
    dataset: h5py.Dataset, n: int, mask: np.ndarray, pool: ThreadPoolExecutor, window: int
) -> np.ndarray:
    """Raw chunks read in order, decoded and masked on ``pool``; at most ``window`` in flight."""
    out = np.empty((n, *SHAPE), DTYPE)
    pending = []
    for i in range(n):
        _, chunk = dataset.id.read_direct_chunk((i, 0, 0))
        pending.append(pool.submit(decode_chunk, chunk, mask, out[i]))
        if len(pending) >= window:
            pending.pop(0).result()
    for future in pending:
        future.result()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="*", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, 2, *(2**k for k in range(2, 8) if 2**k <= cores), cores})
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {platform.node()}  {cores} cores  "
        f"{platform.processor() or platform.machine()}  Python {platform.python_version()}  "
        f"numpy {np.__version__}  h5py {h5py.__version__}  hdf5plugin {hdf5plugin.version}  "
        f"bitshuffle {bitshuffle.__version__}  load {os.getloadavg()}"
    )
    mask = np.ones(SHAPE, DTYPE)
    mask[514:551, :] = 0
    mask[1000:1100, 900:1000] = 0
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("dense", "sparse"):
            data = frames(kind, args.frames)
            path = Path(tmp) / f"{kind}.h5"
            write(path, data)
            stored = path.stat().st_size / args.frames
            expected = data * mask
            del data
            with h5py.File(path, "r") as f:
                dataset = f["/entry/data/data"]
                runs = {
                    "h5py": lambda d=dataset: read_h5py(d, args.frames, None),
                    "h5py*mask": lambda d=dataset: read_h5py(d, args.frames, mask),
                }
                pools = {t: ThreadPoolExecutor(t) for t in threads}
                for t, pool in pools.items():
                    runs[f"chunks x{t}"] = lambda d=dataset, p=pool, t=t: read_chunks(
                        d, args.frames, mask, p, 2 * t
                    )
                assert np.array_equal(runs["h5py*mask"](), expected)
                for t in threads:
                    assert np.array_equal(runs[f"chunks x{t}"](), expected), t
                times: dict[str, list[float]] = {name: [] for name in runs}
                for _ in range(args.repeat):  # interleaved: drift hits all alike
                    for name, run in runs.items():
                        start = time.perf_counter()
                        run()
                        times[name].append(time.perf_counter() - start)
                for pool in pools.values():
                    pool.shutdown()
            fps = {name: args.frames / statistics.median(t) for name, t in times.items()}
            results[kind] = fps
            base = fps["h5py"]
            print(
                f"\n{kind}: {stored / 1e6:.2f} MB per frame stored "
                f"({DTYPE.itemsize * SHAPE[0] * SHAPE[1] / stored:.0f}x smaller), "
                f"{args.frames} frames, median of {args.repeat}"
            )
            for name, value in fps.items():
                print(f"  {name:<12} {value:8.1f} frames/s   {value / base:6.2f}x h5py")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"cores": cores, "frames": args.frames, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
