"""Where runs and products live (RunStore, opened once per process), and processing's errors.

Used by end-of-run processing (:mod:`._process` and the modules it draws on) and the commands.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chx_masks import ChxMasksError


class ProcessingError(ChxMasksError, RuntimeError):
    """A stored run cannot be processed as it is (unfinished, frames missing, ...)."""


class StoreUnavailableError(ProcessingError, ConnectionError):
    """The tiled server holding runs or products did not answer (worth retrying)."""


@dataclass(frozen=True)
class RunStore:
    """Where runs or products live: a tiled URI, or a local store directory.

    Picklable, so that Dask workers in other processes open it themselves.

    Parameters
    ----------
    location : str
        ``http(s)://...`` (a tiled container) or a directory (a local store,
        served in-process, as :func:`open_run_store` makes).
    api_key : str, optional
        For a tiled server; never shown.
    readable_storage : tuple of str
        Directories of detector files the runs refer to (local stores).

    Examples
    --------
    >>> RunStore("/data/chx/runs")
    RunStore(location='/data/chx/runs', readable_storage=())
    >>> RunStore("http://127.0.0.1:8000/api/v1/runs", api_key="s3cret")
    RunStore(location='http://127.0.0.1:8000/api/v1/runs', readable_storage=())
    >>> RunStore("http://127.0.0.1:8000/api/v1/runs?api_key=s3cret")
    RunStore(location='http://127.0.0.1:8000/api/v1/runs', readable_storage=())
    """

    location: str
    api_key: str | None = field(default=None, repr=False)
    readable_storage: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A key given in the URI (``?api_key=``, as $CHX_MASKS_RUNS_URI may hold it)
        # moves to api_key, so that no repr, message or log line shows it.
        if self.remote:
            from chx_masks.stores import split_api_key as _split_api_key

            location, api_key = _split_api_key(self.location, self.api_key)
            object.__setattr__(self, "location", location)
            object.__setattr__(self, "api_key", api_key)

    @property
    def remote(self) -> bool:
        return self.location.startswith(("http://", "https://"))

    def open(self, *, runs: bool = True) -> Any:
        """The tiled client of this store (opened once per process)."""
        if not self.remote:
            return _open_store(self, runs)
        # tiled retries a server that does not answer for up to
        # $TILED_RETRY_TIMEOUT and, on the main thread only, prints a bare
        # "Retrying..." line meanwhile; StoreUnavailableError says it in one.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="chx-masks-connect") as pool:
            return pool.submit(_open_store, self, runs).result()

    def reading(self, directories: Sequence[str | Path] | None = None) -> RunStore:
        """This local run store, allowed to read the detector files in ``directories``.

        tiled serves a file a run refers to (HDF5, .npy) only from its
        readable storage. By default that is the store's parent directory and
        the store itself: detector files are usually written beside the run
        store (a store in ``/data/chx/runs`` reads the files under ``/data/chx``).

        Parameters
        ----------
        directories : paths, optional
            Replace the default (relative paths are taken from the current
            directory).

        Raises
        ------
        ProcessingError
            The store is a tiled server: what it reads is its own configuration's
            ``readable_storage``.

        Examples
        --------
        >>> RunStore("/data/chx/runs").reading().readable_storage
        ('/data/chx', '/data/chx/runs')
        >>> RunStore("/data/chx/runs").reading(["/mnt/frames"]).readable_storage
        ('/mnt/frames',)
        """
        import dataclasses

        if self.remote:
            raise ProcessingError(
                f"The run store {self.location} is a tiled server: it reads the detector "
                "files its own configuration's readable_storage lists; give "
                "readable_storage only for a local run store (a directory)."
            )
        if directories is None:
            here = Path(self.location).expanduser().absolute()
            directories = (here.parent, here)
        readable = tuple(str(Path(d).expanduser().absolute()) for d in directories)
        return dataclasses.replace(self, readable_storage=readable)


def located_store(location: str | None, kind: str, directory: Path | None = None) -> RunStore:
    """``location``, else ``$CHX_MASKS_<KIND>_URI`` (+ its key), else ``<directory>/<kind>``.

    ``directory`` defaults to the embedded registry's (``$CHX_MASKS_DIR`` or
    the user data directory); ``kind`` is ``"runs"`` or ``"processed"``.

    Examples
    --------
    >>> located_store("/data/runs", "runs").location
    '/data/runs'
    """
    from chx_masks.settings import settings

    configured = settings()
    where = location or getattr(configured, f"{kind}_uri")
    if where:
        return RunStore(where, api_key=configured.secret(f"{kind}_api_key"))
    if directory is None:
        from chx_masks.stores import default_directory

        directory = default_directory()
    return RunStore(str(Path(directory).expanduser() / kind))


# Not bounded: an evicted client would be dropped with its connections open
# (or closed under a caller still using it). A process uses a few stores.
@functools.cache
def _open_store(store: RunStore, runs: bool) -> Any:
    from tiled.client import from_uri

    from chx_masks.stores import open_embedded

    from ._replay import open_run_store

    if store.remote:
        import httpx

        try:
            return from_uri(store.location, api_key=store.api_key)
        except (httpx.TransportError, OSError) as err:
            raise StoreUnavailableError(
                f"Cannot reach the tiled server at {store.location} "
                f"({type(err).__name__}): check that it runs and the URI is right."
            ) from err
        except httpx.HTTPStatusError as err:
            raise ProcessingError(
                f"The tiled server at {store.location} refused the connection "
                f"(HTTP {err.response.status_code}): give an API key that may read "
                "(runs) or write (products) there."
            ) from None
    if runs:
        return open_run_store(store.location, readable_storage=store.readable_storage)
    return open_embedded(Path(store.location))


def _store(where: RunStore | str | Path | Any) -> RunStore | Any:
    if isinstance(where, RunStore) or hasattr(where, "context"):
        return where
    return RunStore(str(where))


def _client(where: RunStore | Any, *, runs: bool) -> Any:
    return where.open(runs=runs) if isinstance(where, RunStore) else where
