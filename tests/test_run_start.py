"""A run start costs one request when nothing changed, and sees every change.

Real tiled (embedded and a loopback server); requests are counted with an
httpx event hook on the registry's own client. Changes are made through a
second registry on the same store, as another process or person would.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import SHAPE_500K, ones, random_mask

from bluesky_callbacks import MaskProvenance, _provenance
from chx_masks import MaskExistsError, MaskRegistry
from chx_masks._records import PackedMasks

DET = "eiger500K_single_image"
RUN_MD = {"plan_name": "count", "detectors": ["eiger500K_single"]}


def second_client(registry: MaskRegistry, request: pytest.FixtureRequest) -> MaskRegistry:
    """Another registry on the same store: another client, as another process has."""
    if registry.location.startswith("http"):
        server = request.getfixturevalue("tiled_server")
        return MaskRegistry.from_uri(registry.location, api_key=server.api_key)
    return MaskRegistry.embedded(registry.location)


def count_requests(registry: MaskRegistry) -> list[str]:
    seen: list[str] = []
    hooks = registry._root.context.http_client.event_hooks
    hooks["request"] = [*hooks["request"], lambda r: seen.append(f"{r.method} {r.url.path}")]
    return seen


def recorded(provenance: MaskProvenance) -> dict:
    return provenance.start_metadata(RUN_MD)["masks"][DET]


def test_every_change_is_logged_with_the_next_number(registry):
    assert registry.last_change() is None
    uid = registry.register_mask(DET, "gaps", ones())  # the detector, then the slot
    assert registry.last_change() == 1
    registry.update_mask(DET, "gaps", random_mask(seed=1))
    registry.activate(DET, ["gaps"])
    registry.register_detector("pilatus_image", (10, 12))
    registry.deactivate(DET)
    registry.register_mask(DET, "stop", random_mask(seed=2))
    registry.activate(DET, ["stop"])
    registry.delete_mask(DET, "gaps")
    assert registry.last_change() == 8
    assert registry.changed_since(7) is True
    assert registry.changed_since(8) is False
    log = registry._root["changes"]
    keys = [md["key"] for md in (log[str(n)].metadata for n in range(9))]
    assert keys == [
        "detectors",
        "gaps@0",
        "gaps@1",
        "active/0",
        "detectors",
        "active/1",
        "stop@0",
        "active/2",
        "gaps@2",
    ]
    # Refused calls log nothing.
    with pytest.raises(MaskExistsError):
        registry.register_mask(DET, "stop", ones())
    assert registry.last_change() == 8
    assert registry.describe(uid).version == 0


def test_warm_run_start_is_one_request_and_sees_changes_of_others(registry, request):
    registry.register_mask(DET, "gaps", random_mask(seed=1))
    registry.register_mask(DET, "stop", random_mask(seed=2))
    provenance = MaskProvenance(registry, masks={DET: ["gaps", "stop"]}, on_unavailable="record")
    first = recorded(provenance)
    seen = count_requests(registry)
    assert recorded(provenance) == first
    assert len(seen) == 1, seen

    other = second_client(registry, request)
    try:
        new = other.update_mask(DET, "stop", random_mask(seed=3))
        after_update = recorded(provenance)
        assert after_update["uids"] == [first["uids"][0], new]
        assert after_update["versions"] == [0, 1]

        other.activate(DET, ["gaps"])
        active = recorded(provenance)
        assert active["names"] == ["gaps"] and active["chosen_by"] == "active set v0"

        other.deactivate(DET)
        assert recorded(provenance)["chosen_by"] == "configuration"

        other.delete_mask(DET, "gaps")
        gone = recorded(provenance)
        assert gone["uids"] == [] and "gaps" in gone["error"]
    finally:
        other.close()


def test_an_unlogged_change_is_seen_once_the_answer_is_no_longer_trusted(
    registry, request, monkeypatch
):
    """A writer that died between storing a change and logging it."""
    registry.register_mask(DET, "gaps", random_mask(seed=1))
    provenance = MaskProvenance(registry, masks={DET: ["gaps"]})
    first = recorded(provenance)
    other = second_client(registry, request)
    try:
        # The change is stored but its log entry is not, as after a crash.
        monkeypatch.setattr(MaskRegistry, "_record_change", lambda *a, **k: None)
        new = other.update_mask(DET, "gaps", random_mask(seed=4))
        monkeypatch.undo()
    finally:
        other.close()
    assert recorded(provenance) == first  # trusted: nothing logged since
    monkeypatch.setattr(_provenance, "TRUST_UNCHANGED_S", 0.0)
    assert recorded(provenance)["uids"] == [new]


def test_concurrent_writers_log_consecutive_numbers(registry, request):
    """Four clients registering at once: every change logged once, no gaps."""
    registry.register_detector(DET, SHAPE_500K)
    start = registry.last_change()
    clients = [second_client(registry, request) for _ in range(4)]
    barrier = threading.Barrier(len(clients))
    errors: list[BaseException] = []

    def write(i: int, reg: MaskRegistry) -> None:
        try:
            barrier.wait(timeout=60)
            for round_ in range(3):
                reg.register_mask(DET, f"m{i}_{round_}", random_mask(seed=10 * i + round_))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for c in clients:
        c.close()
    assert not errors, errors
    assert registry.last_change() == start + 12
    log = registry._root["changes"]
    keys = sorted(log[str(n)].metadata["key"] for n in range(start + 1, start + 13))
    assert keys == sorted(f"m{i}_{r}@0" for i in range(4) for r in range(3))


def test_components_are_kept_packed_and_read_back_equal(registry):
    a, b = random_mask(seed=5), random_mask(seed=6)
    ua = registry.register_mask(DET, "a", a)
    ub = registry.register_mask(DET, "b", b)
    composite = registry.resolve_composite(DET, ["a", "b"])
    assert isinstance(composite.components, PackedMasks)
    assert [bool((c == m).all()) for c, m in zip(composite.components, (a, b), strict=True)] == [
        True,
        True,
    ]
    assert np.array_equal(composite.mask, a & b)
    assert not composite.components[0].flags.writeable
    held = sum(registry._arrays[u].nbytes for u in (ua, ub))
    assert held <= 2 * (a.size // 8 + 1)
    rows = {c.name: c.masked_pixels for c in composite.explain().components}
    assert rows == {"a": int((~a).sum()), "b": int((~b).sum())}
