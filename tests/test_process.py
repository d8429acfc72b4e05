"""End-of-run pre-processing: stored runs masked with their recorded masks, stored sparse.

A real RunEngine records simulated Eiger scans into a local run store
(TiledWriter, as at the beamline); a real embedded registry holds the masks.
Each product is densified and compared with raw x composite bit for bit.
Paths: local threads, a ``dask.distributed.LocalCluster`` of worker
processes, the Prefect flow under Prefect's test harness (a temporary local
Prefect server), and the ``chx-masks process`` command.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from bluesky.plans import count
from bluesky_tiled_plugins import TiledWriter
from click.testing import CliRunner
from event_model import compose_run
from helpers import ServerProcess, dense

from bluesky_callbacks import MaskProvenance, open_run_store
from bluesky_callbacks._process import (
    FILE_ENCODING,
    ProcessingError,
    RunStore,
    StoreUnavailableError,
    plan_processing,
    process_run,
)
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import MaskNotFoundError, MaskRegistry
from chx_masks._cli import main

pytestmark = pytest.mark.slow

DET = "eiger500K_single_image"
SHAPE = (514, 1030)
FRAMES = 5


def _mask(rows: slice) -> np.ndarray:
    mask = np.ones(SHAPE, bool)
    mask[rows] = False
    mask[:, 7] = False
    return mask


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A registry, a run store with a masked scan and an unmasked one."""
    from bluesky import RunEngine

    root = tmp_path_factory.mktemp("site")
    registry = MaskRegistry.embedded(root / "registry")
    registry.register_mask(DET, "gaps", _mask(slice(100, 140)))
    registry.register_mask(DET, "beamstop", _mask(slice(250, 300)))
    runs_dir = root / "runs"
    store = open_run_store(runs_dir)
    engine = RunEngine({})
    writer = engine.subscribe(TiledWriter(store))
    det = sim_eiger500k()
    (unmasked,) = engine(count([det], num=3))
    engine.preprocessors.append(MaskProvenance(registry, masks={DET: ["gaps", "beamstop"]}))
    (masked,) = engine(count([det], num=FRAMES))
    engine.unsubscribe(writer)
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)
    engine.loop.close()
    yield {
        "root": root,
        "registry": registry,
        "runs": runs_dir,
        "store": store,
        "masked": masked,
        "unmasked": unmasked,
    }
    store.context.close()
    registry.close()


def _expected(site: dict, uid: str) -> np.ndarray:
    start = site["store"][uid].metadata["start"]
    uids = start["masks"][DET]["uids"]
    composite = site["registry"].composite_from_uids(uids)
    raw = site["store"][uid]["primary"][DET].read()
    return raw * composite.mask.astype(raw.dtype)


def _product(processed: Path, run_uid: str):
    client = RunStore(str(processed)).open(runs=False)
    return client[run_uid]


def test_threads_product_equals_raw_times_composite_with_provenance(site, tmp_path):
    processed = tmp_path / "processed"
    uid = site["masked"]
    done = []
    product = process_run(
        uid,
        runs=site["runs"],
        processed=processed,
        registry=site["registry"],
        frames_per_chunk=2,
        progress=lambda d, t: done.append((d, t)),
    )
    assert product.created and product.parent_uid == uid
    assert done[-1] == (3, 3)  # 5 frames in chunks of 2
    node = _product(processed, uid)
    start = site["store"][uid].metadata["start"]
    md = node.metadata
    assert md["parent_uid"] == uid and md["uid"] == product.uid
    assert md["masks"] == start["masks"] and md["mask_uids"] == start["mask_uids"]
    assert md["status"] == "complete" and md["flow_run_id"] is None
    assert md["frames"] == {DET: FRAMES} and "masks_resolved_as_of" not in md
    stored = node[DET]
    assert stored.metadata["encoding"] == FILE_ENCODING  # a local store keeps files
    assert stored.structure().chunks[0] == (1,) * FRAMES  # one chunk a frame
    # Inline frames (stored inside tiled) are read through tiled, not as files.
    assert all(
        d.files is None
        for d in plan_processing(uid, runs=site["runs"], registry=site["registry"]).detectors
    )
    dense_frames = dense(stored)
    expected = _expected(site, uid)
    assert dense_frames.dtype == expected.dtype == np.uint32
    np.testing.assert_array_equal(dense_frames, expected)
    assert product.nonzero[DET] == int(np.count_nonzero(expected))

    # Again: the same product, nothing new written.
    again = process_run(uid, runs=site["runs"], processed=processed, registry=site["registry"])
    assert not again.created and again.uid == product.uid
    assert list(RunStore(str(processed)).open(runs=False)) == [uid]


