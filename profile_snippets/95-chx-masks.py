# 95-chx-masks.py: detector masks for every run of the CHX IPython profile.
#
# What it does, once the base setup has created the RunEngine `RE`:
#   * opens the mask registry (as chx_masks.default_registry() would, and makes
#     it the default). A registry server that does not answer within
#     CHX_MASKS_START_TIMEOUT costs IPython start that much and one warning
#     line, never a broken profile.
#   * RE.preprocessors += chx_masks_provenance (MaskProvenance). At each run
#     start it chooses, per detector the run uses: the run's own
#     md={"mask_names": {...}} > the detector's active set in the registry >
#     CHX_MASKS_FALLBACK below, and records the exact masks in the start
#     document: "masks" (names, uids, versions, sha256, chosen_by), "mask_uids".
#   * RE.subscribe(chx_masks_router) (MaskingRouter): every raw run gets a
#     derived run with masked frames (its start has parent_uid = the raw uid)
#     written with TiledWriter to the "runs" store (see below), opened at the
#     first run so IPython starts fast. masked_run(raw_uid) finds it.
#   * helpers: masks_active(), masks_list(), masks_activate(), mask_show(),
#     mask_register(), masked_run(), chx_masks_registry(), chx_masks_runs().
#
# Where: copy it into profile_<name>/startup/ so that it sorts after the file
# that creates RE (e.g. 00-base.py). Needs chx-masks with the bluesky extra.
# Without RE it prints one line and sets up nothing.
#
# Configuration, from the environment at IPython start:
#   CHX_MASKS_URI (+ CHX_MASKS_API_KEY)  tiled server holding the registry, or
#   CHX_MASKS_PROFILE                    a tiled profile, else an embedded
#   CHX_MASKS_DIR                        registry in this directory (default
#                                        ~/.local/share/chx-masks);
#   CHX_MASKS_RUNS_URI (+ CHX_MASKS_RUNS_API_KEY)  tiled container for the
#       masked runs; default: a local store in <CHX_MASKS_DIR or
#       ~/.local/share/chx-masks>/runs.
#   CHX_MASKS_FRAMES_DIR  where the masked frames are written (HDF5 files,
#       bitshuffle-LZ4; the runs store holds references); default: inside a
#       local runs store. A runs server reads them only from its
#       readable_storage; without this variable it gets the frames inline.
# and the settings below.
#
# A registry server that is down: IPython start waits at most
# CHX_MASKS_START_TIMEOUT (2 s) and prints one warning line; tiled prints no
# "Retrying..." of its own. A run start waits for it at most CHX_MASKS_TIMEOUT
# once for the preprocessor and the router together; after a failure to answer,
# runs open at once (CHX_MASKS_ON_UNAVAILABLE decides how, one warning line per
# run) while a background check asks the registry again every few seconds
# (10 s at most); the first run after it answers has its masks again. Helpers
# fail at once with the time since it is down; chx_masks_registry(retry=True)
# asks it now.
#
# Changing the masks, no restart needed (applies from the next run start):
#   masks_activate("eiger4m_single_image", ["pixel_mask", "chip_mask", "beamstop"],
#                  note="sample B")
#   or from any shell:  chx-masks activate eiger4m_single_image pixel_mask chip_mask beamstop
#   one run only:  RE(count([eiger4m_single],
#                           md={"mask_names": {"eiger4m_single_image": ["beamstop_v2"]}}))
#   masks_active() shows what the next run will use, and flags any name that is
#   not a registered mask. Metadata given to RE(...) itself, e.g.
#   RE(plan, mask_names=...), reaches the run after the masks were chosen: it
#   cannot choose them, and the run says so in one warning line.

# Masks of detectors that have no active set in the registry. The registry's
# active sets decide for the others; this is read once, at IPython start.
CHX_MASKS_FALLBACK = {
    "eiger4m_single_image": ["pixel_mask", "chip_mask", "bad_pixels"],
    "eiger1m_single_image": ["chip_mask"],
    "eiger500K_single_image": ["chip_mask"],
}

# When the registry cannot be reached (or a mask is missing) at a run start:
#   "record": open the run anyway and record why its masks are missing, in
#             masks[<detector>]["error"]; its masked run then withholds that
#             detector's frames and ends with exit_status "fail".
#   "raise":  refuse to open the run, with an error naming registry and masks.
# "record" so that a registry outage never stops beam time.
CHX_MASKS_ON_UNAVAILABLE = "record"

# Seconds a run start waits for the registry: once, for the preprocessor and
# the router together. After the registry failed to answer, runs do not wait
# for it until a background check sees it answer again.
CHX_MASKS_TIMEOUT = 20.0

