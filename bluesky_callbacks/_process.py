"""End-of-run pre-processing: the masked frames of a stored run, written back.

A run is read from tiled by its uid; the masks its start document recorded
(or, for older runs, the names given resolved as of its start, and the
product says so) multiply its detector frames chunk by chunk; the masked
frames go to an HDF5 file in the Eiger's encoding (bitshuffle-LZ4, one chunk
per frame) registered in a ``processed`` container, keyed by the run's uid,
with the provenance in its metadata (or, where no file can be served, into a
sparse COO array inside tiled). Chunks are computed on a ``dask.distributed`` client when one is
given, on local threads otherwise; a bounded number of chunks is in flight
at any time, so memory stays bounded however long the run is.

Processing a run twice gives the same product: a finished product is
returned as it is. A product has one writer at a time, holding a lease in
the product's metadata: a second caller waits for it, and takes over (and
completes the product in place) only once the lease has run out.

This module does not need Prefect; :mod:`bluesky_callbacks.workflows` wraps
it in a Prefect flow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from chx_masks import MaskRegistry

# The parts of processing, importable from here as before.
from ._lease import LEASE_S, LeaseLostError
from ._plan import CHUNK_BYTES as CHUNK_BYTES
from ._plan import PROCESSING as PROCESSING
from ._plan import ProcessingPlan as ProcessingPlan
from ._plan import _frames_node as _frames_node
from ._plan import plan_processing
from ._products import FILE_ENCODING as FILE_ENCODING
from ._products import ProcessedRun, write_product
from ._stores import ProcessingError, RunStore, StoreUnavailableError
from ._stores import located_store as located_store

__all__ = [
    "LeaseLostError",
    "ProcessedRun",
    "ProcessingError",
    "RunStore",
    "StoreUnavailableError",
    "plan_processing",
    "process_run",
    "write_product",
]


def process_run(
    run_uid: str,
    *,
    runs: RunStore | str | Path | Any,
    processed: RunStore | str | Path | Any,
    registry: MaskRegistry,
    data_keys: Sequence[str] | None = None,
    masks: Mapping[str, Sequence[str]] | None = None,
    stream: str = "primary",
    client: Any = None,
    frames_per_chunk: int | None = None,
    flow_run_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    lease_s: float = LEASE_S,
    wait: float | None = None,
    files: str | Path | None | Literal[False] = None,
) -> ProcessedRun:
    """Mask a stored run's frames with its recorded masks and store them as a product.

    :func:`plan_processing` then :func:`write_product`; see those for the
    parameters. Running it again for the same run returns the same product.

    Examples
    --------
    >>> product = process_run(uid, runs="/data/runs", processed="/data/processed",
    ...                       registry=reg)  # doctest: +SKIP
    >>> product.masks["eiger4m_single_image"]["uids"]  # doctest: +SKIP
    """
    plan = plan_processing(
        run_uid,
        runs=runs,
        registry=registry,
        data_keys=data_keys,
        masks=masks,
        stream=stream,
        frames_per_chunk=frames_per_chunk,
    )
    return write_product(
        plan,
        runs=runs,
        processed=processed,
        client=client,
        flow_run_id=flow_run_id,
        progress=progress,
        lease_s=lease_s,
        wait=wait,
        files=files,
    )
