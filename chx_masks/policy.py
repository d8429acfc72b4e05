"""The server's side of an append-only registry: a tiled access policy and spec validators.

``chx-masks serve`` uses them by default, and ``deploy/tiled-config.yml`` names
them (``access_control`` and ``specs``), so a writer's key, used through any
client (``MaskRegistry``, a plain tiled client, raw HTTP), can only do what a
registration does:

- create new nodes: a new detector, a new mask node, the next slot of a
  lineage, the next active set, the next change-log entry;
- write a new mask node's array and seal it (``sealed: false`` -> ``true``),
  and delete a mask node that is not sealed (an interrupted or refused
  registration);
- never rewrite the metadata or the data of anything else in the registry,
  never delete any of it, never delete metadata revisions.

Only a key that holds the admin scope (``admin:apikeys``: tiled's admins) may
purge, and only what the registry's change log already records as purged
(``MaskRegistry.purge`` / ``chx-masks purge`` write the record, then delete):
such a key may delete a sealed mask node whose uid a change-log entry names
under ``purged``, and otherwise has a writer's rights in the registry. A
single-key server has no admin.

Nodes outside the registry (Bluesky runs written with TiledWriter, processed
products) keep every scope the key has.

The sequence of a registration (``MaskRegistry._write_version``) and what a
crash at each step leaves:

1. create ``masks/<uid>`` with ``sealed: false`` -- an orphan, never visible
   (no slot names it); ``chx-masks verify --repair`` removes it;
2. write its array -- the same;
3. claim the slot ``detectors/<det>/<name>@<version>`` naming the uid and the
   hash of its record -- the version is complete and served (bytes and record
   are verified on every read); ``chx-masks verify`` reports it unsealed and
   ``--repair`` seals it;
4. seal the mask node: from now on nothing may change it.

The validators check, on the server, each new record against the registry:
a slot must be the next version of its lineage, later than the one before,
and name a mask node of the same detector and name whose record hashes to
what the slot says. tiled hands a validator neither the new node's key nor its
parent; the policy keeps the node whose scopes it last checked for the
request (the parent, for a creation) in a context variable for them.

Examples
--------
In a tiled configuration file::

    access_control:
      access_policy: chx_masks.policy:AppendOnlyPolicy
      args: {}
    specs:
      - spec: chx_mask
        validator: chx_masks.policy:validate_mask
      - spec: chx_mask_slot
        validator: chx_masks.policy:validate_slot
      - spec: chx_mask_active_set
        validator: chx_masks.policy:validate_active_set
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NoReturn, TypeGuard

from tiled.access_control.protocols import AccessPolicy, normalize_access_tags
from tiled.validation_registration import ValidationRegistry

from ._content import ADMIN_SCOPE, SEALED, record_sha256

__all__ = [
    "ADMIN_SCOPE",
    "VALIDATORS",
    "AppendOnlyPolicy",
    "validate_active_set",
    "validate_mask",
    "validate_slot",
    "validation_registry",
]

logger = logging.getLogger(__name__)

MASK_SPEC = "chx_mask"
SLOT_SPEC = "chx_mask_slot"
ACTIVE_SPEC = "chx_mask_active_set"
CHANGE_SPEC = "chx_mask_change"
LEGACY_SPEC = "mask"
CHANGES = "changes"
RECORD_SPECS = frozenset({MASK_SPEC, SLOT_SPEC, ACTIVE_SPEC, CHANGE_SPEC, LEGACY_SPEC})
READ_SCOPES = frozenset({"read:metadata", "read:data"})
CONTAINER_SCOPES = READ_SCOPES | {"create:node", "write:metadata"}
# The top-level containers of a registry (masks, detectors, active, changes)
# hold exactly this metadata key.
MARKER = "chx_masks"

# The node whose scopes were checked last in this request: for a creation,
# the parent the new node goes into (tiled checks it, then validates).
_CHECKED: contextvars.ContextVar[Any] = contextvars.ContextVar("chx_masks_checked")


class AppendOnlyPolicy(AccessPolicy):
    """Writers append to the registry; nothing registered is rewritten or deleted.

    Parameters
    ----------
    admin_scope : str
        A key with this scope may delete a sealed mask node that the
        registry's change log records as purged (and, outside the registry,
        anything its other scopes allow).

    Examples
    --------
    >>> policy = AppendOnlyPolicy()
    >>> policy.admin_scope
    'admin:apikeys'
    """

    def __init__(self, *, admin_scope: str = ADMIN_SCOPE) -> None:
        self.admin_scope = admin_scope
        # Whether a node id is a registry container (ids are never reused
        # for a live node, and a registry container is never re-marked).
        self._registry_ids: dict[int, bool] = {}

    async def init_node(
        self,
        principal: Any,
        authn_access_tags: Any,
        authn_scopes: Any,
        access_tags: Any = None,
    ) -> tuple[bool, Any]:
        return (False, access_tags or normalize_access_tags())

    async def filters(
        self,
        node: Any,
        principal: Any,
        authn_access_tags: Any,
        authn_scopes: Any,
        scopes: Any,
    ) -> list[Any]:
        return []  # everyone with read:metadata sees everything

    async def allowed_scopes(
        self, node: Any, principal: Any, authn_access_tags: Any, authn_scopes: Any
    ) -> frozenset[str]:
        _CHECKED.set(node)
        granted = frozenset(authn_scopes)
        kind = await self.kind(node)
        if kind is None or kind == "open":
            return granted
        if kind == "container":
            return granted & CONTAINER_SCOPES
        if self.admin_scope in granted and await _purge_recorded(node):
            return granted & (READ_SCOPES | {"delete:node", "delete:revision"})
        return granted & READ_SCOPES

    async def modify_node(
        self,
        node: Any,
        principal: Any,
        authn_access_tags: Any,
        authn_scopes: Any,
        access_tags: Any,
    ) -> tuple[bool, Any]:
        # tiled asks this before every metadata rewrite (PATCH and PUT).
        kind = await self.kind(node)
        if kind in ("sealed", "container"):
            raise ValueError(
                f"{_describe(node)} is part of the mask registry, which is "
                "append-only: its metadata is never rewritten. Register a new "
                "version instead (update_mask / `chx-masks update`)."
            )
        return (False, access_tags if access_tags is not None else node.access_tags)

    async def kind(self, node: Any) -> str | None:
        """What ``node`` is to the registry.

        ``"sealed"`` (a record: read only), ``"open"`` (a mask node being
        registered), ``"container"`` (a registry container: new children
        only) or None (not part of a registry).
        """
        specs = {getattr(s, "name", s) for s in (getattr(node, "specs", None) or ())}
        if specs & RECORD_SPECS:
            if MASK_SPEC in specs and _metadata(node).get(SEALED) is False:
                return "open"
            return "sealed"
        if _is_marker(_metadata(node)):
            return "container"
        parent = getattr(getattr(node, "node", None), "parent", None)
        if parent is None:
            return None
        if parent not in self._registry_ids:
            metadata = await _parent_metadata(node, parent)
            self._registry_ids[parent] = metadata is not None and _is_marker(metadata)
        # Detector and active-set containers (and anything else put in a
        # registry container) are containers of the registry.
        return "container" if self._registry_ids[parent] else None


def _metadata(node: Any) -> Mapping[str, Any]:
    metadata = getattr(node, "metadata", None)
    metadata = metadata() if callable(metadata) else metadata
    return metadata if isinstance(metadata, Mapping) else {}


def _is_marker(metadata: Mapping[str, Any]) -> bool:
    return set(metadata) == {MARKER}


def _describe(node: Any) -> str:
    key = getattr(getattr(node, "node", None), "key", None)
    return f"The node {key!r}" if key else "This node"


async def _parent_metadata(node: Any, parent: int) -> Mapping[str, Any] | None:
    from sqlalchemy import select
    from tiled.catalog import orm

    async with node.context.session() as db:
        return (await db.execute(select(orm.Node.metadata_).where(orm.Node.id == parent))).scalar()


async def _children(parent: Any, key_prefix: str | None = None) -> list[tuple[str, Any]]:
    """(key, metadata) of ``parent``'s children, optionally with keys starting so."""
    from sqlalchemy import select
    from tiled.catalog import orm

    statement = select(orm.Node.key, orm.Node.metadata_).where(orm.Node.parent == parent.node.id)
    if key_prefix is not None:
        escaped = key_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        statement = statement.where(orm.Node.key.like(escaped + "%", escape="\\"))
    async with parent.context.session() as db:
        return [(k, md) for k, md in (await db.execute(statement)).all()]