# Seconds IPython start waits for a registry server (CHX_MASKS_URI or
# CHX_MASKS_PROFILE) to answer; an embedded registry is opened at start anyway.
CHX_MASKS_START_TIMEOUT = 2.0

# What this file remembers between calls; kept if the file is run again.
if "_chx_masks_state" not in globals():
    _chx_masks_state = {
        "registry": None,
        "lock": __import__("threading").Lock(),
        "breaker": None,
        "runs": None,
        "subscription": None,
    }


def _chx_masks_open():
    """Open this session's registry once; the factory the run callbacks share.

    A registry server is opened here with ``MaskRegistry.from_uri`` (bounded
    in time) and made the default registry, rather than by
    ``chx_masks.default_registry()``: a connection that hangs then holds no
    lock that the interpreter's exit waits for. Every failure is a
    ``chx_masks.ChxMasksError``, so CHX_MASKS_ON_UNAVAILABLE applies to it.
    """
    import atexit

    import chx_masks
    from chx_masks.settings import settings

    with _chx_masks_state["lock"]:
        if _chx_masks_state["registry"] is not None:
            return _chx_masks_state["registry"]
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
                f"Cannot open the mask registry at {_chx_masks_open.location}: "
                f"{type(err).__name__}: {err}"
            ) from err
        if uri or profile:
            # The module functions (chx_masks.register_mask, ...) use it too.
            chx_masks.set_default_registry(registry)
            atexit.register(registry.close)
        _chx_masks_state["registry"] = registry
        return registry


def _chx_masks_location():
    """Where the registry is, for messages (no API key)."""
    from chx_masks.settings import settings

    configured = settings()
    if configured.uri:
        return configured.uri.split("?")[0]
    if configured.profile:
        return f"tiled profile {configured.profile!r}"
    return str(_chx_masks_runs_location().parent)  # the embedded registry's directory


def chx_masks_registry(*, retry=False):
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
    breaker = _chx_masks_state["breaker"]
    if breaker is None:  # the callbacks are not set up: no shared state to consult
        return _chx_masks_open()
    return breaker.call(
        lambda registry: registry,
        CHX_MASKS_TIMEOUT,
        "opening the mask registry",
        retry=retry,
        setting="CHX_MASKS_TIMEOUT",
    )


def chx_masks_runs():
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
    if _chx_masks_state["runs"] is None:
        from chx_masks.settings import settings

        where = _chx_masks_runs_location()
        if isinstance(where, str):
            from tiled.client import from_uri

            client = from_uri(where, api_key=settings().secret("runs_api_key"))
        else:
            import atexit

            from bluesky_callbacks import open_run_store

            client = open_run_store(where)
            atexit.register(client.context.close)
        _chx_masks_state["runs"] = client
    return _chx_masks_state["runs"]


def _chx_masks_runs_location():
    """CHX_MASKS_RUNS_URI (a str), else the local runs store directory (a Path)."""
    from chx_masks.settings import settings
    from chx_masks.stores import default_directory

    return settings().runs_uri or default_directory() / "runs"


def _chx_masks_frames_dir():
    """Where the router writes masked frames (None: inline in the derived run).

    CHX_MASKS_FRAMES_DIR if set (for a runs server: a directory it reads),
    else inside the local runs store (which serves its own storage); a runs
    server without CHX_MASKS_FRAMES_DIR gets the frames inline.
    """
    from chx_masks.settings import settings

    given = settings().frames_dir
    if given is not None:
        return given.expanduser()
    where = _chx_masks_runs_location()
    return None if isinstance(where, str) else where / "data" / "masked-frames"


def masked_run(raw_uid):
    """The stored masked run of the raw run ``raw_uid`` (the latest, if several).

    Examples
    --------
    >>> (uid,) = RE(count([eiger4m_single], num=10))  # doctest: +SKIP
    >>> masked_run(uid)["primary"]["eiger4m_single_image"][0]  # doctest: +SKIP
    """
    from tiled.queries import Key

    found = chx_masks_runs().search(Key("parent_uid") == raw_uid)
    if len(found) == 0:
        raise KeyError(
            f"No masked run has parent_uid {raw_uid!r} in {chx_masks_runs()!r}. Masked "
            "runs are stored for runs taken since this profile subscribed "
            "chx_masks_router; replay older ones with bluesky_callbacks.replay_masked."
        )
    return found.values().last()


