"""One writer per product: concurrent ``process_run`` calls, a writer killed mid-write.

A real RunEngine records a simulated Eiger 500K scan into a local run store
(TiledWriter); a real embedded registry holds its masks. Callers are threads
of this process and separate OS processes (``spawn``), as two Prefect workers
would be. Each product is densified and compared with raw x mask bit for bit.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bluesky.plans import count
from bluesky_tiled_plugins import TiledWriter

from bluesky_callbacks import MaskProvenance, open_run_store
from bluesky_callbacks._process import (
    FILE_ENCODING,
    LeaseLostError,
    ProcessingError,
    RunStore,
    process_run,
)
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import MaskRegistry

pytestmark = pytest.mark.slow

CTX = multiprocessing.get_context("spawn")
DET = "eiger500K_single_image"
SHAPE = (514, 1030)
FRAMES = 6


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A registry and a run store holding one masked 6-frame scan."""
    from bluesky import RunEngine

    root = tmp_path_factory.mktemp("lease")
    registry = MaskRegistry.embedded(root / "registry")
    mask = np.ones(SHAPE, bool)
    mask[100:140] = False
    registry.register_mask(DET, "gaps", mask)
    store = open_run_store(root / "runs")
    engine = RunEngine({})
    engine.subscribe(TiledWriter(store))
    engine.preprocessors.append(MaskProvenance(registry, masks={DET: ["gaps"]}))
    (uid,) = engine(count([sim_eiger500k()], num=FRAMES))
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)
    engine.loop.close()
    raw = store[uid]["primary"][DET].read()
    expected = raw * mask.astype(raw.dtype)
    yield {
        "root": root,
        "registry": registry,
        "runs": root / "runs",
        "uid": uid,
        "expected": expected,
    }
    store.context.close()
    registry.close()


def products(processed: Path) -> list[str]:
    return list(RunStore(str(processed)).open(runs=False))


def check_product(site: dict, processed: Path) -> dict:
    """The one product in ``processed``: complete, equal to raw x mask; its metadata."""
    assert products(processed) == [site["uid"]]
    node = RunStore(str(processed)).open(runs=False)[site["uid"]]
    md = node.metadata
    assert md["status"] == "complete" and md["lease"] is None
    assert node[DET].metadata["encoding"] == FILE_ENCODING
    np.testing.assert_array_equal(node[DET].read(), site["expected"])
    assert md["nonzero"] == {DET: int(np.count_nonzero(site["expected"]))}
    return dict(md)


# ------------------------------------------------------------ in another process


def child_process(
    root: str, uid: str, processed: str, lease_s: float, marker: str | None, hold_s: float, results
) -> None:
    """``process_run`` in a fresh process; with ``marker``, slowed after each block."""
    registry = MaskRegistry.embedded(Path(root) / "registry")

    def slow(done: int, total: int) -> None:
        if marker:
            Path(marker).write_text(f"{done} {total}")
            time.sleep(hold_s)

    try:
        product = process_run(
            uid,
            runs=Path(root) / "runs",
            processed=processed,
            registry=registry,
            frames_per_chunk=1,
            lease_s=lease_s,
            progress=slow,
        )
        results.put(("ok", product.uid, product.created))
    except BaseException as err:  # reported to the parent
        results.put(("error", type(err).__name__, str(err)))
    finally:
        registry.close()


def start_child(
    site: dict,
    processed: Path,
    *,
    lease_s: float = 60.0,
    marker: Path | None = None,
    hold_s: float = 0.0,
):
    results = CTX.Queue()
    proc = CTX.Process(
        target=child_process,
        args=(
            str(site["root"]),
            site["uid"],
            str(processed),
            lease_s,
            None if marker is None else str(marker),
            hold_s,
            results,
        ),
    )
    proc.start()
    return proc, results


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


# ------------------------------------------------------------------ tests


def test_two_threads_at_once_make_one_product(site, tmp_path):
    processed = tmp_path / "processed"
    first_block = threading.Event()
    got: dict[str, object] = {}

    def slow(done: int, total: int) -> None:
        first_block.set()
        time.sleep(0.3)

    def call(name: str, **kw) -> None:
        try:
            got[name] = process_run(
                site["uid"],
                runs=site["runs"],
                processed=processed,
                registry=site["registry"],
                frames_per_chunk=1,
                **kw,
            )
        except BaseException as err:  # asserted below
            got[name] = err

    writer = threading.Thread(target=call, args=("writer",), kwargs={"progress": slow})
    writer.start()
    assert first_block.wait(60)
    second = threading.Thread(target=call, args=("second",))
    second.start()
    writer.join(120)
    second.join(120)
    a, b = got["writer"], got["second"]
    assert not isinstance(a, BaseException), a
    assert not isinstance(b, BaseException), b
    assert a.created and not b.created and a.uid == b.uid
    assert check_product(site, processed)["uid"] == a.uid


