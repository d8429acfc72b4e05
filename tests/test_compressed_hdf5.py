"""Bitshuffle-LZ4 HDF5 (DECTRIS Eiger files) reads in a fresh process that imports only the project.

HDF5 decodes filter 32008 only once hdf5plugin has registered it in the
process; each test writes a compressed file here and reads it in a new
Python process through one of the project's own readers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
from helpers import EIGER500K, SHAPE_500K, random_mask

from chx_masks import MaskRegistry

BITSHUFFLE_LZ4 = 32008


def fresh_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter: nothing imported but what it imports."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )


def compressed(f: h5py.File, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    f.create_dataset(name, data=data, chunks=chunks, **hdf5plugin.Bitshuffle(cname="lz4"))
    assert f[name].id.get_create_plist().get_filter(0)[0] == BITSHUFFLE_LZ4


def test_a_compressed_pixel_mask_reads_in_a_fresh_process(tmp_path):
    pixel_mask = np.zeros(SHAPE_500K, np.uint32)
    pixel_mask[10:12, :] = 1  # gap
    pixel_mask[100, 200] = 8  # hot
    master = tmp_path / "scan_master.h5"
    with h5py.File(master, "w") as f:
        compressed(
            f, "/entry/instrument/detector/detectorSpecific/pixel_mask", pixel_mask, SHAPE_500K
        )
    proc = fresh_python(
        """
        import sys
        from chx_masks import io
        mask, _ = io.read_mask(sys.argv[1])
        print(int((~mask).sum()), bool(mask[100, 200]), bool(mask[50, 50]))
    """,
        str(master),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(2 * 1030 + 1), "False", "True"]


def test_a_compressed_dark_series_reads_in_the_command_line(tmp_path):
    rng = np.random.default_rng(1)
    darks = rng.poisson(0.05, size=(4, *SHAPE_500K)).astype(np.uint32)
    darks[:, 7, 9] += 400
    path = tmp_path / "darks.h5"
    with h5py.File(path, "w") as f:
        compressed(f, "/entry/data/data", darks, (1, *SHAPE_500K))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chx_masks",
            "--dir",
            str(tmp_path / "reg"),
            "generate",
            "hot-pixels",
            EIGER500K,
            "hot",
            str(path),
            "--threshold",
            "50",
            "--dry-run",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["masked_pixels"] == 1


def test_the_router_masks_compressed_stream_resource_frames_in_a_fresh_process(RE, tmp_path):
    from bluesky.plans import count
    from ophyd_async.plan_stubs import ensure_connected

    from bluesky_callbacks import MaskProvenance
    from bluesky_callbacks.sim import SimAsyncEiger

    mask = random_mask(seed=2)
    with MaskRegistry.embedded(tmp_path / "reg") as reg:
        reg.register_mask(EIGER500K, "hot", mask)
        det = SimAsyncEiger("eiger500K_single", tmp_path / "frames")
        RE(ensure_connected(det))
        RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["hot"]}))
        docs: list = []
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        RE(count([det], num=3))
    # The detector writes as an Eiger does: bitshuffle-LZ4, one chunk per frame.
    (resource,) = [doc for name, doc in docs if name == "stream_resource"]
    path = Path(resource["uri"].removeprefix("file://localhost"))
    with h5py.File(path, "r") as f:
        dataset = f[resource["parameters"]["dataset"]]
        assert dataset.id.get_create_plist().get_filter(0)[0] == BITSHUFFLE_LZ4
        assert dataset.chunks == (1, *SHAPE_500K)
        frames = dataset[()]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    np.save(tmp_path / "expected.npy", frames * mask.astype(frames.dtype))

    proc = fresh_python(
        """
        import json, sys
        import numpy as np
        from chx_masks import MaskRegistry
        from bluesky_callbacks import MaskingRouter
        d = sys.argv[1]
        out = []
        with MaskRegistry.embedded(d + "/reg") as reg:
            router = MaskingRouter(reg, lambda name, doc: out.append((name, doc)),
                                   strict=True)
            for name, doc in json.load(open(d + "/docs.json")):
                router(name, doc)
        got = [np.asarray(frame) for name, doc in out if name in ("event", "event_page")
               for frame in (doc["data"]["eiger500K_single_image"]
                             if name == "event_page" else [doc["data"]["eiger500K_single_image"]])]
        expected = np.load(d + "/expected.npy")
        stop = [doc for name, doc in out if name == "stop"][0]
        print(stop["exit_status"], len(got),
              all(np.array_equal(g.reshape(e.shape), e) for g, e in zip(got, expected)))
    """,
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["success", "3", "True"], proc.stdout + proc.stderr


def test_plain_h5py_in_a_fresh_process_cannot_decode_it(tmp_path):
    """The tests above are not vacuous: without hdf5plugin the filter is missing."""
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        compressed(f, "data", np.arange(20, dtype=np.uint32).reshape(4, 5), (1, 5))
    proc = fresh_python(
        """
        import sys, h5py
        try:
            h5py.File(sys.argv[1], "r")["data"][()]
        except OSError as err:
            print("refused:", err)
        else:
            print("decoded")
    """,
        str(path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused:"), proc.stdout