def _chx_masks_table(headers, rows):
    """Print aligned columns."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    for cells in [list(headers), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())


def masks_list(detector=None):
    """Print the current version of every mask (of ``detector``, if given).

    Columns: detector, name, version, short uid, masked fraction, and
    "yes" where the detector's active set uses the mask.

    Examples
    --------
    >>> masks_list()  # doctest: +SKIP
    detector              name       version  uid       masked  active
    eiger4m_single_image  chip_mask  2        0f4c2a9e  4.211%  yes
    """
    registry = chx_masks_registry()
    if detector is not None:
        registry.get_detector(detector)  # an unknown name is refused with the known ones
    records = registry.search(detector=detector)
    if not records:
        print("No masks registered" + (f" for {detector}." if detector else "."))
        return
    active = registry.active_sets()
    _chx_masks_table(
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


def mask_show(detector, name, png=None, *, version=None):
    """Print the record of mask ``detector/name`` (current or given ``version``).

    With ``png="path.png"`` also write a picture of it (needs matplotlib).

    Examples
    --------
    >>> mask_show("eiger4m_single_image", "chip_mask", png="chip.png")  # doctest: +SKIP
    """
    import importlib.util
    import json

    registry = chx_masks_registry()
    record = registry.describe(registry.get_mask_uid(detector, name, version=version))

    def when(t):
        return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t is not None else ""

    state = "retired" if record.retired_at else "superseded" if record.superseded_at else "current"
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
    # Pictures come with chx_masks.plot, which older versions do not have.
    plot = None
    if importlib.util.find_spec("chx_masks.plot") is not None:
        from chx_masks import plot
    if plot is None or not hasattr(plot, "mask_png"):
        print("  picture        not written: this chx-masks version cannot draw masks")
        return
    title = plot.record_title(record) if hasattr(plot, "record_title") else str(record)
    path = plot.mask_png(registry.get_mask_by_uid(record.uid).compute(), png, title=title)
    print(f"  picture        {path}")


def mask_register(detector, name, mask_or_path, update=False, **metadata):
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

    registry = chx_masks_registry()
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


def masks_activate(detector, names, note=None):
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
    active = chx_masks_registry().activate(detector, list(names), note=note)
    if active.names:
        print(
            f"from the next run, {detector} uses {', '.join(active.names)} "
            f"(active set v{active.version})"
        )
    else:
        fallback = CHX_MASKS_FALLBACK.get(detector)
        print(
            f"{detector} has no active set (v{active.version}): runs use "
            f"{'CHX_MASKS_FALLBACK ' + repr(fallback) if fallback else 'no masks'}"
        )


def masks_active():
    """Print which masks the next run uses for each detector, and why.

    A name that is not a current registered mask (never registered, or
    retired) is flagged after the table with the fix: a run with that
    detector would open without its masks. A run's own
    ``md={"mask_names": {...}}`` still overrides this.

    Examples
    --------
    >>> masks_active()  # doctest: +SKIP
    detector              masks                           chosen by     since             note
    eiger4m_single_image  pixel_mask, chip_mask, beamstop  active set v3  2026-11-25 09:30  sample B
    """
    import chx_masks

    registry = chx_masks_registry()
    sets = registry.active_sets()
    provenance = globals().get("chx_masks_provenance")
    fallback = provenance.masks if provenance is not None else CHX_MASKS_FALLBACK
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
        if not names:
            continue
        try:
            missing = registry.missing_names(detector, names)
        except chx_masks.ChxMasksError as err:  # e.g. a detector the registry does not know
            flags.append(f"! {detector}: its masks cannot be checked: {err}")
            continue
        if missing:
            keep = [n for n in names if n not in missing]
            one = len(missing) == 1
            if keep:
                fix = f"masks_activate({detector!r}, {keep!r}) without {'it' if one else 'them'}"
            elif source == "CHX_MASKS_FALLBACK":
                fix = f"masks_activate({detector!r}, [registered names])"
            else:
                fix = f"masks_activate({detector!r}, []) to fall back to CHX_MASKS_FALLBACK"
            flags.append(
                f"! {detector}: {', '.join(missing)} ({source}) "
                f"{'is not a registered mask' if one else 'are not registered masks'} "
                "(never registered, or retired): a run with this detector opens without "
                f"its masks. Register {'it' if one else 'them'} with mask_register(...), "
                f"or {fix}."
            )
    if not rows:
        print("No active sets and no CHX_MASKS_FALLBACK: runs record no masks.")
        return
    _chx_masks_table(["detector", "masks", "chosen by", "since", "note"], rows)
    for flag in flags:
        print(flag)


def _chx_masks_log_lines():
    """One "chx-masks: ..." line on stderr per warning of the run callbacks.

    Only where nothing else handles logging (Python would print the bare
    message); a profile that configures logging keeps its own handlers.
    """
    import logging
    import sys

    if logging.getLogger().handlers:
        return
    log = logging.getLogger("bluesky_callbacks")
    if any(getattr(h, "_chx_masks", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("chx-masks: %(message)s"))
    handler._chx_masks = True
    log.addHandler(handler)


def _chx_masks_install(RE):
    """Wire the registry into ``RE``; never raise (the profile must go on)."""
    import sys

    try:
        import chx_masks
        from bluesky_callbacks import MaskingRouter, MaskProvenance

        _chx_masks_log_lines()
        _chx_masks_open.location = _chx_masks_location()  # named in messages
        # One factory for both: they share its breaker, so a run start that
        # found the registry down spares the router, and later runs, the wait.
        provenance = MaskProvenance(
            _chx_masks_open,
            masks=CHX_MASKS_FALLBACK,
            on_unavailable=CHX_MASKS_ON_UNAVAILABLE,
            timeout=CHX_MASKS_TIMEOUT,
        )
        writer = {"open": None, "skip": False}

        def write_masked_run(name, doc):
            # TiledWriter and its store are opened at the first masked run,
            # not at IPython start; a store that cannot be opened skips that
            # run (one line) and is tried again at the next one.
            if name == "start":
                # A run that uses no masked detector has nothing to store.
                writer["skip"] = not doc.get("masks")
                if writer["open"] is None and not writer["skip"]:
                    try:
                        from bluesky_tiled_plugins import TiledWriter

                        writer["open"] = TiledWriter(chx_masks_runs())
                    except Exception as err:
                        writer["skip"] = True
                        print(
                            f"chx-masks: the masked run of {doc.get('parent_uid')} is not "
                            f"stored: cannot open the runs store ({type(err).__name__}: "
                            f"{err})",
                            file=sys.stderr,
                        )
                        return
            if writer["open"] is not None and not writer["skip"]:
                writer["open"](name, doc)

        frames_dir = _chx_masks_frames_dir()
        router = MaskingRouter(
            _chx_masks_open,
            write_masked_run,
            timeout=CHX_MASKS_TIMEOUT,
            frames="inline" if frames_dir is None else "files",
            directory=frames_dir,
        )

        # Run again (e.g. %run of this file): replace, do not add, the wiring.
        previous = globals().get("chx_masks_provenance")
        if previous in RE.preprocessors:
            RE.preprocessors.remove(previous)
        subscribed = _chx_masks_state["subscription"]
        if subscribed is not None and subscribed[0] is RE:
            RE.unsubscribe(subscribed[1])
        RE.preprocessors.append(provenance)
        _chx_masks_state["subscription"] = (RE, RE.subscribe(router))
        _chx_masks_state["breaker"] = provenance.breaker
    except Exception as err:
        print(
            f"chx-masks: masks are NOT set up ({type(err).__name__}: {err}); the rest of "
            "the profile is unaffected.",
            file=sys.stderr,
        )
        return None, None

    from chx_masks.settings import settings

    configured = settings()
    remote = configured.uri or configured.profile
    try:
        # Off the main thread and bounded: tiled's retries of a server that
        # does not answer cost start CHX_MASKS_START_TIMEOUT at most, silently.
        registry = provenance.breaker.call(
            lambda registry: registry,
            CHX_MASKS_START_TIMEOUT if remote else None,
            "opening it at IPython start",
            retry=True,
            setting="CHX_MASKS_START_TIMEOUT",
        )
    except chx_masks.ChxMasksError as err:
        policy = (
            "runs open at once and record that their masks are missing"
            if CHX_MASKS_ON_UNAVAILABLE == "record"
            else "runs refuse to open"
        )
        print(
            f"chx-masks: WARNING mask registry unavailable at {_chx_masks_open.location}; "
            f"{policy} until a check in the background sees it answer: {err}",
            file=sys.stderr,
        )
    except KeyboardInterrupt:
        print(
            "chx-masks: registry check interrupted; it is tried again at the next run start.",
            file=sys.stderr,
        )
    else:
        runs = str(_chx_masks_runs_location()).split("?")[0]
        print(
            f"chx-masks: masks from {registry.location}, masked runs to {runs}; see "
            "masks_active(), masks_list(), masks_activate(detector, names)."
        )
    return provenance, router


if "RE" in globals():
    chx_masks_provenance, chx_masks_router = _chx_masks_install(RE)  # noqa: F821
else:
    print(
        "chx-masks: RE is not defined, so masks are not set up: 95-chx-masks.py must "
        "run after the startup file that creates the RunEngine RE."
    )
    del (
        CHX_MASKS_FALLBACK,
        CHX_MASKS_ON_UNAVAILABLE,
        CHX_MASKS_TIMEOUT,
        CHX_MASKS_START_TIMEOUT,
        _chx_masks_state,
        _chx_masks_open,
        _chx_masks_location,
        chx_masks_registry,
        chx_masks_runs,
        _chx_masks_runs_location,
        _chx_masks_frames_dir,
        masked_run,
        _chx_masks_table,
        masks_list,
        mask_show,
        mask_register,
        masks_activate,
        masks_active,
        _chx_masks_log_lines,
    )
del _chx_masks_install
