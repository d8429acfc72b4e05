"""How long acquisition waits for the registry; shared by the run-start callbacks.

:class:`MaskProvenance` (at ``open_run``) and :class:`MaskingRouter` (at the
start document) reach the registry through the one :class:`RegistryBreaker`
of that registry, or of that factory. A run start waits at most its
``timeout`` for an answer; once the registry has failed to answer, later run
starts fail at once (milliseconds, not another timeout) until a background
probe sees it answer again. An outage therefore costs one timeout in all, not
one per callback and per run.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from typing import Any, TypeVar

from chx_masks import MaskRegistry, RegistryUnavailableError

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_PROBE_INTERVAL",
    "PROBE_INTERVAL",
    "RegistryBreaker",
    "breaker_for",
    "call_with_deadline",
    "stop_probes",
]

logger = logging.getLogger(__name__)

#: Seconds a run start waits for the registry by default.
DEFAULT_TIMEOUT = 20.0
#: Seconds between the outage and the first background check of the registry;
#: the pause doubles after each check that fails, up to MAX_PROBE_INTERVAL.
PROBE_INTERVAL = 1.0
MAX_PROBE_INTERVAL = 10.0

T = TypeVar("T")
Source = MaskRegistry | Callable[[], MaskRegistry]


def call_with_deadline(
    func: Callable[[], T], timeout: float | None, what: str, *, setting: str | None = None
) -> T:
    """``func()``, or :class:`RegistryUnavailableError` after ``timeout`` seconds.

    ``func`` runs in a daemon thread: a call abandoned at its deadline may
    wait out tiled's retries there without holding up the caller, nor the
    interpreter's exit. Off the main thread, tiled also prints no
    "Retrying..." line of its own. ``timeout=None`` calls ``func`` here.
    ``what`` says what was being done ("resolving the run's masks");
    ``setting`` names the option that sets ``timeout``, for the message.

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
    future: Future[T] = Future()

    def run() -> None:
        try:
            result = func()
        except BaseException as err:  # handed to the caller, whatever it is
            future.set_exception(err)
        else:
            future.set_result(result)

    threading.Thread(target=run, name="chx-masks-registry-call", daemon=True).start()
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        if future.done():  # func itself raised TimeoutError
            raise
        wait = f" (the wait is {setting})" if setting else ""
        raise RegistryUnavailableError(
            f"The mask registry did not answer within {timeout:g} s while {what}{wait}. "
            "Check that its server is up and reachable."
        ) from None