def test_two_processes_at_once_make_one_product(site, tmp_path):
    processed = tmp_path / "processed"
    marker = tmp_path / "first-block"
    # 2 s a block: the first is still writing when the second has started.
    one, one_results = start_child(site, processed, marker=marker, hold_s=2.0)
    wait_for(marker)
    two, two_results = start_child(site, processed)
    outcomes = [one_results.get(timeout=180), two_results.get(timeout=180)]
    one.join(30)
    two.join(30)
    assert [o[0] for o in outcomes] == ["ok", "ok"], outcomes
    assert outcomes[0][1] == outcomes[1][1]
    assert sorted(o[2] for o in outcomes) == [False, True]
    assert check_product(site, processed)["uid"] == outcomes[0][1]


def test_a_caller_that_will_not_wait_names_the_writer(site, tmp_path):
    processed = tmp_path / "processed"
    marker = tmp_path / "first-block"
    proc, results = start_child(site, processed, marker=marker, hold_s=0.5)
    wait_for(marker)
    began = time.monotonic()
    with pytest.raises(ProcessingError, match=r"being written by .* pid \d+"):
        process_run(
            site["uid"], runs=site["runs"], processed=processed, registry=site["registry"], wait=0.5
        )
    assert time.monotonic() - began < 10
    assert results.get(timeout=180)[0] == "ok"
    proc.join(30)
    check_product(site, processed)


def test_a_killed_writer_is_completed_by_a_later_call(site, tmp_path):
    processed = tmp_path / "processed"
    marker = tmp_path / "blocks"
    proc, _ = start_child(site, processed, lease_s=2.0, marker=marker, hold_s=30)
    wait_for(marker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    node = RunStore(str(processed)).open(runs=False)[site["uid"]]
    assert node.metadata["status"] == "writing"  # left half-written
    crashed_uid = node.metadata["uid"]

    product = process_run(
        site["uid"], runs=site["runs"], processed=processed, registry=site["registry"], lease_s=2.0
    )
    assert product.created and product.uid != crashed_uid
    md = check_product(site, processed)
    assert md["uid"] == product.uid
    node = RunStore(str(processed)).open(runs=False)[site["uid"]]
    assert "lease-1" in list(node)  # the takeover's claim
    # Done once: later calls return it as it is.
    again = process_run(
        site["uid"], runs=site["runs"], processed=processed, registry=site["registry"]
    )
    assert not again.created and again.uid == product.uid


def test_a_writer_that_stalls_past_its_lease_stops_and_the_product_stays_whole(site, tmp_path):
    processed = tmp_path / "processed"
    stalled = threading.Event()
    got: dict[str, object] = {}

    def stall(done: int, total: int) -> None:
        if done == 1:
            stalled.set()
            time.sleep(4.0)  # no renewal: the 1 s lease runs out

    def slow_writer() -> None:
        try:
            got["slow"] = process_run(
                site["uid"],
                runs=site["runs"],
                processed=processed,
                registry=site["registry"],
                frames_per_chunk=1,
                lease_s=1.0,
                progress=stall,
            )
        except BaseException as err:  # asserted below
            got["slow"] = err

    thread = threading.Thread(target=slow_writer)
    thread.start()
    assert stalled.wait(60)
    taker = process_run(
        site["uid"], runs=site["runs"], processed=processed, registry=site["registry"], lease_s=1.0
    )
    thread.join(120)
    assert taker.created
    assert isinstance(got["slow"], LeaseLostError), got["slow"]
    assert "took over" in str(got["slow"])
    assert check_product(site, processed)["uid"] == taker.uid


def test_product_files_the_store_cannot_serve_are_refused_and_the_next_call_goes_on(site, tmp_path):
    from click.testing import CliRunner

    from chx_masks._cli import main

    processed = tmp_path / "processed"
    outside = tmp_path / "elsewhere"  # not in the local store's storage
    with pytest.raises(ProcessingError, match="outside its readable storage.*files="):
        process_run(
            site["uid"],
            runs=site["runs"],
            processed=processed,
            registry=site["registry"],
            files=outside,
        )
    # The failed writer let go of its lease: the next call does not wait for it.
    began = time.monotonic()
    product = process_run(
        site["uid"], runs=site["runs"], processed=processed, registry=site["registry"]
    )
    assert time.monotonic() - began < 30  # the lease would hold 60 s
    assert product.created
    check_product(site, processed)

    result = CliRunner().invoke(
        main,
        [
            "--dir",
            str(site["root"] / "registry"),
            "process",
            site["uid"],
            "--runs",
            str(site["runs"]),
            "--processed",
            str(tmp_path / "p2"),
            "--product-files",
            str(outside),
        ],
    )
    assert result.exit_code != 0
    assert "Give --product-files a directory that store reads" in result.output
    assert "Traceback" not in result.output