def test_an_unfinished_product_is_replaced(site, tmp_path):
    processed = tmp_path / "processed"
    uid = site["masked"]
    container = RunStore(str(processed)).open(runs=False)
    container.create_container(key=uid, metadata={"status": "writing", "uid": "half"})
    product = process_run(uid, runs=site["runs"], processed=processed, registry=site["registry"])
    assert product.created and product.uid != "half"
    np.testing.assert_array_equal(product.dense(processed, DET), _expected(site, uid))


def test_run_without_masks_fails_clearly_or_resolves_as_of_its_start(site, tmp_path):
    uid = site["unmasked"]
    with pytest.raises(MaskNotFoundError, match=f"Run {uid} recorded no masks"):
        plan_processing(uid, runs=site["runs"], registry=site["registry"])
    product = process_run(
        uid,
        runs=site["runs"],
        processed=tmp_path / "p",
        registry=site["registry"],
        masks={DET: ["gaps"]},
    )
    md = _product(tmp_path / "p", uid).metadata
    assert DET in md["masks_resolved_as_of"]
    assert md["masks"][DET]["names"] == ["gaps"]
    raw = site["store"][uid]["primary"][DET].read()
    gaps = site["registry"].get_mask(DET, "gaps").compute()
    np.testing.assert_array_equal(product.dense(tmp_path / "p", DET), raw * gaps.astype(raw.dtype))


def test_unknown_run_and_unfinished_run_and_missing_frames(site, tmp_path):
    with pytest.raises(ProcessingError, match="No run no-such-run in"):
        plan_processing("no-such-run", runs=site["runs"], registry=site["registry"])
    nobody = "http://127.0.0.1:9/api/v1"  # nothing listens on the discard port
    with pytest.raises(StoreUnavailableError, match=f"Cannot reach the tiled server at {nobody}"):
        plan_processing(site["masked"], runs=nobody, registry=site["registry"])

    # A run written without its stop, and one whose stop counts more events.
    store = open_run_store(tmp_path / "runs")
    writer = TiledWriter(store)
    uids = []
    for stop_events in (None, 4):
        bundle = compose_run(
            metadata={"masks": site["store"][site["masked"]].metadata["start"]["masks"]}
        )
        writer("start", bundle.start_doc)
        desc = bundle.compose_descriptor(
            name="primary",
            data_keys={
                DET: {"source": "sim", "dtype": "array", "shape": list(SHAPE), "dtype_numpy": "<u4"}
            },
        )
        writer("descriptor", desc.descriptor_doc)
        for i in range(2):
            writer(
                "event",
                desc.compose_event(
                    data={DET: np.full(SHAPE, i + 1, np.uint32)}, timestamps={DET: 0.0}
                ),
            )
        if stop_events is not None:
            stop = bundle.compose_stop()
            writer("stop", {**stop, "num_events": {"primary": stop_events}})
        uids.append(bundle.start_doc["uid"])
    with pytest.raises(ProcessingError, match="has no stop document"):
        plan_processing(uids[0], runs=store, registry=site["registry"])
    with pytest.raises(ProcessingError, match="missing frames: its stop document counts 4"):
        plan_processing(uids[1], runs=store, registry=site["registry"])
    assert list(RunStore(str(tmp_path / "nothing")).open(runs=False)) == []
    store.context.close()