class RegistryBreaker:
    """A circuit breaker for one registry (or factory of one), shared by its callbacks.

    Closed (the registry answers): :meth:`call` runs the work under its
    deadline. A call that times out or raises
    :class:`~chx_masks.RegistryUnavailableError` opens it: from then on
    :meth:`call` raises at once an error saying since when the registry is
    down, and a daemon thread checks the registry in the background (after
    ``PROBE_INTERVAL`` s, then at doubling pauses up to
    ``MAX_PROBE_INTERVAL`` s; one check at a time). The first check that gets
    an answer closes it again.

    Use :func:`breaker_for` to get the breaker of a registry: every
    :class:`MaskProvenance` and :class:`MaskingRouter` given the same registry
    (or the same factory) shares one, so a run start that found the registry
    down spares its router, and the next runs, the wait.

    Parameters
    ----------
    source : MaskRegistry or callable returning one
        A factory is called in the deadline's thread (so its own connection
        is bounded too); its ``location`` attribute, if it has one, names the
        registry in messages until it has returned a registry once.

    Examples
    --------
    >>> import tempfile
    >>> from chx_masks import MaskRegistry
    >>> reg = MaskRegistry.embedded(tempfile.mkdtemp())
    >>> breaker = breaker_for(reg)
    >>> breaker.call(lambda r: r.get_masks(), 5.0, "listing masks")
    []
    >>> breaker.available, breaker is breaker_for(reg)
    (True, True)
    >>> reg.close()
    """

    def __init__(
        self,
        source: Source,
        *,
        interval: float = PROBE_INTERVAL,
        max_interval: float = MAX_PROBE_INTERVAL,
    ) -> None:
        # Weakly held: the breaker lives as long as its source, not longer.
        self._source = _weak(source)
        self.interval = interval
        self.max_interval = max_interval
        self.location: str | None = getattr(source, "location", None)
        self._lock = threading.Lock()
        self._since: float | None = None
        self._cause: BaseException | None = None
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._probe: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "answering" if self.available else f"down since {self.down_since:%H:%M:%S}"
        return f"<RegistryBreaker {self.location or 'registry'}: {state}>"

    # ------------------------------------------------------------------ state

    @property
    def available(self) -> bool:
        """False from a failure to answer until a check sees the registry answer."""
        return self._since is None

    @property
    def down_since(self) -> datetime | None:
        """When the registry stopped answering (local time), or None."""
        since = self._since
        return None if since is None else datetime.fromtimestamp(since)

    def wait_available(self, timeout: float | None = None) -> bool:
        """Block until the registry answers again (or ``timeout``); True if it does."""
        return self._up.wait(timeout)

    def registry(self) -> MaskRegistry:
        """The registry (a factory is called now, here)."""
        source = self._source()
        if source is None:
            raise RegistryUnavailableError(
                "The mask registry factory of these callbacks no longer exists."
            )
        registry = source if isinstance(source, MaskRegistry) else source()
        self.location = getattr(registry, "location", self.location)
        return registry

    # ------------------------------------------------------------------- calls

    def call(
        self,
        func: Callable[[MaskRegistry], T],
        timeout: float | None,
        what: str,
        *,
        retry: bool = False,
        setting: str | None = None,
    ) -> T:
        """``func(registry)`` within ``timeout`` seconds, or fail at once while down.

        ``retry=True`` makes the attempt even while the registry is known to
        be down (an answer closes the breaker). ``what`` and ``setting`` are
        for the message, as in :func:`call_with_deadline`.

        Raises
        ------
        RegistryUnavailableError
            The registry is known to be down (at once), or it did not answer
            within ``timeout`` (and is now known to be down).
        """
        if not retry:
            self.check()
        try:
            result = call_with_deadline(
                lambda: func(self.registry()), timeout, what, setting=setting
            )
        except RegistryUnavailableError as err:
            self.trip(err)
            raise
        if retry:
            self._answered()
        return result

    def check(self) -> None:
        """Raise at once, saying since when, while the registry is known to be down."""
        with self._lock:
            since, cause = self._since, self._cause
        if since is None:
            return
        where = f" at {self.location}" if self.location else ""
        # The cause was reported when it happened; it stays chained here.
        raise RegistryUnavailableError(
            f"The mask registry{where} has not answered since "
            f"{datetime.fromtimestamp(since):%H:%M:%S} ({time.time() - since:.0f} s "
            "ago). It is checked again in the background; run starts use it again as "
            "soon as it answers."
        ) from cause

    def trip(self, cause: BaseException) -> None:
        """Count the registry as down from now (if it was up) and check it in the background."""
        with self._lock:
            if self._since is None:
                self._since, self._cause = time.time(), cause
                self._up.clear()
            if self._probe is None or not self._probe.is_alive():
                self._probe = threading.Thread(
                    target=self._probe_loop,
                    args=(self._stop,),
                    name="chx-masks-registry-probe",
                    daemon=True,
                )
                self._probe.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the background check (a later failure starts a new one)."""
        with self._lock:
            probe, stop = self._probe, self._stop
            self._probe, self._stop = None, threading.Event()
        stop.set()
        if probe is not None and probe is not threading.current_thread():
            probe.join(timeout)

    # --------------------------------------------------------------- internals

    def _answered(self, probe: threading.Event | None = None) -> None:
        """The registry answered: close; ``probe`` is the stop event of the probe that saw it."""
        with self._lock:
            if probe is not None:
                if probe.is_set():
                    return
                self._probe = None  # a later outage starts a probe of its own
            since = self._since
            self._since = self._cause = None
            self._up.set()
        if since is not None:
            logger.info(
                "The mask registry%s answers again (it had not answered since %s, "
                "%.0f s); run starts resolve masks again.",
                f" at {self.location}" if self.location else "",
                f"{datetime.fromtimestamp(since):%H:%M:%S}",
                time.time() - since,
            )

    def _probe_loop(self, stop: threading.Event) -> None:
        pause = self.interval
        while not stop.wait(pause):
            with self._lock:
                if self._since is None or self._source() is None:
                    # Closed meanwhile (an answer to a retry), or nobody left to ask for.
                    if not stop.is_set():
                        self._probe = None
                    return
            try:
                # The run start's own first query: a registry that lists its
                # active sets answers what a run start asks.
                self.registry().active_sets()
            except Exception as err:  # still down, whatever the way
                logger.debug("The mask registry is still down: %s", err)
                pause = min(pause * 2, self.max_interval)
                continue
            self._answered(stop)
            return


def _weak(source: Any) -> Callable[[], Any]:
    """A callable giving ``source`` back while it exists (strong where it cannot be weak)."""
    try:
        return weakref.WeakMethod(source) if inspect.ismethod(source) else weakref.ref(source)
    except TypeError:
        return lambda: source


_breakers: weakref.WeakKeyDictionary[Any, RegistryBreaker] = weakref.WeakKeyDictionary()
_breakers_lock = threading.Lock()


def breaker_for(source: Source) -> RegistryBreaker:
    """The :class:`RegistryBreaker` of ``source``, the same for every caller.

    ``source`` is a registry or a factory of one; callbacks given the same
    object share one breaker (a bound method counts as its object).

    Examples
    --------
    >>> factory = lambda: None
    >>> breaker_for(factory) is breaker_for(factory)
    True
    """
    key = source.__self__ if inspect.ismethod(source) else source
    with _breakers_lock:
        try:
            breaker = _breakers.get(key)
        except TypeError:  # cannot be weakly referenced: a breaker of its own
            return RegistryBreaker(source)
        if breaker is None:
            breaker = _breakers[key] = RegistryBreaker(source)
        return breaker


def stop_probes(timeout: float | None = 5.0) -> None:
    """Stop every background check (tests, or a session that ends); states are kept.

    Examples
    --------
    >>> stop_probes()
    """
    with _breakers_lock:
        breakers = list(_breakers.values())
    for breaker in breakers:
        breaker.stop(timeout)
