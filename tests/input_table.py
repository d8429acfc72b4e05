"""Malformed and edge-case input, one table for every registry: refused cleanly, or kept.

Each case is one public call with one odd argument. Shared by the embedded
registry's tests (tests/test_refusals.py) and the server tests on SQLite and
PostgreSQL (tests/test_server.py), which hold every case to the same rule:
the call raises a ``ChxMasksError`` subclass and writes nothing, or it
succeeds and what it stored reads back equal.
"""

from __future__ import annotations

import datetime
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from metadata_cases import KEPT, REFUSED, nested

from chx_masks import ChxMasksError, MaskRegistry


@dataclass(frozen=True)
class Case:
    label: str
    call: Callable[[MaskRegistry], Any]
    # Stored by the call when it succeeds: read back and compared.
    metadata: dict[str, Any] | None = None
    # A call that may write: the registry is counted before and after it
    # (lookups have no write path to check).
    writes: bool = True


_MORE_METADATA: list[tuple[str, Any]] = [
    ("not a dict", ["a", "b"]),
    ("a string", "sample=silica"),
    ("int key", {1: "x"}),
    ("bool value", {"ok": False}),
    ("empty dict", {}),
    ("empty key", {"": 1}),
    ("dotted key", {"sample.name": "x"}),
    ("reserved uid", {"uid": "mine"}),
    ("reserved sealed", {"sealed": False}),
    ("numpy int", {"n": np.int64(7)}),
    ("numpy float", {"x": np.float32(0.5)}),
    ("numpy array", {"a": np.arange(3)}),
    ("datetime", {"t": datetime.datetime(2026, 12, 1)}),
    ("nested 300 in a dict", {"a": {"b": nested(300)}}),
    ("1e18 float", {"flux": 1e18}),
    ("2**53 + 1", {"n": 2**53 + 1}),
    ("surrogate pair joined", {"s": "\U0001f600"}),
    ("NFD text", {"s": "e\u0301"}),
]

_AS_OF: list[Any] = [
    "yesterday",
    "2026-13-45",
    "2026-11-25 25:00",
    "",
    "now",
    1e20,
    -1e20,
    2**70,
    float("nan"),
    float("inf"),
    True,
    [],
    {},
    b"2026-01-01",
    datetime.datetime(1, 1, 1),
    "0001-01-01T00:00:00",
    "10000-01-01T00:00:00",
    datetime.date(2026, 1, 1),
    1_700_000_000,
    "2026-11-25T10:00:00+25:00",
]

_SEARCH: list[tuple[str, Any]] = [
    ("nested dict", {"sample": {"name": "x"}}),
    ("huge int", {"n": 2**70}),
    ("huge float", {"flux": 1e300}),
    ("NUL", {"note": "a\x00"}),
    ("lone surrogate", {"note": "\udc80"}),
    ("list value", {"tags": ["a", "b"]}),
    ("set value", {"tags": {"a"}}),
    ("bytes value", {"note": b"x"}),
    ("nan", {"x": float("nan")}),
    ("int key", {1: "x"}),
    ("not a dict", ["sample", "x"]),
    ("empty key", {"": "x"}),
]

_NAMES: list[Any] = [
    "",
    "a/b",
    "a?b",
    "a#b",
    "a%b",
    "a\\b",
    "x" * 201,
    "tab\tname",
    "nul\x00name",
    ".",
    "..",
    5,
    None,
    ["base"],
    "\udc80",
]

_UIDS: list[Any] = [
    "",
    "xyz",
    5,
    None,
    "1234567",
    str(uuid.uuid4()),
    "../masks",
    "zzzzzzzz-zzzz",
    ["a"],
]


