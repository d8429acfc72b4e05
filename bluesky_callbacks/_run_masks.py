"""From a stored run to the masks it used, and from a mask to the runs that used it.

Read from what every run's start document records (``masks`` and
``mask_uids``, written by :class:`~bluesky_callbacks.MaskProvenance`) and
from the registry (who registered each uid; the composite of the uids,
checked against the recorded sha256). Used by ``chx-masks run`` and
``chx-masks runs-using``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chx_masks import MaskRegistry

__all__ = [
    "DetectorMasks",
    "RunMasks",
    "RunUse",
    "find_run",
    "lineage_uids",
    "run_masks",
    "runs_using",
]


@dataclass(frozen=True)
class DetectorMasks:
    """The masks one detector of a run used, as its start document recorded them.

    ``verified`` is True when the composite rebuilt from ``uids`` has the
    recorded ``sha256``, False when it has not, and None when it was not
    checked (no registry, or nothing recorded); ``error`` says why a check
    could not be made, or why the run recorded no masks for the detector.
    """

    detector: str
    names: tuple[str, ...]
    versions: tuple[int, ...]
    uids: tuple[str, ...]
    sha256: str | None
    chosen_by: str | None = None
    created_by: tuple[str | None, ...] = ()
    verified: bool | None = None
    error: str | None = None


@dataclass(frozen=True)
class RunMasks:
    """A stored run and, per detector, the masks it used.

    Examples
    --------
    >>> found = RunMasks("3f0c...", 7, None, "count", {}, None)
    >>> found.scan_id
    7
    """

    run_uid: str
    scan_id: int | None
    time: datetime | None
    plan_name: str | None
    detectors: dict[str, DetectorMasks]
    error: str | None

    @property
    def verified(self) -> bool:
        """True when every detector's composite was checked and matched."""
        return bool(self.detectors) and all(d.verified for d in self.detectors.values())


@dataclass(frozen=True)
class RunUse:
    """A run whose start recorded one of the uids asked about.

    ``masks`` names each matched uid as ``DET/NAME vVERSION``; ``derived``
    are the uids of runs made from it (its masked runs); ``products`` the
    end-of-run products of it in the processed store.
    """

    run_uid: str
    scan_id: int | None
    time: datetime | None
    plan_name: str | None
    detectors: tuple[str, ...]
    uids: tuple[str, ...]
    masks: tuple[str, ...] = ()
    derived: tuple[str, ...] = ()
    products: tuple[str, ...] = ()


def _when(start: dict[str, Any]) -> datetime | None:
    stamp = start.get("time")
    return None if stamp is None else datetime.fromtimestamp(float(stamp), tz=timezone.utc)


def find_run(runs: Any, which: str | int) -> Any:
    """The run ``which`` names in a catalog of runs: a uid, a unique uid prefix
    (5 characters at least) or a scan id (an int, or a string of digits).

    Parameters
    ----------
    runs : tiled client
        A catalog of Bluesky runs (``open_run_store``, or a tiled server's).
    which : str or int
        What names the run.

    Raises
    ------
    KeyError
        No run, or several, match; the message says which.

    Examples
    --------
    >>> run = find_run(runs, "3f0c1")  # doctest: +SKIP
    >>> run = find_run(runs, 1234)  # the run with scan_id 1234  # doctest: +SKIP
    """
    text = str(which).strip()
    try:
        if text.lstrip("-").isdigit():
            return runs[int(text)]
        return runs[text]
    except KeyError as err:
        message = err.args[0] if err.args else str(which)
        raise KeyError(f"No run {text!r} in the runs store: {message}") from None
    except IndexError:
        raise KeyError(f"No run {text!r} in the runs store: it holds fewer runs") from None
    except ValueError as err:  # a uid prefix too short, or one that several runs share
        raise KeyError(f"No run {text!r} in the runs store: {err}") from None


def run_masks(run: Any, registry: MaskRegistry | None = None) -> RunMasks:
    """The masks a stored run used, per detector, from its start document.

    With a ``registry``, each uid's registrant is read and the composite of
    the uids is rebuilt and checked against the sha256 the run recorded.

    Parameters
    ----------
    run : tiled client of a run, or its start document (a dict)
    registry : MaskRegistry, optional

    Examples
    --------
    >>> start = {"uid": "r1", "scan_id": 3, "time": 0.0, "plan_name": "count",
    ...          "masks": {"eiger": {"names": ["gaps"], "uids": ["u1"],
    ...                              "versions": [0], "sha256": "ab",
    ...                              "chosen_by": "active set v2"}},
    ...          "mask_uids": ["u1"]}
    >>> found = run_masks(start)
    >>> found.detectors["eiger"].chosen_by, found.detectors["eiger"].verified
    ('active set v2', None)
    """
    start = dict(run if isinstance(run, dict) else run.metadata["start"])
    detectors = {
        key: _detector_masks(key, dict(record), registry)
        for key, record in (start.get("masks") or {}).items()
    }
    return RunMasks(
        run_uid=str(start.get("uid")),
        scan_id=start.get("scan_id"),
        time=_when(start),
        plan_name=start.get("plan_name"),
        detectors=detectors,
        error=start.get("mask_error"),
    )


