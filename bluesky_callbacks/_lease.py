"""A product's one writer at a time: the lease in its metadata, taken, renewed, taken over.

Used by :func:`._products.write_product`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from chx_masks.stores import http_status as _status

from ._plan import ProcessingPlan
from ._stores import ProcessingError

# The processing log, as before this module was split from ._process.
logger = logging.getLogger("bluesky_callbacks._process")

_SPEC = "chx-masks-processed"
_COMPLETE = "complete"
_WRITING = "writing"
#: Seconds a product's writer holds it without renewing (see write_product).
LEASE_S = 60.0


def _existing(container: Any, run_uid: str) -> Any | None:
    try:
        return container[run_uid]
    except KeyError:
        return None


def _now() -> datetime:
    return datetime.now(timezone.utc)


class LeaseLostError(ProcessingError):
    """Another caller took over a product this one was writing (its lease had expired)."""


@dataclass
class _Lease:
    """One writer's hold on a product: the product node, its term, when it runs out.

    Term 0 is the creation of the product node (tiled refuses a second
    creator with 409); term k > 0 is the creation of the product's child
    ``lease-<k>``, which only the first of several callers that found the
    lease expired gets. So a writer still holds the product exactly while
    ``lease-<term + 1>`` does not exist; the expiry in the product's
    metadata, renewed while writing, tells others when to take over.
    """

    product: Any
    term: int
    owner: str
    seconds: float
    renewed: float = field(default_factory=time.monotonic)

    def record(self) -> dict[str, Any]:
        from chx_masks.stores import local_user as _local_user

        return {
            "owner": self.owner,
            "by": f"{_local_user()} pid {os.getpid()}",
            "term": self.term,
            "expires": (_now() + timedelta(seconds=self.seconds)).isoformat(),
        }

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if another caller has taken the product over."""
        try:
            self.product[f"lease-{self.term + 1}"]
        except KeyError:
            return
        raise LeaseLostError(
            f"Another caller took over the product of run "
            f"{self.product.metadata['parent_uid']} after this one's lease ran out "
            f"({self.seconds:g} s without renewal): it completes the product; this one stops."
        )

    def release(self) -> None:
        """Let the next caller take over at once (this one failed); best effort."""
        try:
            self.check()
            record = {**self.record(), "expires": _now().isoformat()}
            self.product.update_metadata({"lease": record}, drop_revision=True)
        except Exception:
            logger.debug("Could not release the lease on %s", self.product, exc_info=True)

    def renew(self, *, force: bool = False) -> None:
        """Check the hold and push the expiry on, at most every third of the lease."""
        if not force and time.monotonic() - self.renewed < self.seconds / 3:
            return
        self.check()
        self.product.update_metadata({"lease": self.record()}, drop_revision=True)
        self.renewed = time.monotonic()


def _lease_product(
    container: Any,
    plan: ProcessingPlan,
    metadata: dict[str, Any],
    lease_s: float,
    wait: float | None,
) -> tuple[_Lease | None, Any]:
    """Hold the run's product for writing, or return the finished one.

    Returns ``(lease, product)``; ``lease`` is None when ``product`` is a
    finished product made earlier (or meanwhile, by the writer waited for).
    """
    from tiled.structures.core import Spec

    owner = str(uuid.uuid4())
    began = time.monotonic()
    announced = False
    while True:
        node = _existing(container, plan.run_uid)
        if node is None:
            lease = _Lease(None, 0, owner, lease_s)
            try:
                node = container.create_container(
                    key=plan.run_uid,
                    metadata={**metadata, "lease": lease.record()},
                    specs=[Spec(_SPEC)],
                )
            except Exception as err:
                if _status(err) != 409:
                    raise
                continue  # created by another caller a moment ago: look again
            lease.product = node
            return lease, node
        md = node.metadata
        if md.get("status") == _COMPLETE:
            return None, node
        held = md.get("lease") or {}
        expires = _parse_time(held.get("expires"))
        if expires is not None and _now() < expires:
            waited = time.monotonic() - began
            if wait is not None and waited >= wait:
                raise ProcessingError(
                    f"The product of run {plan.run_uid} is being written by "
                    f"{held.get('by', 'another caller')} (lease until {held['expires']}); "
                    f"waited {waited:.0f} s. Run again later to get its product, or wait "
                    "longer (wait=None waits for it).",
                    cli=f"The product of run {plan.run_uid} is being written by "
                    f"{held.get('by', 'another caller')} (lease until {held['expires']}). "
                    "Run the command again later to get its product.",
                )
            if not announced:
                announced = True
                logger.warning(
                    "Waiting for the product of run %s: %s is writing it (lease until %s).",
                    plan.run_uid,
                    held.get("by", "another caller"),
                    held["expires"],
                )
            pause = min(1.0, max(0.05, (expires - _now()).total_seconds()))
            if wait is not None:
                pause = min(pause, max(0.05, wait - waited))
            time.sleep(pause)
            continue
        # Written by a caller that stopped renewing (it crashed, or the
        # product predates leases): the first to claim the next term goes on
        # with it; the others wait for that one.
        term = int(held.get("term", 0)) + 1
        try:
            node.create_container(key=f"lease-{term}", metadata={"owner": owner})
        except Exception as err:
            if _status(err) != 409:
                raise
            time.sleep(0.2)
            continue
        lease = _Lease(node, term, owner, lease_s)
        node.update_metadata({**metadata, "lease": lease.record()})
        return lease, node


def _parse_time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except (TypeError, ValueError):
        return None
