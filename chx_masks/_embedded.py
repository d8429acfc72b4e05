"""The zero-configuration registry: a tiled SQLite catalog served in-process.

Used by :meth:`chx_masks.MaskRegistry.embedded` and the default registry when
no server is configured.
"""

from __future__ import annotations

import fcntl
import logging
import os
import warnings
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
    configured = os.environ.get("CHX_MASKS_DIR")
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("chx-masks", appauthor=False))


def open_embedded(directory: Path) -> Any:
    """Serve ``directory`` with tiled in this process; return the root client."""
    from tiled.catalog import from_uri
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
    except OSError as err:
        raise RegistryUnavailableError(
            f"Cannot create the embedded registry directory {directory}: {err}. "
            "Set CHX_MASKS_DIR to a writable directory."
        ) from err
    database = directory / "catalog.db"
    # Creating the catalog runs tiled's migrations in a subprocess (seconds);
    # do it once, and only one process at a time.
    with open(directory / ".init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            catalog = from_uri(
                f"sqlite:///{database}",
                writable_storage=str(directory / "data"),
                init_if_not_exists=not database.exists(),
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    app = build_app(catalog)
    # tiled announces its version at INFO on every in-process start; a
    # library opened from IPython should stay quiet.
    logging.getLogger("tiled.server.app").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # tiled's in-process transport uses starlette's TestClient over httpx,
        # which starlette marks deprecated; it works and is tiled's own choice.
        warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
        warnings.filterwarnings("ignore", message=".*httpx.*starlette.*")
        context = Context.from_app(app)
    return from_context(context)