async def _purge_recorded(node: Any) -> bool:
    """Whether ``node`` is a mask node whose uid the registry's change log lists as purged.

    The change log is ``changes``, beside the ``masks`` container that holds
    the node.
    """
    from sqlalchemy import select
    from sqlalchemy.orm import aliased
    from tiled.catalog import orm

    specs = {getattr(s, "name", s) for s in (getattr(node, "specs", None) or ())}
    row = getattr(node, "node", None)
    uid = _metadata(node).get("uid")
    if MASK_SPEC not in specs or row is None or row.parent is None or not isinstance(uid, str):
        return False
    masks, changes, entry = aliased(orm.Node), aliased(orm.Node), aliased(orm.Node)
    statement = (
        select(entry.id)
        .join(changes, entry.parent == changes.id)
        .join(masks, masks.parent == changes.parent)
        .where(masks.id == row.parent, changes.key == CHANGES)
        .where(entry.metadata_["purged"].as_string() == uid)
        .limit(1)
    )
    async with node.context.session() as db:
        return (await db.execute(statement)).first() is not None


async def _node_by_key(context: Any, key: str) -> tuple[Any, Any] | None:
    """(metadata, specs) of the node with this key (a uid: unique)."""
    from sqlalchemy import select
    from tiled.catalog import orm

    async with context.session() as db:
        rows = (
            await db.execute(
                select(orm.Node.metadata_, orm.Node.specs).where(orm.Node.key == key).limit(2)
            )
        ).all()
    return tuple(rows[0]) if len(rows) == 1 else None


