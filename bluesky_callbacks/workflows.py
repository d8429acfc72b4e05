"""The end-of-run Prefect flow: mask a finished run and store the product.

``end_of_run_workflow(stop_doc)`` is what a beamline triggers with each
run's stop document (see ``deploy/prefect.yaml`` and the README). Its tasks:

1. ``plan_run``: find the raw run in tiled by ``stop_doc["run_start"]``,
   check that it finished with all its frames, resolve the masks its start
   recorded (or the names given, as of its start);
2. ``write_masked_product``: mask its frames chunk by chunk with Dask (on a
   ``dask.distributed`` cluster when an address is given) and write them to
   the processed container (see :func:`~bluesky_callbacks.write_product`),
   with ``parent_uid``, the ``masks`` record and this flow run's id.

Only failures that may pass on their own (the registry or tiled unreachable)
are retried; a run without masks or with missing frames fails at once with
the reason. Writing is idempotent, so a retried or repeated flow gives the
run's one product.

Where things are, unless given as parameters: runs at ``CHX_MASKS_RUNS_URI``
(key ``CHX_MASKS_RUNS_API_KEY``) or ``<registry directory>/runs``; products
at ``CHX_MASKS_PROCESSED_URI`` (key ``CHX_MASKS_PROCESSED_API_KEY``) or
``<registry directory>/processed``; the mask registry as everywhere else
(``CHX_MASKS_URI``/``CHX_MASKS_API_KEY``, ``CHX_MASKS_PROFILE``, or the
embedded default).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from chx_masks import RegistryUnavailableError, default_registry

from ._process import (
    ProcessedRun,
    ProcessingPlan,
    RunStore,
    StoreUnavailableError,
    located_store,
    plan_processing,
    write_product,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

__all__ = [
    "DEPLOYMENT",
    "EndOfRunTrigger",
    "end_of_run_workflow",
    "plan_run",
    "processed_store",
    "runs_store",
    "write_masked_product",
]

#: The deployment ``deploy/prefect.yaml`` creates: "<flow name>/<deployment name>".
DEPLOYMENT = "chx-masks-end-of-run/chx-masks-end-of-run"

logger = logging.getLogger(__name__)


def _located(location: str | None, kind: str) -> RunStore:
    return located_store(location, kind)


def runs_store(location: str | None = None) -> RunStore:
    """Where raw runs are read: ``location``, ``$CHX_MASKS_RUNS_URI`` or ``<dir>/runs``.

    Examples
    --------
    >>> runs_store("/data/runs")
    RunStore(location='/data/runs', readable_storage=())
    """
    return _located(location, "runs")


def processed_store(location: str | None = None) -> RunStore:
    """Where products go: ``location``, ``$CHX_MASKS_PROCESSED_URI`` or ``<dir>/processed``.

    Examples
    --------
    >>> processed_store("/data/processed")
    RunStore(location='/data/processed', readable_storage=())
    """
    return _located(location, "processed")


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may pass on its own: a server that did not answer."""
    import httpx

    try:
        state.result()
    except (
        RegistryUnavailableError,
        StoreUnavailableError,
        httpx.TransportError,
        ConnectionError,
        TimeoutError,
    ):
        return True
    except Exception:
        return False
    return False