def _detector_masks(key: str, record: dict[str, Any], registry: Any) -> DetectorMasks:
    uids = tuple(record.get("uids") or ())
    found = DetectorMasks(
        detector=key,
        names=tuple(record.get("names") or ()),
        versions=tuple(record.get("versions") or ()),
        uids=uids,
        sha256=record.get("sha256"),
        chosen_by=record.get("chosen_by"),
        error=record.get("error"),
    )
    if registry is None or not uids:
        return found
    from chx_masks import ChxMasksError

    try:
        created_by = tuple(registry.describe(uid).created_by for uid in uids)
        composite = registry.composite_from_uids(uids)
    except ChxMasksError as err:
        return replace(found, error=f"{type(err).__name__}: {err}")
    return replace(found, created_by=created_by, verified=composite.sha256 == found.sha256)


def runs_using(runs: Any, uids: str | Iterable[str], *, processed: Any = None) -> list[RunUse]:
    """The runs whose start documents recorded any of ``uids``, newest first.

    A run made from another (a masked run, whose start names its
    ``parent_uid``) is listed under that run's ``derived``, not on its own.

    One tiled query per uid on the catalog (``Contains("start.mask_uids", uid)``)
    and one per hundred runs found for their masked runs, so a large catalog
    is not read run by run.

    Parameters
    ----------
    runs : tiled client
        A catalog of Bluesky runs.
    uids : str or iterable of str
        Mask uids (for a whole lineage: every uid of ``registry.history``).
    processed : tiled client, optional
        The processed store: each run's end-of-run products are listed.

    Examples
    --------
    >>> for use in runs_using(runs, registry.get_mask_uid(det, "beamstop")):  # doctest: +SKIP
    ...     print(use.scan_id, use.run_uid)
    """
    from tiled.queries import Contains

    wanted = [uids] if isinstance(uids, str) else list(dict.fromkeys(uids))
    found: dict[str, tuple[dict[str, Any], set[str]]] = {}
    for uid in wanted:
        for key, run in runs.search(Contains("start.mask_uids", uid)).items():
            start = dict(run.metadata["start"])
            if uid not in (start.get("mask_uids") or ()):
                continue  # the catalog matched a substring; the list must hold it
            found.setdefault(key, (start, set()))[1].add(uid)
    children = _derived(runs, list(found))
    uses = []
    for key, (start, matched) in found.items():
        if start.get("parent_uid") in found:
            continue  # a masked run: listed under the run it was made from
        labels = {
            uid: f"{det}/{name} v{version}"
            for det, record in (start.get("masks") or {}).items()
            for name, version, uid in zip(
                record.get("names") or (),
                record.get("versions") or (),
                record.get("uids") or (),
                strict=False,
            )
            if uid in matched
        }
        detectors = tuple(dict.fromkeys(label.split("/", 1)[0] for label in labels.values()))
        products = _products_of(processed, key)
        uses.append(
            RunUse(
                run_uid=key,
                scan_id=start.get("scan_id"),
                time=_when(start),
                plan_name=start.get("plan_name"),
                detectors=detectors,
                uids=tuple(u for u in wanted if u in matched),
                masks=tuple(labels.get(u, u) for u in wanted if u in matched),
                derived=tuple(children.get(key, ())),
                products=products,
            )
        )
    far_past = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(uses, key=lambda use: use.time or far_past, reverse=True)


def _derived(runs: Any, parents: list[str], batch: int = 100) -> dict[str, list[str]]:
    """The runs made from each of ``parents`` (their starts name it ``parent_uid``).

    One query per ``batch`` parents: the query travels in the request's URL.
    """
    from tiled.queries import In

    children: dict[str, list[str]] = {}
    for first in range(0, len(parents), batch):
        query = In("start.parent_uid", parents[first : first + batch])
        for key, run in runs.search(query).items():
            children.setdefault(run.metadata["start"]["parent_uid"], []).append(key)
    return children


def _products_of(processed: Any, run_uid: str) -> tuple[str, ...]:
    if processed is None:
        return ()
    try:
        product = processed[run_uid]
    except KeyError:
        return ()
    return tuple(f"{run_uid}/{key}" for key in product)


def lineage_uids(
    registry: MaskRegistry, detector: str, name: str, version: int | None = None
) -> Sequence[str]:
    """Every uid of a lineage, or the uid of its version ``version``.

    Raises ``MaskNotFoundError`` (from ``registry.history``) for an unknown
    lineage, and for a version it does not hold.
    """
    from chx_masks import MaskNotFoundError

    records = registry.history(detector, name)
    if version is None:
        return [r.uid for r in records]
    uids = [r.uid for r in records if r.version == version]
    if not uids:
        held = ", ".join(str(r.version) for r in records)
        raise MaskNotFoundError(f"{detector}/{name} has no version {version} (it has {held})")
    return uids
