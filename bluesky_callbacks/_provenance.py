"""Plan preprocessor that records which exact masks a run uses, in its start document.

Appended to ``RE.preprocessors`` by the beamline profile; talks to the registry
once per run (one query per detector) and never reads an array twice.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Literal

from bluesky.preprocessors import make_decorator, msg_mutator
from bluesky.utils import Msg

from chx_masks import (
    ChxMasksError,
    DetectorNotFoundError,
    MaskNotFoundError,
    MaskRegistry,
    MaskValidationError,
    RegistryUnavailableError,
)

from ._deadline import DEFAULT_TIMEOUT, RegistryBreaker, breaker_for

__all__ = ["MaskProvenance", "mask_provenance_decorator", "mask_provenance_wrapper"]

logger = logging.getLogger(__name__)

#: The key of a run's own metadata that chooses other mask names for that run.
RUN_MASKS_KEY = "mask_names"
#: The start-document key that says why a run's masks are unknown (the
#: registry could not be read when it opened, under policy "record").
MASK_ERROR_KEY = "mask_error"

Policy = Literal["raise", "record"]

CHOSEN_BY_RUN = "run metadata"
CHOSEN_BY_CONFIGURATION = "configuration"

#: Seconds a run start trusts the registry's "nothing changed since" before it
#: resolves everything again: bounds how long a change whose writer died
#: before logging it (see MaskRegistry.changed_since) goes unseen.
TRUST_UNCHANGED_S = 60.0


def _check_masks(masks: Mapping[str, Sequence[str]] | None, what: str) -> dict[str, list[str]]:
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise MaskValidationError(
            f"{what} must map a detector data key to a list of mask names, e.g. "
            "{'eiger4m_single_image': ['chip_mask', 'bad_pixels']}; got "
            f"{type(masks).__name__}."
        )
    checked = {}
    for key, names in masks.items():
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise MaskValidationError(
                f"{what}[{key!r}] must be a list of mask names, not {names!r}."
            )
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise MaskValidationError(
                f"{what}[{key!r}] must hold mask names (strings); {bad[0]!r} is a "
                f"{type(bad[0]).__name__}."
            )
        checked[str(key)] = list(names)
    return checked


def _check_options(registry: Any, timeout: float | None) -> None:
    """Refuse a registry or timeout that would only fail later, at every run start."""
    if not (isinstance(registry, MaskRegistry) or callable(registry)):
        hint = (
            f" For a tiled server use MaskRegistry.from_uri({registry!r})."
            if isinstance(registry, str)
            else ""
        )
        raise MaskValidationError(
            f"registry must be a MaskRegistry or a function that returns one, not "
            f"{type(registry).__name__} {registry!r}.{hint}"
        )
    if timeout is not None and not (
        isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0
    ):
        raise MaskValidationError(
            f"timeout must be a positive number of seconds (or None to wait for ever), "
            f"not {timeout!r}."
        )


def _used(wanted: Mapping[str, Any], own: Mapping[str, Any], devices: list[str]) -> list[str]:
    used = detectors_in_run(wanted, devices)
    # A detector the run names explicitly in its own mask_names is used
    # even when no device with that name is staged.
    return used + [key for key in own if key not in used]


def detectors_in_run(data_keys: Iterable[str], device_names: Iterable[str]) -> list[str]:
    """The configured data keys that belong to devices a run uses.

    An ophyd device ``eiger4m_single`` reads its image as data key
    ``eiger4m_single_image``: a data key belongs to a device when it is the
    device's name or starts with the name and ``_``.

    Examples
    --------
    >>> detectors_in_run(["eiger4m_single_image", "eiger1m_single_image"],
    ...                  ["eiger4m_single", "motor"])
    ['eiger4m_single_image']
    """
    devices = set(device_names)
    return [
        key for key in data_keys if key in devices or any(key.startswith(d + "_") for d in devices)
    ]


class MaskProvenance:
    """Record the composite mask of each detector a run uses, at ``open_run``.

    For every configured detector the run uses (from the run's ``detectors``
    metadata and the devices staged before it opens), the composite of the
    named masks is resolved once and the start document gains::

        "masks": {"eiger4m_single_image": {"names": [...], "uids": [...],
                  "versions": [...], "sha256": "<composite hash>"}},
        "mask_uids": [every component uid]

    Which names apply to a detector, highest precedence first: the run's own
    metadata ``mask_names={data_key: [names...]}``; the detector's current
    active set in the registry (``MaskRegistry.activate``, read at every run
    start, so staff change it between samples without touching the profile);
    the ``masks`` given here. Each record says which decided, in
    ``chosen_by``: ``"run metadata"``, ``"active set v<N>"`` or
    ``"configuration"``.

    Parameters
    ----------
    registry : MaskRegistry or callable returning one
        A callable is called at each run start (within the deadline), so a
        registry that was down when the profile loaded is looked up again
        later; its ``location`` attribute, if any, names the registry in
        messages until it has opened.
    masks : dict, optional
        ``{data_key: [mask names]}``: the composite applied to each detector
        that has no active set in the registry.
    active : bool
        Read the registry's active sets at each run start (default). False
        uses ``masks`` (and the run's own ``mask_names``) only.
    timeout : float or None
        Seconds a run start may wait for the registry (default 20); past
        that the registry counts as unreachable and ``on_unavailable``
        decides. None waits as long as tiled retries. Once the registry has
        not answered, later run starts do not wait at all until a background
        check sees it answer again (see :attr:`breaker`, shared with every
        :class:`MaskingRouter` given the same registry or factory): an outage
        costs one timeout, not one per run.
    on_unavailable : {"raise", "record"}
        When the registry cannot be reached or a mask is missing: "raise"
        refuses to open the run (no start document is emitted) with an error
        naming the registry and the masks; "record" opens the run, logs one
        warning line and records in ``masks[data_key]["error"]`` why its
        masks are missing (a missing mask is named, with the fix).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from bluesky import RunEngine
    >>> from bluesky.plans import count
    >>> from chx_masks import MaskRegistry
    >>> reg = MaskRegistry.embedded(tempfile.mkdtemp())
    >>> _ = reg.register_mask("eiger500K_single_image", "chip",
    ...                       np.ones((514, 1030), bool))
    >>> RE = RunEngine({})
    >>> RE.preprocessors.append(
    ...     MaskProvenance(reg, masks={"eiger500K_single_image": ["chip"]}))
    >>> starts = []
    >>> _ = RE.subscribe(lambda name, doc: starts.append(doc), "start")
    >>> _ = RE(count([], md={"detectors": ["eiger500K_single"]}))
    >>> starts[0]["masks"]["eiger500K_single_image"]["names"]
    ['chip']
    >>> reg.close()
    """

    def __init__(
        self,
        registry: MaskRegistry | Callable[[], MaskRegistry],
        masks: Mapping[str, Sequence[str]] | None = None,
        *,
        active: bool = True,
        on_unavailable: Policy = "raise",
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        if on_unavailable not in ("raise", "record"):
            raise MaskValidationError(
                f"on_unavailable must be 'raise' or 'record', not {on_unavailable!r}."
            )
        _check_options(registry, timeout)
        self._registry = registry
        self.masks = _check_masks(masks, "masks")
        self.active = active
        self.on_unavailable: Policy = on_unavailable
        self.timeout = timeout
        self._breaker = breaker_for(registry)
        # What the last run start resolved, and the registry change it saw.
        self._kept: tuple[tuple[int, str], int, float, Any] | None = None

    @property
    def registry(self) -> MaskRegistry:
        """The registry in use (a factory given at construction is called now)."""
        if isinstance(self._registry, MaskRegistry):
            return self._registry
        return self._registry()

    @property
    def breaker(self) -> RegistryBreaker:
        """Whether the registry answers, and since when not; shared with its routers."""
        return self._breaker

    def __call__(self, plan: Generator[Msg, Any, Any]) -> Generator[Msg, Any, Any]:
        staged: list[str] = []

        def mutate(msg: Msg) -> Msg:
            if msg.command == "stage" and msg.obj is not None:
                staged.append(getattr(msg.obj, "name", ""))
            elif msg.command == "unstage" and msg.obj is not None:
                name = getattr(msg.obj, "name", "")
                if name in staged:
                    staged.remove(name)
            elif msg.command == "open_run":
                return msg._replace(kwargs=self.start_metadata(msg.kwargs, staged))
            return msg

        return (yield from msg_mutator(plan, mutate))

    def start_metadata(
        self, run_md: Mapping[str, Any], staged: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Return ``run_md`` plus ``masks`` and ``mask_uids`` for the run it opens.

        ``run_md`` itself is left unchanged.
        """
        own = _check_masks(run_md.get(RUN_MASKS_KEY), f"the run's {RUN_MASKS_KEY}")
        devices = [*(run_md.get("detectors") or ()), *staged]
        unknown: str | None = None
        try:
            # Fails at once while the registry is known to be down.
            wanted, used, resolved = self._breaker.call(
                lambda registry: self._resolve(registry, own, devices),
                self.timeout,
                "resolving the run's masks",
                setting="MaskProvenance's timeout",
            )
        except ChxMasksError as err:
            # Without the registry the choice itself is unknown: what the
            # configuration and the run name is what this run would have used.
            wanted = {
                key: (names, CHOSEN_BY_RUN if key in own else CHOSEN_BY_CONFIGURATION)
                for key, names in {**self.masks, **own}.items()
            }
            used = _used(wanted, own, devices)
            resolved = dict.fromkeys(used, err)
            if self.active and devices:
                # The active sets, which may name masks for any of the run's
                # detectors, could not be read either: say so in the run.
                unknown = self._unknown_active(err, devices)
        if not used and unknown is None:
            return dict(run_md)
        records: dict[str, dict[str, Any]] = {}
        uids: list[str] = []
        failed: dict[str, ChxMasksError] = {}
        for key in used:
            names, chosen_by = wanted[key]
            composite = resolved[key]
            if isinstance(composite, ChxMasksError):
                error = composite
                if self.on_unavailable == "raise":
                    raise type(error)(
                        f"The run was not opened: the masks {names} for {key} "
                        f"could not be resolved: {error}"
                    ) from error
                failed[key] = error
                records[key] = {
                    "names": list(names),
                    "uids": [],
                    "versions": [],
                    "sha256": None,
                    "chosen_by": chosen_by,
                    "error": f"{type(error).__name__}: {error}",
                }
                continue
            records[key] = {**composite.provenance(), "chosen_by": chosen_by}
            uids.extend(uid for uid in composite.uids if uid not in uids)
        if failed or unknown is not None:
            logger.warning("%s", _opening_without(failed, unknown))
        start = {**run_md, "masks": records, "mask_uids": uids}
        if unknown is not None:
            start[MASK_ERROR_KEY] = unknown
        return start

    def _unknown_active(self, err: ChxMasksError, devices: list[str]) -> str:
        """Refuse the run, or the reason its detectors' active masks are unknown."""
        if self.on_unavailable == "raise":
            raise type(err)(
                f"The run was not opened: the active masks of its detectors "
                f"({', '.join(dict.fromkeys(devices))}) could not be read: {err}"
            ) from err
        return f"active sets unreadable: {type(err).__name__}: {err}"

    def _resolve(
        self, registry: MaskRegistry, own: Mapping[str, list[str]], devices: list[str]
    ) -> tuple[dict[str, tuple[list[str], str]], list[str], dict[str, Any]]:
        """All the registry work of a run start: one request when nothing changed.

        The answer of the last run start is kept with the number of the
        registry's last change; while no later change is logged (and for at
        most :data:`TRUST_UNCHANGED_S`), the same question gets the same answer.
        """
        question = (
            id(registry),
            json.dumps([own, devices, self.masks, self.active], sort_keys=True, default=str),
        )
        kept = self._kept
        if (
            kept is not None
            and kept[0] == question
            and time.monotonic() - kept[2] < TRUST_UNCHANGED_S
            and not registry.changed_since(kept[1])
        ):
            return kept[3]
        change = registry.last_change()
        answer = self._resolve_now(registry, own, devices)
        # A change logged after ``change`` was read may or may not be in the
        # answer: the next run start sees it logged and resolves again.
        self._kept = None if change is None else (question, change, time.monotonic(), answer)
        return answer

    def _resolve_now(
        self, registry: MaskRegistry, own: Mapping[str, list[str]], devices: list[str]
    ) -> tuple[dict[str, tuple[list[str], str]], list[str], dict[str, Any]]:
        """Choices, then each composite, read from the registry."""
        wanted = self._choices(registry, own)
        used = _used(wanted, own, devices)
        resolved: dict[str, Any] = {}
        for key in used:
            names, chosen_by = wanted[key]
            try:
                resolved[key] = registry.resolve_composite(key, names)
            except RegistryUnavailableError:
                raise  # gone mid-way: the whole run start is unresolved (and it trips)
            except DetectorNotFoundError as err:
                resolved[key] = err
            except MaskNotFoundError as err:
                resolved[key] = _missing_masks(registry, key, names, chosen_by, err)
            except ChxMasksError as err:
                resolved[key] = err
        return wanted, used, resolved

    def _choices(
        self, registry: MaskRegistry, own: Mapping[str, list[str]]
    ) -> dict[str, tuple[list[str], str]]:
        """Each detector's mask names and where the choice came from."""
        wanted = {key: (names, CHOSEN_BY_CONFIGURATION) for key, names in self.masks.items()}
        if self.active:
            for key, active in registry.active_sets().items():
                if active.names:
                    wanted[key] = (list(active.names), f"active set v{active.version}")
        wanted.update((key, (names, CHOSEN_BY_RUN)) for key, names in own.items())
        return wanted


def _opening_without(failed: Mapping[str, ChxMasksError], unknown: str | None) -> str:
    """The one warning line of a run that opens without (some of) its masks.

    Examples
    --------
    >>> down = RegistryUnavailableError("No answer within 2 s.")
    >>> print(_opening_without({"a_image": down, "b_image": down}, None))
    A run opens without masks for a_image, b_image: RegistryUnavailableError: No answer within 2 s.
    >>> print(_opening_without({}, "active sets unreadable: RegistryUnavailableError: ..."))
    A run opens without its detectors' masks: active sets unreadable: RegistryUnavailableError: ...
    """
    groups: dict[int, tuple[ChxMasksError, list[str]]] = {}
    for key, err in failed.items():
        groups.setdefault(id(err), (err, []))[1].append(key)
    if len(groups) == 1:
        ((err, keys),) = groups.values()
        return f"A run opens without masks for {', '.join(keys)}: {type(err).__name__}: {err}"
    if groups:
        return "A run opens without masks for " + "; ".join(
            f"{', '.join(keys)} ({type(err).__name__}: {err})" for err, keys in groups.values()
        )
    return f"A run opens without its detectors' masks: {unknown}"


def _missing_masks(
    registry: MaskRegistry,
    key: str,
    names: Sequence[str],
    chosen_by: str,
    err: MaskNotFoundError,
) -> ChxMasksError:
    """``err`` restated: every name that is not a current mask, where it came from, the fix."""
    try:
        missing = registry.missing_names(key, names)
    except RegistryUnavailableError:
        raise
    except (ChxMasksError, AttributeError):  # an older registry: its own message
        return err
    if not missing:
        return err
    keep = [n for n in names if n not in missing]
    one = len(missing) == 1
    them = "it" if one else "them"
    listed = ", ".join(repr(n) for n in missing)
    if chosen_by == CHOSEN_BY_RUN:
        source = "the run's mask_names"
        fix = f"give the run md={{'mask_names': {{{key!r}: {keep!r}}}}}"
    elif chosen_by == CHOSEN_BY_CONFIGURATION:
        source = "the configured masks (CHX_MASKS_FALLBACK in the IPython profile)"
        fix = (
            f"activate masks without {them}: masks_activate({key!r}, {keep!r})"
            if keep
            else f"activate registered masks: masks_activate({key!r}, [...])"
        )
    else:
        source = f"its {chosen_by}"
        fix = (
            f"activate the set without {them}: masks_activate({key!r}, {keep!r})"
            if keep
            else f"withdraw the set: masks_activate({key!r}, []) (the configured masks apply)"
        )
    state = "is not a current mask" if one else "are not current masks"
    restated = MaskNotFoundError(
        f"{key}: {listed} named by {source} {state} "
        f"in the registry at {registry.location} (never registered, or retired). "
        f"Register {them} (mask_register / register_mask), or {fix}."
    )
    restated.__cause__ = err
    return restated


def mask_provenance_wrapper(
    plan: Generator[Msg, Any, Any],
    registry: MaskRegistry | Callable[[], MaskRegistry],
    masks: Mapping[str, Sequence[str]] | None = None,
    *,
    active: bool = True,
    on_unavailable: Policy = "raise",
) -> Generator[Msg, Any, Any]:
    """Record mask provenance in every run of ``plan`` (see :class:`MaskProvenance`).

    Examples
    --------
    >>> from bluesky.plans import count
    >>> plan = mask_provenance_wrapper(count([]), registry=None, masks={})
    """
    return (
        yield from MaskProvenance(registry, masks, active=active, on_unavailable=on_unavailable)(
            plan
        )
    )


mask_provenance_decorator = make_decorator(mask_provenance_wrapper)
