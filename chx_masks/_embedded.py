"""The zero-configuration registry: a tiled SQLite catalog served in-process.

Used by :meth:`chx_masks.MaskRegistry.embedded` and the default registry when
no server is configured.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from ._errors import RegistryUnavailableError


def default_directory() -> Path:
    """``$CHX_MASKS_DIR``, else the user data directory for chx-masks.

    Examples
    --------
    >>> import os
    >>> os.environ["CHX_MASKS_DIR"] = "/tmp/chx-doc"
    >>> str(default_directory())
    '/tmp/chx-doc'
    >>> del os.environ["CHX_MASKS_DIR"]
    """
    from .settings import settings

    configured = settings().dir
    if configured is not None:
        return configured.expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("chx-masks", appauthor=False))


@contextmanager
def _collection_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while tiled's server loads.

    Importing tiled's server stack (fastapi, sqlalchemy, and the pandas, dask
    and sparse its adapters import) and building its app create millions of
    objects that live as long as the process. While they are being made, the
    collector walks the growing heap again and again and frees next to
    nothing; pausing it halves the collector's time in ``chx-masks --dir D
    list`` (1.1 s to 0.6 s on a 2-core machine). Objects nothing refers to
    any more are still freed at once (reference counting).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


SQLITE_LOCK_WAIT_S = 30


def sqlite_waiting(uri: str) -> str:
    """A catalog URI whose SQLite connections wait for the write lock.

    SQLite lets one writer at a time; Python's driver waits 5 s for the lock
    and then fails ("database is locked"), which tiled answers with HTTP 500.
    Several writers at once on a busy machine (a shared registry, a local
    server beside an in-process one) wait up to ``SQLITE_LOCK_WAIT_S`` instead.
    Other URIs, and one that sets its own ``timeout``, are returned as given.

    Examples
    --------
    >>> sqlite_waiting("sqlite:////data/reg/catalog.db")
    'sqlite:////data/reg/catalog.db?timeout=30'
    >>> sqlite_waiting("postgresql+asyncpg://chx@db/masks")
    'postgresql+asyncpg://chx@db/masks'
    """
    scheme, _, rest = uri.partition("://")
    if not scheme.lower().startswith("sqlite") or ":memory:" in rest or "timeout=" in rest:
        return uri
    return f"{uri}{'&' if '?' in rest else '?'}timeout={SQLITE_LOCK_WAIT_S}"


def _locked(path: Path) -> AbstractContextManager[Any]:
    """An exclusive lock on the file ``path``: other processes and threads wait.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> with _locked(Path(tempfile.mkdtemp()) / ".init.lock"):
    ...     pass
    """
    from filelock import FileLock

    return FileLock(path)


def _new_catalog(database: Path) -> None:
    """Create an empty tiled catalog at ``database``.

    tiled creates a catalog by running its migrations in a subprocess, which
    takes seconds. An empty catalog is the same file every time for one tiled
    version, so it is made once per machine (in the user cache directory) and
    copied for each new registry.
    """
    import platformdirs
    import tiled
    from tiled.catalog import from_uri

    cache = Path(platformdirs.user_cache_dir("chx-masks", appauthor=False))
    template = cache / f"empty-catalog-tiled-{tiled.__version__}.db"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / ".template.lock"):
            if not template.exists():
                partial = cache / f".{template.name}.{os.getpid()}"
                partial.unlink(missing_ok=True)
                from_uri(f"sqlite:///{partial}", init_if_not_exists=True)
                os.replace(partial, template)
        shutil.copyfile(template, database)
    except OSError:
        # No usable cache directory: build the catalog in place instead.
        from_uri(f"sqlite:///{database}", init_if_not_exists=True)


def embedded_app(
    directory: Path,
    *,
    tabular: bool = False,
    readable_storage: Sequence[str | Path] = (),
    specs: Sequence[dict[str, str]] | None = None,
    serialization_registry: Any = None,
    api_key: str | None = None,
) -> Any:
    """The tiled app that serves ``directory`` as an embedded registry.

    Parameters are those of :func:`open_embedded`; ``api_key``, if given, is
    the single key the app accepts (for serving it on a socket).
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
    except OSError as err:
        raise RegistryUnavailableError(
            f"Cannot create the embedded directory {directory}: {err}. "
            "Set CHX_MASKS_DIR to a writable directory."
        ) from err
    database = directory / "catalog.db"
    writable: list[str] = [str(directory / "data")]
    if tabular:
        writable.append(f"sqlite:///{directory / 'tables.db'}")
    with _collection_paused():
        # Here, not at the top: tiled's server imports dask.dataframe, pandas
        # and sparse whatever it serves (tiled.adapters.protocols), half of its
        # ~4 s import; a registry on a server needs only tiled.client.
        from tiled.catalog import from_uri
        from tiled.server.app import build_app

        with _locked(directory / ".init.lock"):
            if not database.exists():
                _new_catalog(database)
            catalog = from_uri(
                sqlite_waiting(f"sqlite:///{database}"),
                writable_storage=writable,
                readable_storage=[str(p) for p in readable_storage] or None,
                specs=list(specs) if specs else None,
            )
        options: dict[str, Any] = {}
        if api_key is not None:
            from tiled.config import Authentication

            options["authentication"] = Authentication(single_user_api_key=api_key)
        app = build_app(catalog, serialization_registry=serialization_registry, **options)
    # tiled announces its version at INFO on every in-process start; a
    # library opened from IPython should stay quiet.
    logging.getLogger("tiled.server.app").setLevel(logging.WARNING)
    return app


def open_embedded(
    directory: Path,
    *,
    tabular: bool = False,
    readable_storage: Sequence[str | Path] = (),
    specs: Sequence[dict[str, str]] | None = None,
    serialization_registry: Any = None,
) -> Any:
    """Serve ``directory`` with tiled in this process; return the root client.

    Parameters
    ----------
    directory : Path
        Holds ``catalog.db`` and ``data/`` (created if missing).
    tabular : bool
        Also give tiled a SQLite store for tables (``tables.db``), as Bluesky
        runs written with TiledWriter need.
    readable_storage : paths
        Directories of external files (e.g. detector HDF5) tiled may serve.
    specs, serialization_registry
        Passed to tiled (the root's specs; exporters such as Bluesky's
        ``application/json-seq``).
    """
    app = embedded_app(
        directory,
        tabular=tabular,
        readable_storage=readable_storage,
        specs=specs,
        serialization_registry=serialization_registry,
    )
    with _collection_paused():
        from tiled.client import Context, from_context

        with warnings.catch_warnings():
            # tiled's in-process transport uses starlette's TestClient over
            # httpx, which starlette marks deprecated; it works and is tiled's
            # own choice.
            warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
            warnings.filterwarnings("ignore", message=".*httpx.*starlette.*")
            context = Context.from_app(app)
        return from_context(context)
