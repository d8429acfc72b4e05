"""``chx-masks verify``: walk a whole registry and check every invariant it promises.

Used by the command line and by the server tests after every fault. The
checks, for every detector and mask node of the registry:

- each mask array reads back and hashes to the sha256 in its record;
- each slot's key is its ``name@version``, it names a mask node of the same
  detector and name, and the record's hash is the one the slot keeps;
- each lineage's versions are consecutive (adopted legacy versions keep their
  numbers) and its validity times increase;
- each active set follows the one before, later, and names lineages that
  were registered at its time;
- a sealed mask node has no metadata revisions;
- a mask node that no slot claims is an orphan of an interrupted registration
  (reported; with ``repair``, removed if it is not sealed); a claimed node
  that is not sealed is sealed by ``repair``;
- a slot whose mask node is gone is fine only if the change log records its
  purge, and a mask the log records as purged must be gone.

Nothing else is ever changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from ._content import SEALED, mask_sha256, record_sha256

if TYPE_CHECKING:
    from ._registry import MaskRegistry

__all__ = ["Problem", "VerifyReport", "verify_registry"]


@dataclass(frozen=True)
class Problem:
    """One broken invariant: what kind, where (a path in the registry), and detail."""

    kind: str
    where: str
    detail: str


@dataclass
class VerifyReport:
    """What :func:`verify_registry` found (and, with ``repair``, did).

    Examples
    --------
    >>> report = VerifyReport()
    >>> report.clean, report.to_dict()["problems"]
    (True, [])
    """

    problems: list[Problem] = field(default_factory=list)
    repaired: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "counts": dict(self.counts),
            "problems": [vars(p) for p in self.problems],
            "repaired": [vars(p) for p in self.repaired],
        }


# Kinds that repair fixes: an unclaimed, unsealed node is removed; a claimed,
# unsealed node is sealed once its bytes and record check out.
ORPHAN = "orphan"
UNSEALED = "unsealed"


def verify_registry(
    registry: MaskRegistry,
    *,
    repair: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check every invariant of ``registry``; with ``repair``, fix only what is safe.

    Parameters
    ----------
    registry : MaskRegistry
    repair : bool
        Remove unsealed orphans (interrupted registrations: no slot names them)
        and seal claimed nodes whose seal was interrupted. Never a sealed
        node, never a slot or active set.
    progress : callable, optional
        Called with (masks checked, masks in all) while arrays are checked.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from chx_masks import MaskRegistry
    >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
    ...     _ = reg.register_mask("eiger500K_single_image", "m", np.ones((514, 1030), bool))
    ...     verify_registry(reg).clean
    True
    """
    from ._registry import ACTIVE, CHANGES, DETECTORS, MASK_SPEC, MASKS

    report = VerifyReport()
    problems = report.problems
    root = registry._root
    with registry._translate("verifying the registry"):
        masks = root[MASKS] if MASKS in root else None
        nodes = {} if masks is None else dict(masks.items())
        log = root[CHANGES] if CHANGES in root else None
        purged = {
            md["purged"]: md
            for md in (dict(c.metadata) for c in ({} if log is None else log).values())
            if isinstance(md.get("purged"), str)
        }
        detectors = root[DETECTORS] if DETECTORS in root else None
        claims, lineages = _slots_by_lineage(detectors, problems)
        report.counts["detectors"] = 0 if detectors is None else len(detectors)
        report.counts["lineages"] = len(lineages)
        report.counts["slots"] = sum(len(s) for s in lineages.values())
        report.counts["masks"] = len(nodes)
        report.counts["purged"] = len(purged)

        for (det, name), slots in sorted(lineages.items()):
            _check_lineage(det, name, slots, nodes, purged, problems)
        for uid, md in sorted(purged.items()):
            if uid in nodes:
                problems.append(
                    Problem(
                        "purge",
                        f"{MASKS}/{uid}",
                        f"change {md.get('n')} records its purge but it is still stored (the "
                        "delete was refused or interrupted: run `chx-masks purge` again with "
                        "an admin key)",
                    )
                )

        for i, (uid, node) in enumerate(sorted(nodes.items())):
            if progress is not None:
                progress(i, len(nodes))
            _check_mask(registry, uid, node, claims.get(uid), problems, MASK_SPEC)
        if progress is not None and nodes:
            progress(len(nodes), len(nodes))

        active = root[ACTIVE] if ACTIVE in root else None
        sets = 0
        for det, node in {} if active is None else active.items():
            history = sorted(
                (dict(c.metadata) for c in node.values()), key=lambda md: md.get("version", -1)
            )
            sets += len(history)
            _check_active(det, history, lineages, problems)
        report.counts["active sets"] = sets

    if repair:
        _repair(registry, masks, report)
    return report


def _slots_by_lineage(
    detectors: Any, problems: list[Problem]
) -> tuple[
    dict[str | None, tuple[str, Mapping[str, Any]]],
    dict[tuple[str, str], list[Mapping[str, Any]]],
]:
    """Each mask slot by the uid it claims, and each lineage's slots; misnamed slots reported."""
    from ._registry import DETECTORS

    claims: dict[str | None, tuple[str, Mapping[str, Any]]] = {}
    lineages: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for det, node in {} if detectors is None else detectors.items():
        for key, child in node.items():
            md = dict(child.metadata)
            where = f"{DETECTORS}/{det}/{key}"
            if key != f"{md.get('name')}@{md.get('version')}":
                problems.append(Problem("slot", where, "its key is not its name@version"))
                continue
            lineages.setdefault((det, md["name"]), []).append(md)
            if md.get("kind") == "mask":
                claims[md.get("uid")] = (det, md)
    return claims, lineages