def cases(detector: str, base: str, shape: tuple[int, int]) -> list[Case]:
    """Every case, for a registry where ``detector``/``base`` is registered."""
    counter = itertools.count()
    run_id = uuid.uuid4().hex[:6]  # names of this run only, on a registry used before
    rng = np.random.default_rng(5)

    def fresh() -> np.ndarray:
        return rng.random(shape) >= 0.1

    table: list[Case] = []
    metadata = (
        [(label, md) for label, md in KEPT]
        + [(label, md) for label, md, _ in REFUSED]
        + _MORE_METADATA
    )
    for label, md in metadata:
        kept = md if isinstance(md, dict) else None
        table.append(
            Case(
                f"register_mask metadata: {label}",
                lambda reg, md=md: reg.register_mask(
                    detector, f"t{run_id}-{next(counter)}", fresh(), metadata=md
                ),
                kept,
            )
        )
        table.append(
            Case(
                f"update_mask metadata: {label}",
                lambda reg, md=md: reg.update_mask(detector, base, fresh(), metadata=md),
                kept,
            )
        )
        table.append(
            Case(
                f"register_detector metadata: {label}",
                lambda reg, md=md: reg.register_detector(
                    f"det{run_id}-{next(counter)}", (4, 5), metadata=md
                ),
                kept,
            )
        )
    for as_of in _AS_OF:
        for lookup in ("get_mask", "get_mask_uid", "resolve_composite", "active_set"):
            names: Any = [base] if lookup == "resolve_composite" else base
            table.append(
                Case(
                    f"{lookup} as_of={as_of!r}",
                    (
                        lambda reg, lookup=lookup, names=names, as_of=as_of: (
                            getattr(reg, lookup)(detector, as_of=as_of)
                            if lookup == "active_set"
                            else getattr(reg, lookup)(detector, names, as_of=as_of)
                        )
                    ),
                    writes=False,
                )
            )
    for label, query in _SEARCH:
        table.append(
            Case(
                f"search metadata: {label}",
                lambda reg, query=query: reg.search(metadata=query),
                writes=False,
            )
        )
    for name in _NAMES:
        table += [
            Case(
                f"register_mask name={name!r}",
                lambda reg, name=name: reg.register_mask(detector, name, fresh()),
            ),
            Case(
                f"update_mask name={name!r}",
                lambda reg, name=name: reg.update_mask(detector, name, fresh()),
            ),
            Case(
                f"delete_mask name={name!r}", lambda reg, name=name: reg.delete_mask(detector, name)
            ),
            Case(
                f"history name={name!r}",
                lambda reg, name=name: reg.history(detector, name),
                writes=False,
            ),
            Case(
                f"activate names=[{name!r}]", lambda reg, name=name: reg.activate(detector, [name])
            ),
            Case(f"detector={name!r}", lambda reg, name=name: reg.get_masks(name), writes=False),
        ]
    for uid in _UIDS:
        table += [
            Case(
                f"get_mask_by_uid({uid!r})",
                lambda reg, uid=uid: reg.get_mask_by_uid(uid),
                writes=False,
            ),
            Case(f"describe({uid!r})", lambda reg, uid=uid: reg.describe(uid), writes=False),
            Case(
                f"composite_from_uids([{uid!r}])",
                lambda reg, uid=uid: reg.composite_from_uids([uid]),
                writes=False,
            ),
        ]
    for label, shape_ in (
        ("shape 0", (0, 5)),
        ("shape 1-D", (5,)),
        ("shape floats", (4.0, 5)),
        ("shape negative", (-1, 5)),
        ("shape bools", (True, True)),
        ("shape string", "4x5"),
        ("shape 3-D", (2, 3, 4)),
    ):
        table.append(
            Case(
                f"register_detector {label}",
                lambda reg, s=shape_: reg.register_detector(f"det{run_id}-{next(counter)}", s),
            )
        )
    return table


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return _plain(value.tolist())
    return value


def snapshot(registry: MaskRegistry) -> tuple[int, ...]:
    """How many mask nodes, detectors and logged changes the registry holds.

    The registry only ever adds nodes, and logs every change it makes: a
    count that changed is a write. Each count looks its container up afresh:
    a tiled client keeps ``len()`` for a second
    (``tiled.client.container.LENGTH_CACHE_TTL``), so a container kept from
    an earlier look-up would report a count from before the last case.
    """
    counts = []
    for key in ("masks", "detectors", "changes"):
        try:
            counts.append(len(registry._root[key]))
        except KeyError:
            counts.append(0)
    return tuple(counts)


def run(
    registry: MaskRegistry, detector: str, base: str, shape: tuple[int, int]
) -> tuple[dict[str, int], list[str]]:
    """Every case on ``registry``: (outcome counts, what broke the rule)."""
    counts = {"refused": 0, "kept": 0, "answered": 0}
    problems: list[str] = []
    before = snapshot(registry)
    for case in cases(detector, base, shape):
        try:
            result = case.call(registry)
            if hasattr(result, "compute"):
                result.compute()
        except ChxMasksError:
            counts["refused"] += 1
            if case.writes and snapshot(registry) != before:
                problems.append(f"{case.label}: refused but wrote")
                before = snapshot(registry)
            continue
        except Exception as err:
            problems.append(f"{case.label}: {type(err).__name__}: {err}"[:300])
            before = snapshot(registry)
            continue
        if case.writes:
            before = snapshot(registry)  # the next case starts from here
        if case.metadata is None:
            counts["answered"] += 1
            continue
        counts["kept"] += 1
        if isinstance(result, str):
            back = dict(registry.describe(result).metadata)
        else:
            back = dict(result.metadata)
        if _plain(back) != _plain(case.metadata):
            problems.append(f"{case.label}: stored {case.metadata!r}, read back {back!r}")
    return counts, problems