# ---------------------------------------------------------------- validators


def _require(condition: bool, message: str) -> None:
    if not condition:
        _refuse(message)


def _refuse(message: str) -> NoReturn:
    # 403, as for every other write the registry refuses (tiled answers a
    # ValidationError with 400).
    from fastapi import HTTPException

    raise HTTPException(status_code=403, detail=f"Refused by the mask registry: {message}.")


def _not_taken(version: Any, expected: int, what: str) -> None:
    """A version another writer claimed first: 409, as tiled answers an existing key.

    The registry re-reads and claims the next one; only a version that skips
    ahead (or any other bad claim) is refused with 403.
    """
    if _is_int(version) and version < expected:
        from fastapi import HTTPException

        raise HTTPException(status_code=409, detail=f"{what} v{version} is taken.")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _time(value: Any, what: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        _refuse(f"{what} must be an ISO 8601 time, not {value!r}")
        raise


def _parent() -> Any:
    parent = _CHECKED.get(None)
    _require(
        parent is not None and hasattr(parent, "node"),
        "a registry record must be created inside the registry",
    )
    return parent


async def validate_mask(
    spec: Any, metadata: dict, entry: Any, structure_family: Any, structure: Any
) -> None:
    """A mask node starts unsealed; sealing is its one and only change."""
    if entry is None:
        _require(
            str(structure_family) in ("array", "StructureFamily.array"),
            "a chx_mask node is an array",
        )
        for key in ("uid", "detector", "name", "sha256", "shape", "masked_pixels", "created_at"):
            _require(key in metadata, f"a chx_mask node needs {key!r} in its metadata")
        _require(
            metadata.get(SEALED) is False,
            "a new chx_mask node starts with sealed: false; it is sealed once its array is written",
        )
        parent = _parent()
        _require(
            _is_marker(_metadata(parent)), "a chx_mask node goes in the registry's masks container"
        )
        return None
    before = dict(_metadata(entry))
    _require(before.get(SEALED) is False, "a sealed chx_mask node never changes")
    _require(
        metadata.get(SEALED) is True and record_sha256(metadata) == record_sha256(before),
        "the only change to a chx_mask node is sealing it (sealed: true)",
    )
    return None


async def validate_slot(
    spec: Any, metadata: dict, entry: Any, structure_family: Any, structure: Any
) -> None:
    """A slot is the next version of its lineage and names a matching mask record."""
    _require(entry is None, "a slot never changes")
    parent = _parent()
    detector = getattr(parent.node, "key", None)
    name, version, kind = metadata.get("name"), metadata.get("version"), metadata.get("kind")
    _require("shape" in _metadata(parent), "a slot goes in a detector's container")
    _require(
        metadata.get("detector") == detector,
        f"a slot in detectors/{detector} must say detector: {detector!r}",
    )
    _require(isinstance(name, str) and name != "", "a slot needs its lineage's name")
    if not (_is_int(version) and version >= 0):
        _refuse("a slot's version is an integer >= 0")
    _require(kind in ("mask", "retired"), "a slot's kind is 'mask' or 'retired'")
    at = _time(metadata.get("at"), "a slot's 'at'")
    before = [
        md
        for key, md in await _children(parent, f"{name}@")
        if isinstance(md, Mapping)
        and md.get("name") == name
        and key == f"{name}@{md.get('version')}"
    ]
    last = max(before, key=lambda md: md["version"]) if before else None
    expected = last["version"] + 1 if last else 0
    _not_taken(version, expected, f"{detector}/{name}")
    _require(
        last is None or _time(last.get("at"), "at") < at,
        f"{detector}/{name} v{version} must start after v{expected - 1}",
    )
    if kind == "retired":
        _require(metadata.get("uid") is None, "a retired slot names no uid")
        _require(
            last is not None and last.get("kind") == "mask",
            f"{detector}/{name} has no registered lineage to retire",
        )
        _require(version == expected, f"the next version of {detector}/{name} is {expected}")
        return None
    uid = metadata.get("uid")
    if not isinstance(uid, str):
        _refuse("a mask slot names its mask's uid")
    found = await _node_by_key(parent.context, uid)
    if found is None:
        _refuse(f"no mask node {uid!r} to claim")
    record, specs = found
    names = {s.get("name") if isinstance(s, Mapping) else s for s in specs or ()}
    _require(
        MASK_SPEC in names
        and isinstance(record, Mapping)
        and record.get("uid") == uid
        and record.get("detector") == detector
        and record.get("name") == name,
        f"{uid} is not a mask node of {detector}/{name}",
    )
    _require(
        metadata.get("record_sha256") == record_sha256(record),
        f"the slot's record_sha256 does not match mask node {uid}",
    )
    gap_allowed = "adopted_from" in record  # legacy numbers are kept as they were
    _require(
        version == expected or (gap_allowed and version > expected),
        f"the next version of {detector}/{name} is {expected}, not {version}",
    )
    return None


async def validate_active_set(
    spec: Any, metadata: dict, entry: Any, structure_family: Any, structure: Any
) -> None:
    """An active set is the detector's next one, later than the one before."""
    _require(entry is None, "an active set never changes")
    parent = _parent()
    detector = getattr(parent.node, "key", None)
    _require(
        metadata.get("detector") == detector,
        f"an active set in active/{detector} must say detector: {detector!r}",
    )
    version, names = metadata.get("version"), metadata.get("names")
    if not (_is_int(version) and version >= 0):
        _refuse("an active set's version is an integer >= 0")
    _require(
        isinstance(names, list)
        and all(isinstance(n, str) for n in names)
        and len(set(names)) == len(names),
        "names is a list of distinct mask names",
    )
    _require(
        metadata.get("note") is None or isinstance(metadata.get("note"), str),
        "note is text or null",
    )
    at = _time(metadata.get("at"), "an active set's 'at'")
    before = [
        md
        for key, md in await _children(parent)
        if isinstance(md, Mapping) and key == str(md.get("version"))
    ]
    last = max(before, key=lambda md: md["version"]) if before else None
    expected = last["version"] + 1 if last else 0
    _not_taken(version, expected, f"the active set of {detector}")
    _require(version == expected, f"the next active set of {detector} is {expected}")
    _require(
        last is None or _time(last.get("at"), "at") < at,
        f"active set {version} of {detector} must start after {expected - 1}",
    )
    return None


# Spec -> validator, as a tiled configuration file names them.
VALIDATORS = {
    MASK_SPEC: "chx_masks.policy:validate_mask",
    SLOT_SPEC: "chx_masks.policy:validate_slot",
    ACTIVE_SPEC: "chx_masks.policy:validate_active_set",
}


def validation_registry() -> ValidationRegistry:
    """tiled's default validators plus the registry's (for ``build_app``)."""
    import copy

    from tiled.structures.core import Spec
    from tiled.validation_registration import default_validation_registry

    registry = copy.deepcopy(default_validation_registry)
    registry.register(Spec(MASK_SPEC), validate_mask)
    registry.register(Spec(SLOT_SPEC), validate_slot)
    registry.register(Spec(ACTIVE_SPEC), validate_active_set)
    return registry