def _at(md: Mapping[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(md["at"])
    except (KeyError, TypeError, ValueError):
        return None


def _check_lineage(
    det: str,
    name: str,
    slots: list[Mapping[str, Any]],
    nodes: Mapping[str, Any],
    purged: Mapping[str, Any],
    problems: list[Problem],
) -> None:
    slots.sort(key=lambda md: md["version"])
    where = f"{det}/{name}"
    previous: Mapping[str, Any] | None = None
    for md in slots:
        version = md["version"]
        uid = md.get("uid")
        node = nodes.get(uid) if md.get("kind") == "mask" and isinstance(uid, str) else None
        adopted = node is not None and "adopted_from" in node.metadata
        expected = 0 if previous is None else previous["version"] + 1
        if version != expected and not (adopted and version > expected):
            problems.append(
                Problem("versions", f"{where}@{version}", f"expected version {expected}")
            )
        at = _at(md)
        if at is None:
            problems.append(Problem("times", f"{where}@{version}", "no valid 'at'"))
        elif previous is not None and (_at(previous) or at) >= at:
            problems.append(
                Problem("times", f"{where}@{version}", "starts no later than the version before")
            )
        if md.get("kind") == "mask":
            uid = md.get("uid")
            if node is None:
                if uid not in purged:
                    problems.append(
                        Problem(
                            "slot",
                            f"{where}@{version}",
                            f"names mask {uid}, which is not in the registry",
                        )
                    )
            else:
                stored = node.metadata
                if stored.get("detector") != det or stored.get("name") != name:
                    problems.append(
                        Problem(
                            "slot", f"{where}@{version}", f"names mask {uid} of another lineage"
                        )
                    )
                expected_record = md.get("record_sha256")
                if expected_record is not None and expected_record != record_sha256(stored):
                    problems.append(
                        Problem(
                            "record", f"masks/{uid}", f"not the record {where}@{version} registered"
                        )
                    )
        elif md.get("kind") == "retired":
            if previous is None or previous.get("kind") != "mask":
                problems.append(
                    Problem(
                        "slot", f"{where}@{version}", "retires a lineage that was not registered"
                    )
                )
        else:
            problems.append(
                Problem("slot", f"{where}@{version}", f"unknown kind {md.get('kind')!r}")
            )
        previous = md


def _check_mask(
    registry: MaskRegistry,
    uid: str,
    node: Any,
    claim: tuple[str, Mapping[str, Any]] | None,
    problems: list[Problem],
    mask_spec: str,
) -> None:
    where = f"masks/{uid}"
    md = dict(node.metadata)
    if mask_spec not in {getattr(s, "name", s) for s in node.specs}:
        problems.append(Problem("node", where, "not a mask record (no chx_mask spec)"))
        return
    sealed = md.get(SEALED, True)  # masks registered before seals existed are sealed
    if claim is None:
        kind = "sealed orphan" if sealed else ORPHAN
        problems.append(Problem(kind, where, "no slot claims it (an interrupted registration)"))
        return
    if not sealed:
        problems.append(
            Problem(UNSEALED, where, "claimed but not sealed (an interrupted registration)")
        )
    try:
        array = np.asarray(node.read())
    except Exception as err:
        problems.append(Problem("bytes", where, f"cannot be read ({type(err).__name__})"))
        return
    if array.dtype != bool or mask_sha256(array) != md.get("sha256"):
        problems.append(Problem("bytes", where, "its bytes do not hash to its sha256"))
    if sealed:
        try:
            revisions = len(node.metadata_revisions)
        except Exception:
            revisions = 0  # a server without revisions
        if revisions:
            problems.append(
                Problem("revisions", where, f"{revisions} metadata revision(s) on a sealed node")
            )


def _check_active(
    det: str,
    history: Sequence[Mapping[str, Any]],
    lineages: Mapping[tuple[str, str], list[Mapping[str, Any]]],
    problems: list[Problem],
) -> None:
    previous: Mapping[str, Any] | None = None
    for md in history:
        version = md.get("version")
        where = f"active/{det}/{version}"
        expected = 0 if previous is None else previous["version"] + 1
        if version != expected:
            problems.append(Problem("versions", where, f"expected active set {expected}"))
        at = _at(md)
        if at is None or (previous is not None and (_at(previous) or at) >= at):
            problems.append(Problem("times", where, "starts no later than the set before"))
        for name in md.get("names") or []:
            slots = [
                s
                for s in lineages.get((det, name), [])
                if at is None or ((slot_at := _at(s)) is not None and slot_at <= at)
            ]
            if not slots or slots[-1].get("kind") != "mask":
                problems.append(
                    Problem("active", where, f"names {name!r}, not registered at that time")
                )
        previous = md


def _repair(registry: MaskRegistry, masks: Any, report: VerifyReport) -> None:
    fixable = [p for p in report.problems if p.kind in (ORPHAN, UNSEALED)]
    others = {p.where for p in report.problems if p.kind not in (ORPHAN, UNSEALED)}
    for problem in fixable:
        uid = problem.where.split("/", 1)[1]
        if problem.where in others:
            continue  # its bytes or record are in doubt: leave it for a person
        with registry._translate(f"repairing {problem.where}"):
            if problem.kind == ORPHAN:
                masks.delete_contents(uid, external_only=False)
                report.counts["masks"] -= 1
            else:
                node = masks[uid]
                registry._seal(
                    masks, uid, {k: v for k, v in node.metadata.items() if k != SEALED}, strict=True
                )
        report.problems.remove(problem)
        report.repaired.append(problem)
