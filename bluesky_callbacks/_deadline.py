"""A bound on how long acquisition waits for the registry; used at run start.

The preprocessor and the router ask the registry once per run. tiled's client
retries a lost server for up to ``TILED_RETRY_TIMEOUT`` (45 s by default);
a run start must not wait that long, so the call runs in a worker thread and
the run goes on (under its policy) when the deadline passes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from chx_masks import RegistryUnavailableError

__all__ = ["DEFAULT_TIMEOUT", "call_with_deadline"]

#: Seconds a run start waits for the registry by default.
DEFAULT_TIMEOUT = 20.0

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            # A few workers: a call abandoned at its deadline keeps one busy
            # until tiled gives up, and the next run start needs another.
            _pool = ThreadPoolExecutor(4, thread_name_prefix="chx-masks-registry")
        return _pool


def call_with_deadline(func: Callable[[], T], timeout: float | None, what: str) -> T:
    """``func()``, or :class:`RegistryUnavailableError` after ``timeout`` seconds.

    Examples
    --------
    >>> call_with_deadline(lambda: 42, 1.0, "answering")
    42
    >>> import time
    >>> try:
    ...     call_with_deadline(lambda: time.sleep(2), 0.1, "sleeping")
    ... except RegistryUnavailableError as err:
    ...     print(str(err)[:49])
    The mask registry did not answer within 0.1 s whi
    """
    if timeout is None:
        return func()
    future = _executor().submit(func)
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        raise RegistryUnavailableError(
            f"The mask registry did not answer within {timeout:g} s while {what}. Check "
            "that its server is up and reachable; the timeout is the `timeout` option "
            "of MaskProvenance / MaskingRouter."
        ) from None
