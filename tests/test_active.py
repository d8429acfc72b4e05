"""Active sets: which masks apply to a detector, stored in the registry with history."""

from __future__ import annotations

import threading
import time

import pytest
from bluesky.plans import count
from helpers import EIGER500K, ones, random_mask

from bluesky_callbacks import MaskProvenance
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import ActiveSet, MaskNotFoundError, MaskValidationError


def _seed(registry):
    registry.register_mask(EIGER500K, "gaps", random_mask(seed=1))
    registry.register_mask(EIGER500K, "hot", random_mask(seed=2))
    registry.register_mask(EIGER500K, "beamstop", random_mask(seed=3))


def test_activate_records_versions_with_history_and_time_travel(registry):
    _seed(registry)
    assert registry.active_set(EIGER500K) is None
    assert registry.active_sets() == {}
    first = registry.activate(EIGER500K, ["gaps", "hot"], note="sample A")
    time.sleep(0.01)
    between = first.at
    second = registry.activate(EIGER500K, ["gaps", "beamstop"], note="sample B")
    assert isinstance(first, ActiveSet)
    assert (first.version, second.version) == (0, 1)
    assert first.at.tzinfo is not None and second.at > first.at
    current = registry.active_set(EIGER500K)
    assert current == second
    assert current.names == ("gaps", "beamstop") and current.note == "sample B"
    assert registry.active_set(EIGER500K, as_of=between) == first
    assert registry.active_set(EIGER500K, as_of="2000-01-01T00:00+00:00") is None
    assert [s.names for s in registry.active_history(EIGER500K)] == [
        ("gaps", "hot"),
        ("gaps", "beamstop"),
    ]
    assert registry.active_sets() == {EIGER500K: second}
    cleared = registry.deactivate(EIGER500K)
    assert cleared.names == () and cleared.version == 2
    assert registry.active_set(EIGER500K).names == ()


@pytest.mark.parametrize(
    "names, error, fragment",
    [
        (["nope"], MaskNotFoundError, "nope"),
        ("gaps", MaskValidationError, "list of mask names"),
        (["gaps", "gaps"], MaskValidationError, "repeat"),
        (["bad/name"], MaskValidationError, "bad/name"),
    ],
)
def test_refused_activation_writes_nothing(registry, names, error, fragment):
    _seed(registry)
    registry.activate(EIGER500K, ["gaps"])
    with pytest.raises(error, match=fragment):
        registry.activate(EIGER500K, names)
    assert [s.names for s in registry.active_history(EIGER500K)] == [("gaps",)]


def test_retired_mask_cannot_be_activated(registry):
    _seed(registry)
    registry.delete_mask(EIGER500K, "hot")
    with pytest.raises(MaskNotFoundError, match="retired"):
        registry.activate(EIGER500K, ["gaps", "hot"])
    assert registry.active_history(EIGER500K) == []