@pytest.fixture(scope="module")
def cluster_client():
    """A dask.distributed LocalCluster of two worker processes on loopback."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        # Not the default scheduler: tiled's own reads in this process stay local.
        yield client


def test_distributed_local_cluster_gives_the_same_product(site, tmp_path, cluster_client):
    uid = site["masked"]
    product = process_run(
        uid,
        runs=RunStore(str(site["runs"])),
        processed=tmp_path / "processed",
        registry=site["registry"],
        client=cluster_client,
        frames_per_chunk=1,
    )
    assert product.created and len(cluster_client.nthreads()) == 2
    np.testing.assert_array_equal(product.dense(tmp_path / "processed", DET), _expected(site, uid))
    with pytest.raises(ProcessingError, match="needs the run store as a RunStore or path"):
        process_run(
            uid,
            runs=site["store"],
            processed=tmp_path / "other",
            registry=site["registry"],
            client=cluster_client,
        )


def test_dask_workers_read_compressed_eiger_files(RE, tmp_path, cluster_client, site):
    """Worker processes that imported nothing but the task read bitshuffle-LZ4 frames."""
    from ophyd_async.plan_stubs import ensure_connected

    from bluesky_callbacks.sim import SimAsyncEiger

    registry = site["registry"]
    store = open_run_store(tmp_path / "runs", readable_storage=[tmp_path / "frames"])
    RE.preprocessors.append(MaskProvenance(registry, masks={DET: ["gaps", "beamstop"]}))
    RE.subscribe(TiledWriter(store))
    det = SimAsyncEiger("eiger500K_single", tmp_path / "frames", frames_per_file=2)
    RE(ensure_connected(det))
    (uid,) = RE(count([det], num=3))
    with h5py.File(next((tmp_path / "frames").rglob("*_data_000001.h5")), "r") as f:
        assert f["/entry/data/data"].id.get_create_plist().get_filter(0)[0] == 32008
    runs = RunStore(str(tmp_path / "runs")).reading([tmp_path / "frames"])
    product = process_run(
        uid,
        runs=runs,
        processed=tmp_path / "processed",
        registry=registry,
        client=cluster_client,
        frames_per_chunk=1,
    )
    composite = registry.composite_from_uids(store[uid].metadata["start"]["mask_uids"])
    expected = np.stack([det.pattern.frame(i) for i in range(3)])
    expected = expected * composite.mask.astype(expected.dtype)
    dense = product.dense(tmp_path / "processed", DET)
    np.testing.assert_array_equal(dense.reshape(expected.shape), expected)
    store.context.close()


@pytest.fixture
def tiled_process(tmp_path):
    """A tiled server in its own process (one server's key per process: see conftest)."""
    server = ServerProcess(tmp_path / "server")
    yield server
    server.stop()


def test_runs_and_products_on_a_tiled_server_processed_on_a_cluster(
    site, tiled_process, cluster_client
):
    """The facility layout: runs and products on a tiled server, workers reading it."""
    from bluesky import RunEngine
    from tiled.client import from_uri

    tiled_server = tiled_process
    suffix = uuid.uuid4().hex[:8]
    root = from_uri(tiled_server.uri, api_key=tiled_server.api_key)
    runs_node = root.create_container(key=f"runs-{suffix}")
    root.create_container(key=f"processed-{suffix}")
    engine = RunEngine({})
    engine.preprocessors.append(MaskProvenance(site["registry"], masks={DET: ["gaps"]}))
    engine.subscribe(TiledWriter(runs_node))
    try:
        (uid,) = engine(count([sim_eiger500k()], num=4))
    finally:
        engine.loop.call_soon_threadsafe(engine.loop.stop)
        engine._th.join(timeout=5)
        engine.loop.close()
    base = f"http://127.0.0.1:{tiled_server.port}/api/v1/metadata"
    runs = RunStore(f"{base}/runs-{suffix}", api_key=tiled_server.api_key)
    processed = RunStore(f"{base}/processed-{suffix}", api_key=tiled_server.api_key)
    product = process_run(
        uid,
        runs=runs,
        processed=processed,
        registry=site["registry"],
        client=cluster_client,
        frames_per_chunk=3,
    )
    node = root[f"processed-{suffix}"][uid]
    assert node.metadata["uid"] == product.uid and node.metadata["parent_uid"] == uid
    assert node[DET].structure().chunks[0] == (3, 1)
    raw = runs_node[uid]["primary"][DET].read()
    gaps = site["registry"].get_mask(DET, "gaps").compute()
    np.testing.assert_array_equal(dense(node[DET]), raw * gaps.astype(raw.dtype))
    root.context.close()


@pytest.fixture(scope="module")
def prefect_server():
    """Prefect's test harness: a temporary local Prefect server and database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def default_is_site_registry(site):
    import chx_masks

    chx_masks.set_default_registry(site["registry"])
    yield
    chx_masks.set_default_registry(None)


def test_prefect_flow_processes_the_run_its_stop_document_ends(
    site, tmp_path, prefect_server, default_is_site_registry
):
    from bluesky_callbacks.workflows import end_of_run_workflow

    uid = site["masked"]
    stop_doc = site["store"][uid].metadata["stop"]
    processed = tmp_path / "processed"
    where = {"runs": str(site["runs"]), "processed": str(processed)}
    state = end_of_run_workflow(stop_doc, **where, return_state=True)
    assert state.is_completed(), state
    product_uid = state.result()
    again = end_of_run_workflow(stop_doc, **where)
    failed = end_of_run_workflow({"run_start": site["unmasked"]}, **where, return_state=True)

    node = _product(processed, uid)
    assert node.metadata["uid"] == product_uid == again  # one product, however often run
    assert node.metadata["flow_run_id"] == str(state.state_details.flow_run_id)
    assert node.metadata["masks"] == site["store"][uid].metadata["start"]["masks"]
    np.testing.assert_array_equal(dense(node[DET]), _expected(site, uid))
    assert failed.is_failed()
    with pytest.raises(MaskNotFoundError, match="recorded no masks"):
        failed.result()
    assert site["unmasked"] not in list(RunStore(str(processed)).open(runs=False))


def test_deployment_file_and_the_trigger_on_stop_documents(site, prefect_server):
    """deploy/prefect.yaml names the flow; EndOfRunTrigger asks for one run per stop."""
    import yaml
    from bluesky import RunEngine
    from prefect.client.orchestration import get_client
    from prefect.flows import load_flow_from_entrypoint

    from bluesky_callbacks.workflows import DEPLOYMENT, EndOfRunTrigger, end_of_run_workflow

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "deploy" / "prefect.yaml").read_text())
    [deployment] = config["deployments"]
    loaded = load_flow_from_entrypoint(str(repo / deployment["entrypoint"]))
    assert loaded.name == end_of_run_workflow.name
    assert f"{loaded.name}/{deployment['name']}" == DEPLOYMENT
    assert deployment["work_pool"]["name"] == "chx-masks-process"

    end_of_run_workflow.to_deployment(name=deployment["name"]).apply()
    trigger = EndOfRunTrigger(parameters={"runs": str(site["runs"])})
    missing = EndOfRunTrigger("no-such-flow/nowhere")
    engine = RunEngine({})
    engine.subscribe(trigger)
    engine.subscribe(missing)
    try:
        (uid,) = engine(count([sim_eiger500k()], num=1))  # the scan is not held up
    finally:
        engine.loop.call_soon_threadsafe(engine.loop.stop)
        engine._th.join(timeout=5)
        engine.loop.close()
    trigger.close()
    missing.close()
    [request] = trigger.requests
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(request.result())
    assert flow_run.parameters["stop_doc"]["run_start"] == uid
    assert flow_run.parameters["runs"] == str(site["runs"])
    assert flow_run.state.is_scheduled()
    assert missing.requests[0].exception() is not None  # logged, never raised into the scan


def test_process_command(site, tmp_path):
    processed = tmp_path / "processed"
    uid = site["masked"]
    args = [
        "--dir",
        str(site["root"] / "registry"),
        "process",
        uid,
        "--runs",
        str(site["runs"]),
        "--processed",
        str(processed),
    ]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parent_uid"] == uid and report["created"] is True
    np.testing.assert_array_equal(dense(_product(processed, uid)[DET]), _expected(site, uid))
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already processed" in again.output

    refused = CliRunner().invoke(
        main,
        [
            "--dir",
            str(site["root"] / "registry"),
            "process",
            site["unmasked"],
            "--runs",
            str(site["runs"]),
            "--processed",
            str(processed),
        ],
    )
    assert refused.exit_code == 1
    assert refused.output.startswith("chx-masks: ") and "recorded no masks" in refused.output
    assert site["unmasked"] not in list(RunStore(str(processed)).open(runs=False))


def test_the_flow_retries_only_failures_that_may_pass():
    from prefect.states import Completed, Failed

    from bluesky_callbacks.workflows import _transient
    from chx_masks import RegistryUnavailableError

    transient = [
        StoreUnavailableError("tiled did not answer"),
        RegistryUnavailableError("registry did not answer"),
        TimeoutError("slow"),
    ]
    final = [MaskNotFoundError("no masks"), ProcessingError("missing frames"), ValueError("a bug")]
    for err in transient:
        assert _transient(None, None, Failed(data=err)), err
    for err in final:
        assert not _transient(None, None, Failed(data=err)), err
    assert not _transient(None, None, Completed(data=1))
