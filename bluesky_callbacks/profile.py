"""Masks for every run of an IPython profile: :func:`install` wires a RunEngine.

The profile snippet ``profile_snippets/95-chx-masks.py`` is a few settings and
one call of :func:`install`, in the manner of ``nslsii.configure_base``; what
it puts in the user namespace are the methods of :class:`ProfileMasks`.

At each run start :class:`~bluesky_callbacks.MaskProvenance` records the
masks of every detector the run uses (the run's own ``md["mask_names"]`` >
the detector's active set > ``fallback``) and
:class:`~bluesky_callbacks.MaskingRouter` stores a masked run beside it, with
``bluesky_tiled_plugins.TiledWriter`` in the runs store
(``$CHX_MASKS_RUNS_URI``, else ``runs/`` in the registry's directory), opened
at the first run that has masks so that IPython starts fast.

Examples
--------
>>> import tempfile
>>> import numpy as np
>>> from bluesky import RunEngine
>>> from bluesky.plans import count
>>> from bluesky_callbacks.sim import sim_eiger500k
>>> from chx_masks import MaskRegistry
>>> registry = MaskRegistry.embedded(tempfile.mkdtemp())
>>> K = "eiger500K_single_image"
>>> uid = registry.register_mask(K, "edge", np.ones((514, 1030), bool))
>>> RE = RunEngine({})
>>> masks = install(RE, fallback={K: ["edge"]}, registry=registry,
...                 runs=tempfile.mkdtemp(), quiet=True)
>>> (raw_uid,) = RE(count([sim_eiger500k()], num=1))
>>> masked = masks.masked_run(raw_uid)
>>> masked.metadata["start"]["parent_uid"] == raw_uid
True
>>> masked.metadata["start"]["masks"][K]["uids"] == [uid]
True
>>> masks.uninstall(); registry.close()
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._profile_parts import _log_lines, _masked_run_writer, _missing_flag, _Opener, _print_table

if TYPE_CHECKING:
    from bluesky import RunEngine

    from chx_masks import MaskRegistry

    from ._provenance import MaskProvenance
    from ._router import MaskingRouter
    from ._stores import RunStore

__all__ = ["HELPERS", "ProfileMasks", "install"]

#: The methods :meth:`ProfileMasks.helpers` gives the user namespace.
HELPERS = (
    "chx_masks_registry",
    "chx_masks_runs",
    "masked_run",
    "masks_list",
    "mask_show",
    "mask_register",
    "masks_activate",
    "masks_active",
)


class ProfileMasks:
    """The mask registry, runs store and helpers of one IPython session.

    Parameters
    ----------
    fallback : mapping
        Masks of detectors that have no active set in the registry
        (``CHX_MASKS_FALLBACK`` in the snippet).
    on_unavailable : {"record", "raise"}
        What a run start does when the registry cannot be reached or a mask
        is missing: open the run and record why (its masked run then withholds
        that detector's frames and fails), or refuse to open it.
    timeout : float
        Seconds a run start waits for the registry, once for the preprocessor
        and the router together.
    start_timeout : float
        Seconds IPython start waits for a registry server.
    registry : MaskRegistry, optional
        Use this registry instead of the one the environment names.
    runs : str or Path, optional
        The runs store (a tiled URI or a local directory) instead of
        ``$CHX_MASKS_RUNS_URI`` or ``runs/`` in the registry's directory.

    Examples
    --------
    >>> ProfileMasks(fallback={"eiger4m_single_image": ["chip_mask"]}).fallback
    {'eiger4m_single_image': ['chip_mask']}
    """

    def __init__(
        self,
        *,
        fallback: Mapping[str, Sequence[str]],
        on_unavailable: Literal["record", "raise"] = "record",
        timeout: float = 20.0,
        start_timeout: float = 2.0,
        registry: MaskRegistry | None = None,
        runs: str | Path | None = None,
    ) -> None:
        self.fallback = {det: list(names) for det, names in fallback.items()}
        self.on_unavailable = on_unavailable
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._given = registry
        self._runs_given = runs
        self._registry: MaskRegistry | None = None
        self._lock = threading.Lock()
        self._runs: Any = None
        self._subscription: tuple[Any, int] | None = None
        self.provenance: MaskProvenance | None = None
        self.router: MaskingRouter | None = None

    # -- where things are -------------------------------------------------

    @property
    def location(self) -> str:
        """Where the registry is, for messages (no API key)."""
        from chx_masks.settings import settings

        if self._given is not None:
            return str(self._given.location)
        configured = settings()
        if configured.uri:
            return configured.uri.split("?")[0]
        if configured.profile:
            return f"tiled profile {configured.profile!r}"
        from chx_masks.stores import default_directory

        return str(default_directory())

    def runs_location(self) -> str | Path:
        """The runs store: a tiled URI (str), else a local directory (Path)."""
        store = self._runs_store()
        return store.location if store.remote else Path(store.location)

    def _runs_store(self) -> RunStore:
        """The runs store as given to :func:`install`, else as configured."""
        from ._stores import located_store

        return located_store(None if self._runs_given is None else str(self._runs_given), "runs")

    def frames_dir(self) -> Path | None:
        """Where the router writes masked frames (None: inline in the derived run).

        ``$CHX_MASKS_FRAMES_DIR`` if set (for a runs server: a directory it
        reads), else inside a local runs store (which serves its own storage);
        a runs server without it gets the frames inline.
        """
        from chx_masks.settings import settings

        given = settings().frames_dir
        if given is not None:
            return given.expanduser()
        where = self.runs_location()
        return None if isinstance(where, str) else where / "data" / "masked-frames"

    # -- the registry and the runs store ----------------------------------

    def open_registry(self) -> MaskRegistry:
        """Open this session's registry once; the factory the run callbacks share.

        A registry server is opened with ``MaskRegistry.from_uri`` (bounded
        in time) and made the default registry, rather than by
        ``chx_masks.default_registry()``: a connection that hangs then holds
        no lock that the interpreter's exit waits for. Every failure is a
        ``chx_masks.ChxMasksError``, so ``on_unavailable`` applies to it.
        """
        import atexit

        import chx_masks
        from chx_masks.settings import settings

        with self._lock:
            if self._registry is not None:
                return self._registry
            if self._given is not None:
                self._registry = self._given
                return self._registry
            configured = settings()
            uri, profile = configured.uri, configured.profile
            try:
                if uri:
                    registry = chx_masks.MaskRegistry.from_uri(
                        uri, api_key=configured.secret("api_key")
                    )
                elif profile:
                    registry = chx_masks.MaskRegistry.from_profile(profile)
                else:
                    registry = chx_masks.default_registry()  # embedded: closed at exit there
            except chx_masks.ChxMasksError:
                raise
            except Exception as err:  # e.g. a malformed tiled profile: still "unavailable"
                raise chx_masks.RegistryUnavailableError(
                    f"Cannot open the mask registry at {self.location}: {type(err).__name__}: {err}"
                ) from err
            if uri or profile:
                # The module functions (chx_masks.register_mask, ...) use it too.
                chx_masks.set_default_registry(registry)
                atexit.register(registry.close)
            self._registry = registry
            return registry

    def chx_masks_registry(self, *, retry: bool = False) -> MaskRegistry:
        """The mask registry of this session, opened on first use.

        While the registry is known to be down (a run start or IPython start
        found it so), this raises ``chx_masks.RegistryUnavailableError`` at once,
        saying since when; a background check asks it again every few seconds.
        ``retry=True`` asks it now (waiting at most CHX_MASKS_TIMEOUT seconds).

        Examples
        --------
        >>> chx_masks_registry().get_masks()  # doctest: +SKIP
        [('eiger4m_single_image', 'chip_mask'), ...]
        """
        if self.provenance is None:  # not wired: no shared state to consult
            return self.open_registry()
        registry: MaskRegistry = self.provenance.breaker.call(
            lambda registry: registry,
            self.timeout,
            "opening the mask registry",
            retry=retry,
            setting="CHX_MASKS_TIMEOUT",
        )
        return registry

    def chx_masks_runs(self) -> Any:
        """The tiled client holding the masked runs, opened on first use.

        ``CHX_MASKS_RUNS_URI`` (+ ``CHX_MASKS_RUNS_API_KEY``) if set, else the
        local store ``<CHX_MASKS_DIR or user data dir>/runs`` (an in-process
        tiled, no server).

        Examples
        --------
        >>> from tiled.queries import Key
        >>> chx_masks_runs().search(Key("parent_uid") == raw_uid)  # doctest: +SKIP
        """
        # Only the RunEngine's first document or the user (whose prompt waits
        # while RE runs) opens it, never both at once: no lock needed.
        if self._runs is None:
            store = self._runs_store()
            if store.remote:
                from tiled.client import from_uri

                client = from_uri(store.location, api_key=store.api_key)
            else:
                import atexit

                from ._replay import open_run_store

                client = open_run_store(Path(store.location))
                atexit.register(client.context.close)
            self._runs = client
        return self._runs

    # -- helpers for the user ---------------------------------------------

    def masked_run(self, raw_uid: str) -> Any:
        """The stored masked run of the raw run ``raw_uid`` (the latest, if several).

        Examples
        --------
        >>> (uid,) = RE(count([eiger4m_single], num=10))  # doctest: +SKIP
        >>> masked_run(uid)["primary"]["eiger4m_single_image"][0]  # doctest: +SKIP
        """
        from tiled.queries import Key

        found = self.chx_masks_runs().search(Key("parent_uid") == raw_uid)
        if len(found) == 0:
            raise KeyError(
                f"No masked run has parent_uid {raw_uid!r} in {self.chx_masks_runs()!r}. "
                "Masked runs are stored for runs taken since this profile subscribed "
                "chx_masks_router; replay older ones with bluesky_callbacks.replay_masked."
            )
        return found.values().last()

    def masks_list(self, detector: str | None = None) -> None:
        """Print the current version of every mask (of ``detector``, if given).

        Columns: detector, name, version, short uid, masked fraction, and
        "yes" where the detector's active set uses the mask.

        Examples
        --------
        >>> masks_list()  # doctest: +SKIP
        detector              name       version  uid       masked  active
        eiger4m_single_image  chip_mask  2        0f4c2a9e  4.211%  yes
        """
        registry = self.chx_masks_registry()
        if detector is not None:
            registry.get_detector(detector)  # an unknown name is refused with the known ones
        records = registry.search(detector=detector)
        if not records:
            print("No masks registered" + (f" for {detector}." if detector else "."))
            return
        active = registry.active_sets()
        _print_table(
            ["detector", "name", "version", "uid", "masked", "active"],
            [
                [
                    r.detector,
                    r.name,
                    r.version,
                    r.uid[:8],
                    f"{r.masked_fraction:.3%}",
                    "yes" if r.detector in active and r.name in active[r.detector].names else "",
                ]
                for r in records
            ],
        )

    def mask_show(
        self, detector: str, name: str, png: str | Path | None = None, *, version: int | None = None
    ) -> None:
        """Print the record of mask ``detector/name`` (current or given ``version``).

        With ``png="path.png"`` also write a picture of it (needs matplotlib).

        Examples
        --------
        >>> mask_show("eiger4m_single_image", "chip_mask", png="chip.png")  # doctest: +SKIP
        """
        import importlib.util
        import json

        registry = self.chx_masks_registry()
        record = registry.describe(registry.get_mask_uid(detector, name, version=version))

        def when(t: Any) -> str:
            return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t is not None else ""

        state = (
            "retired" if record.retired_at else "superseded" if record.superseded_at else "current"
        )
        print(f"{record.detector}/{record.name} v{record.version}")
        for label, value in [
            ("uid", record.uid),
            ("state", state),
            ("registered at", when(record.registered_at)),
            ("valid until", when(record.valid_until) or "(current)"),
            ("shape", f"{record.shape[0]} x {record.shape[1]}"),
            ("masked", f"{record.masked_pixels:,} pixels ({record.masked_fraction:.3%})"),
            ("sha256", record.sha256),
        ]:
            print(f"  {label:<14} {value}")
        if record.metadata:
            print("  metadata")
            for line in json.dumps(dict(record.metadata), indent=2, default=str).splitlines():
                print(f"    {line}")
        if png is None:
            return
        if importlib.util.find_spec("matplotlib") is None:
            print("  picture        not written: pictures need matplotlib (the plot extra)")
            return
        from chx_masks import plot

        path = plot.mask_png(
            registry.get_mask_by_uid(record.uid).compute(), png, title=plot.record_title(record)
        )
        print(f"  picture        {path}")

    def mask_register(
        self,
        detector: str,
        name: str,
        mask_or_path: Any,
        update: bool = False,
        **metadata: Any,
    ) -> str:
        """Register a mask (a NumPy bool array or a mask file); return its uid.

        A file (.npy, .edf, .msk, .tif, NeXus ...) is read with
        ``chx_masks.io.register_from_file``, which records it as the source.
        ``update=True`` adds the next version of an existing ``detector/name``.
        Keyword arguments are stored as searchable metadata. Runs use the mask
        once the detector's active set names it (see masks_activate).

        Examples
        --------
        >>> mask_register("eiger4m_single_image", "beamstop", "bs.npy",
        ...               sample="silica")  # doctest: +SKIP
        """
        import os

        registry = self.chx_masks_registry()
        given = metadata or None  # None: an update keeps the previous version's metadata
        if isinstance(mask_or_path, (str, os.PathLike)):
            from chx_masks.io import register_from_file

            uid = register_from_file(
                registry, detector, name, mask_or_path, update=update, metadata=given
            )
        elif update:
            uid = registry.update_mask(detector, name, mask_or_path, metadata=given)
        else:
            uid = registry.register_mask(detector, name, mask_or_path, metadata=given)
        record = registry.describe(uid)
        print(
            f"{'updated' if update else 'registered'} {detector}/{name} v{record.version} "
            f"(uid {uid}, masked {record.masked_fraction:.3%})"
        )
        active = registry.active_set(detector)
        if active is not None and name in active.names:
            print(f"  the active set of {detector} uses it: the next run applies v{record.version}")
        else:
            names = [*(active.names if active is not None else ()), name]
            print(f"  runs use it once active: masks_activate({detector!r}, {names!r})")
        return uid

    def masks_activate(
        self, detector: str, names: str | Sequence[str], note: str | None = None
    ) -> None:
        """Choose the masks applied to ``detector`` from the next run on.

        Stored in the registry (with its history), so every session and the
        ``chx-masks`` command line see it; ``[]`` withdraws the choice (then
        CHX_MASKS_FALLBACK applies). ``note`` says why, e.g. the sample.

        Examples
        --------
        >>> masks_activate("eiger4m_single_image", ["pixel_mask", "beamstop"],
        ...                note="sample B")  # doctest: +SKIP
        """
        if isinstance(names, str):
            names = [names]
        active = self.chx_masks_registry().activate(detector, list(names), note=note)
        if active.names:
            print(
                f"from the next run, {detector} uses {', '.join(active.names)} "
                f"(active set v{active.version})"
            )
        else:
            fallback = self.fallback.get(detector)
            print(
                f"{detector} has no active set (v{active.version}): runs use "
                f"{'CHX_MASKS_FALLBACK ' + repr(fallback) if fallback else 'no masks'}"
            )

    def masks_active(self) -> None:
        """Print which masks the next run uses for each detector, and why.

        A name that is not a current registered mask (never registered, or
        retired) is flagged after the table with the fix: a run with that
        detector would open without its masks. A run's own
        ``md={"mask_names": {...}}`` still overrides this.

        Examples
        --------
        >>> masks_active()  # doctest: +SKIP
        detector              masks                 chosen by      since             note
        eiger4m_single_image  chip_mask, beamstop  active set v3  2026-11-25 09:30  sample B
        """
        registry = self.chx_masks_registry()
        sets = registry.active_sets()
        fallback = self.provenance.masks if self.provenance is not None else self.fallback
        rows, flags = [], []
        for detector in sorted(set(sets) | set(fallback)):
            active = sets.get(detector)
            if active is not None and active.names:
                names, source = list(active.names), f"active set v{active.version}"
                rows.append(
                    [
                        detector,
                        ", ".join(names),
                        source,
                        active.at.astimezone().strftime("%Y-%m-%d %H:%M"),
                        active.note or "",
                    ]
                )
            else:
                names, source = list(fallback.get(detector, [])), "CHX_MASKS_FALLBACK"
                rows.append([detector, ", ".join(names) or "(none)", source, "", ""])
            flag = _missing_flag(registry, detector, names, source)
            if flag:
                flags.append(flag)
        if not rows:
            print("No active sets and no CHX_MASKS_FALLBACK: runs record no masks.")
            return
        _print_table(["detector", "masks", "chosen by", "since", "note"], rows)
        for flag in flags:
            print(flag)

    def helpers(self) -> dict[str, Callable[..., Any]]:
        """The user namespace's helpers (:data:`HELPERS`), and the two callbacks.

        Examples
        --------
        >>> sorted(ProfileMasks(fallback={}).helpers())[:3]
        ['chx_masks_provenance', 'chx_masks_registry', 'chx_masks_router']
        """
        found: dict[str, Any] = {name: getattr(self, name) for name in HELPERS}
        found["chx_masks_provenance"] = self.provenance
        found["chx_masks_router"] = self.router
        return found

    # -- wiring -----------------------------------------------------------

    def wire(self, RE: RunEngine) -> None:
        """Add the preprocessor to ``RE`` and subscribe the router (replacing earlier ones)."""
        from ._provenance import MaskProvenance
        from ._router import MaskingRouter

        _log_lines()
        # One factory for both: they share its breaker, so a run start that
        # found the registry down spares the router, and later runs, the wait.
        opener = _Opener(self)
        provenance = MaskProvenance(
            opener,
            masks=self.fallback,
            on_unavailable=self.on_unavailable,
            timeout=self.timeout,
        )
        frames_dir = self.frames_dir()
        router = MaskingRouter(
            opener,
            _masked_run_writer(self.chx_masks_runs),
            timeout=self.timeout,
            frames="inline" if frames_dir is None else "files",
            directory=frames_dir,
        )
        self.uninstall()
        RE.preprocessors.append(provenance)
        self._subscription = (RE, RE.subscribe(router))
        self.provenance, self.router = provenance, router

    def uninstall(self) -> None:
        """Take this session's preprocessor and router off their RunEngine."""
        if self._subscription is None:
            return
        RE, token = self._subscription
        if self.provenance in RE.preprocessors:
            RE.preprocessors.remove(self.provenance)
        RE.unsubscribe(token)
        self._subscription = None

    def check_at_start(self, *, quiet: bool = False) -> None:
        """Ask the registry once, bounded by ``start_timeout`` for a server; say what was found.

        Never raises for an unavailable registry: runs then follow
        ``on_unavailable`` until a background check sees it answer.
        """
        import chx_masks
        from chx_masks.settings import settings

        assert self.provenance is not None, "wire(RE) first"
        configured = settings()
        remote = self._given is None and (configured.uri or configured.profile)
        try:
            # Off the main thread and bounded: tiled's retries of a server that
            # does not answer cost start CHX_MASKS_START_TIMEOUT at most, silently.
            registry = self.provenance.breaker.call(
                lambda registry: registry,
                self.start_timeout if remote else None,
                "opening it at IPython start",
                retry=True,
                setting="CHX_MASKS_START_TIMEOUT",
            )
        except chx_masks.ChxMasksError as err:
            policy = (
                "runs open at once and record that their masks are missing"
                if self.on_unavailable == "record"
                else "runs refuse to open"
            )
            print(
                f"chx-masks: WARNING mask registry unavailable at {self.location}; "
                f"{policy} until a check in the background sees it answer: {err}",
                file=sys.stderr,
            )
        except KeyboardInterrupt:
            print(
                "chx-masks: registry check interrupted; it is tried again at the next run start.",
                file=sys.stderr,
            )
        else:
            if not quiet:
                runs = str(self.runs_location()).split("?")[0]
                print(
                    f"chx-masks: masks from {registry.location}, masked runs to {runs}; see "
                    "masks_active(), masks_list(), masks_activate(detector, names)."
                )


def install(
    RE: RunEngine,
    *,
    fallback: Mapping[str, Sequence[str]],
    on_unavailable: Literal["record", "raise"] = "record",
    timeout: float = 20.0,
    start_timeout: float = 2.0,
    previous: ProfileMasks | None = None,
    registry: MaskRegistry | None = None,
    runs: str | Path | None = None,
    quiet: bool = False,
) -> ProfileMasks:
    """Wire masks into ``RE`` for every run; return the session's :class:`ProfileMasks`.

    ``previous`` (the object an earlier run of the profile returned) is
    unwired first, so running the profile again replaces the wiring. The
    registry is asked once at the end (``start_timeout`` for a server); one
    line says where masks and masked runs are, or why the registry is not
    available. The other parameters are those of :class:`ProfileMasks`.

    Examples
    --------
    >>> from bluesky import RunEngine
    >>> import tempfile
    >>> from chx_masks import MaskRegistry
    >>> RE = RunEngine({})
    >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as registry:
    ...     masks = install(RE, fallback={}, registry=registry, quiet=True)
    ...     again = install(RE, fallback={}, registry=registry, previous=masks, quiet=True)
    >>> len(RE.preprocessors)
    1
    """
    if previous is not None:
        previous.uninstall()
    masks = ProfileMasks(
        fallback=fallback,
        on_unavailable=on_unavailable,
        timeout=timeout,
        start_timeout=start_timeout,
        registry=registry,
        runs=runs,
    )
    masks.wire(RE)
    masks.check_at_start(quiet=quiet)
    return masks