def test_concurrent_activations_each_get_their_own_version(registry):
    _seed(registry)
    results, errors = [], []

    def activate(names):
        try:
            results.append(registry.activate(EIGER500K, names))
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [
        threading.Thread(target=activate, args=(names,))
        for names in (["gaps"], ["hot"], ["beamstop"], ["gaps", "hot"])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(s.version for s in results) == [0, 1, 2, 3]
    assert [s.version for s in registry.active_history(EIGER500K)] == [0, 1, 2, 3]


def test_the_current_active_set_is_the_latest_past_ten_versions(registry):
    """Version 10 and later: "10" sorts before "9" as text, never as the current set."""
    _seed(registry)
    for i in range(12):
        registry.activate(EIGER500K, ["gaps"] if i % 2 else ["hot"], note=f"set {i}")
    current = registry.active_set(EIGER500K)
    assert (current.version, current.note, current.names) == (11, "set 11", ("gaps",))
    assert registry.active_set(EIGER500K, as_of=current.at).version == 11


def _start_doc(RE, plan):
    starts = []
    token = RE.subscribe(lambda name, doc: starts.append(doc), "start")
    RE(plan)
    RE.unsubscribe(token)
    return starts[-1]


def test_preprocessor_reads_the_active_set_at_every_run(RE, embedded_dir):
    from chx_masks import MaskRegistry

    with MaskRegistry.embedded(embedded_dir) as reg:
        _seed(reg)
        det = sim_eiger500k()
        RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["gaps"]}))

        start = _start_doc(RE, count([det]))
        assert start["masks"][EIGER500K]["names"] == ["gaps"]
        assert start["masks"][EIGER500K]["chosen_by"] == "configuration"

        # Staff change the masks between samples; the next run follows.
        reg.activate(EIGER500K, ["gaps", "beamstop"], note="sample B")
        start = _start_doc(RE, count([det]))
        record = start["masks"][EIGER500K]
        assert record["names"] == ["gaps", "beamstop"]
        assert record["chosen_by"] == "active set v0"
        assert record["uids"] == [reg.get_mask_uid(EIGER500K, n) for n in ("gaps", "beamstop")]

        # The run's own metadata still wins over the active set.
        start = _start_doc(RE, count([det], md={"mask_names": {EIGER500K: ["hot"]}}))
        assert start["masks"][EIGER500K]["names"] == ["hot"]
        assert start["masks"][EIGER500K]["chosen_by"] == "run metadata"

        # An empty active set hands the choice back to the configuration.
        reg.deactivate(EIGER500K)
        start = _start_doc(RE, count([det]))
        assert start["masks"][EIGER500K]["chosen_by"] == "configuration"


def test_preprocessor_with_active_sets_only_and_active_false(RE, embedded_dir):
    from chx_masks import MaskRegistry

    with MaskRegistry.embedded(embedded_dir) as reg:
        _seed(reg)
        reg.activate(EIGER500K, ["hot"])
        det = sim_eiger500k()
        RE.preprocessors.append(MaskProvenance(reg))
        assert _start_doc(RE, count([det]))["masks"][EIGER500K]["names"] == ["hot"]
        RE.preprocessors.clear()
        RE.preprocessors.append(MaskProvenance(reg, masks={EIGER500K: ["gaps"]}, active=False))
        assert _start_doc(RE, count([det]))["masks"][EIGER500K]["names"] == ["gaps"]


def test_active_set_naming_a_mask_retired_later_follows_the_policy(RE, embedded_dir):
    from chx_masks import MaskRegistry

    with MaskRegistry.embedded(embedded_dir) as reg:
        _seed(reg)
        reg.activate(EIGER500K, ["gaps", "hot"])
        # delete_mask refuses this now; a registry written by an older
        # chx-masks (or by a plain tiled client) can still hold it, so write
        # the retirement slot as that writer did.
        slots = reg._slots(EIGER500K, ["hot"])["hot"]
        reg._claim(
            reg._detector_node(EIGER500K),
            EIGER500K,
            "hot",
            slots,
            kind="retired",
            uid=None,
            check=lambda slots: None,
        )
        det = sim_eiger500k()
        RE.preprocessors.append(MaskProvenance(reg, on_unavailable="record"))
        record = _start_doc(RE, count([det]))["masks"][EIGER500K]
        assert record["uids"] == [] and "retired" in record["error"]
        assert record["chosen_by"] == "active set v0"
        RE.preprocessors.clear()
        RE.preprocessors.append(MaskProvenance(reg, on_unavailable="raise"))
        with pytest.raises(MaskNotFoundError, match="not opened"):
            RE(count([det]))


def test_active_set_str_and_empty_registry(registry):
    registry.register_mask(EIGER500K, "all", ones())
    s = registry.activate(EIGER500K, ["all"], note="n")
    assert str(s).startswith(f"{EIGER500K}: all (active set v0, ")