@task(
    retries=3,
    retry_delay_seconds=[5, 30, 120],
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def plan_run(
    run_uid: str,
    runs: RunStore,
    data_keys: Sequence[str] | None = None,
    masks: Mapping[str, Sequence[str]] | None = None,
    stream: str = "primary",
) -> ProcessingPlan:
    """Check the finished run and resolve its masks (metadata only)."""
    plan = plan_processing(
        run_uid,
        runs=runs,
        registry=default_registry(),
        data_keys=data_keys,
        masks=masks,
        stream=stream,
    )
    logger = get_run_logger()
    for detector in plan.detectors:
        logger.info(
            "%s: %d frames, masks %s (uids %s)%s",
            detector.data_key,
            detector.frames,
            detector.record.get("names"),
            list(detector.composite.uids),
            f", resolved as of {detector.resolved_as_of}" if detector.resolved_as_of else "",
        )
    return plan


@task(
    retries=3,
    retry_delay_seconds=[5, 30, 120],
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def write_masked_product(
    plan: ProcessingPlan, runs: RunStore, processed: RunStore, dask_address: str | None = None
) -> ProcessedRun:
    """Mask the frames chunk by chunk and store the product (idempotent)."""
    logger = get_run_logger()
    client = None
    if dask_address:
        from distributed import Client

        client = Client(dask_address)
    try:
        shown = [0]

        def progress(done: int, total: int) -> None:
            if done == total or done - shown[0] >= max(1, total // 10):
                shown[0] = done
                logger.info("%d/%d chunks written", done, total)

        product = write_product(
            plan,
            runs=runs,
            processed=processed,
            client=client,
            flow_run_id=flow_run.get_id(),
            progress=progress,
        )
    finally:
        if client is not None:
            client.close()
    logger.info(
        "product %s of run %s (%s)",
        product.uid,
        product.parent_uid,
        "written" if product.created else "already there: returned unchanged",
    )
    return product


@flow(name="chx-masks-end-of-run", persist_result=False)
def end_of_run_workflow(
    stop_doc: dict,
    runs: str | None = None,
    processed: str | None = None,
    masks: dict[str, list[str]] | None = None,
    dask_address: str | None = None,
) -> str:
    """Mask the run that ``stop_doc`` ends and store the product; the product's uid.

    Parameters
    ----------
    stop_doc : dict
        The run's stop document (only ``run_start`` is needed).
    runs, processed : str, optional
        Tiled URIs or directories (defaults: see the module).
    masks : dict, optional
        ``{data_key: [names]}`` for runs that recorded no masks.
    dask_address : str, optional
        A ``dask.distributed`` scheduler; local threads otherwise.
    """
    run_uid = stop_doc["run_start"]
    source, target = runs_store(runs), processed_store(processed)
    plan = plan_run(run_uid, source, masks=masks)
    product = write_masked_product(plan, source, target, dask_address)
    return product.uid


class EndOfRunTrigger:
    """A RunEngine callback that starts the end-of-run flow when a run ends.

    On each stop document it asks the Prefect server (``PREFECT_API_URL``)
    for a run of ``deployment`` with the stop document as its parameter, and
    returns at once: the flow runs on the work pool's workers, never in the
    scan. The request is made on a thread of its own; a failure (Prefect
    down, deployment missing) is logged and never reaches the RunEngine.

    Parameters
    ----------
    deployment : str
        ``"<flow name>/<deployment name>"``.
    parameters : dict, optional
        Further flow parameters (``runs``, ``processed``, ``masks``,
        ``dask_address``).
    only_successful : bool
        Skip runs whose exit status is not "success".

    Examples
    --------
    >>> RE.subscribe(EndOfRunTrigger())  # doctest: +SKIP
    """

    def __init__(
        self,
        deployment: str = DEPLOYMENT,
        *,
        parameters: Mapping[str, Any] | None = None,
        only_successful: bool = False,
    ) -> None:
        self.deployment = deployment
        self.parameters = dict(parameters or {})
        self.only_successful = only_successful
        self.requests: list[Future] = []  # one per stop document: the flow run's id
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chx-masks-trigger")

    def __call__(self, name: str, doc: dict) -> None:
        if name != "stop":
            return
        if self.only_successful and doc.get("exit_status") != "success":
            return
        future = self._pool.submit(self._request, dict(doc))
        future.add_done_callback(self._report)
        self.requests.append(future)

    def _request(self, stop_doc: dict) -> str:
        from prefect.deployments import run_deployment

        # Called on a worker thread, outside any event loop: run_deployment runs
        # synchronously and returns the FlowRun, not a coroutine.
        flow_run = cast(
            "FlowRun",
            run_deployment(
                self.deployment, parameters={"stop_doc": stop_doc, **self.parameters}, timeout=0
            ),
        )
        return str(flow_run.id)

    def _report(self, future: Future) -> None:
        err = future.exception()
        if err is not None:
            logger.error(
                "End-of-run flow %s not started: %s: %s", self.deployment, type(err).__name__, err
            )

    def close(self) -> None:
        """Wait for the requests already made, then stop the thread."""
        self._pool.shutdown(wait=True)
