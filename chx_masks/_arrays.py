"""Mask arrays by uid: fetched and verified, kept in memory and on disk, ANDed.

The one :class:`_Arrays` a :class:`~chx_masks.MaskRegistry` holds (as
``_arrays``) serves its reads, lazy dask arrays and composites.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from cachetools import LRUCache

from ._content import mask_sha256, shape_str
from ._errors import MaskIntegrityError, MaskPermissionError, RegistryUnavailableError
from ._records import PackedMasks
from ._store import _Stored, logger

if TYPE_CHECKING:
    import dask.array


class _Source(Protocol):
    """What the arrays need of their registry: records, nodes, and its one way to read."""

    def _stored_for(self, uid: str) -> _Stored: ...

    def _prefetch(self, uids: Sequence[str]) -> None: ...

    def _mask_node(self, uid: str) -> Any | None: ...

    def _translate(self, action: str) -> AbstractContextManager[None]: ...

    def _read(self, uid: str) -> np.ndarray: ...


class _Arrays(Mapping[str, PackedMasks]):
    """The arrays a registry has read, as packed bits by uid (uids are immutable).

    Reads go through the registry's ``_read`` (composites and lazy arrays
    too), so whatever wraps it sees every read.
    """

    def __init__(
        self, source: _Source, lock: threading.RLock, cache_bytes: int, disk: Path | None
    ) -> None:
        self._source = source
        self._lock = lock
        # Arrays read, as packed bits: a 4M mask holds 0.56 MB here, not 4.5.
        # Least recently used first out, bounded in bytes; an array larger
        # than the whole bound is read each time, not kept.
        self._packed: LRUCache[str, PackedMasks] = LRUCache(
            maxsize=max(1, cache_bytes), getsizeof=lambda packed: packed.nbytes
        )
        # The composites of the last 16 sets of uids read.
        self._composites: LRUCache[tuple[str, ...], tuple] = LRUCache(maxsize=16)
        self.disk = disk

    def __getitem__(self, uid: str) -> PackedMasks:
        return self._packed[uid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def remember(self, uid: str, array: np.ndarray) -> None:
        """Keep an array just written (it was verified as it was made)."""
        with self._lock:
            self._put(uid, array)

    def forget(self, uid: str) -> None:
        """Drop a purged uid: its array, the composites and its local copy."""
        with self._lock:
            self._packed.pop(uid, None)
            self._composites.clear()
        if self.disk is not None:
            (self.disk / f"{uid}.npy").unlink(missing_ok=True)

    def _put(self, uid: str, array: np.ndarray) -> None:
        packed = PackedMasks([array])
        if packed.nbytes <= self._packed.maxsize:
            self._packed[uid] = packed

    def read(self, uid: str) -> np.ndarray:
        """A verified, read-only NumPy array of a uid (cached: uids are immutable).

        Each call unpacks a new array from the cached bits, so nothing holds
        it after its caller is done with it.
        """
        with self._lock:
            kept = self._packed.get(uid)  # most recently used, from here on
            if kept is not None:
                return kept[0]
        stored = self._source._stored_for(uid)
        array = self._from_disk(stored)
        if array is None:
            array = self._fetch(uid, stored)
            self._to_disk(stored, array)
        with self._lock:
            self._put(uid, array)
        array.flags.writeable = False
        return array

    def _fetch(self, uid: str, stored: _Stored) -> np.ndarray:
        """Read a uid's array from tiled and verify it against its sha256."""
        node = self._source._mask_node(uid)
        try:
            with self._source._translate(f"reading mask {uid}"):
                raw = _read_whole(node)
        except (MaskPermissionError, RegistryUnavailableError):
            raise
        except Exception as err:
            raise MaskIntegrityError(
                f"Mask {uid} ({stored.detector}/{stored.name}) cannot be read back "
                f"({type(err).__name__}): its stored bytes are damaged or missing. It "
                "is not served; restore it from a backup or register the mask again."
            ) from err
        if stored.legacy_key is not None:
            array = raw.astype(bool)
        else:
            array = raw
            if array.dtype != np.bool_ or array.shape != stored.shape:
                raise MaskIntegrityError(
                    f"Mask {uid} reads back as {array.dtype} {shape_str(array.shape)}, "
                    f"not bool {shape_str(stored.shape)}: the stored array was altered. "
                    "Do not use it; register the mask again from its source."
                )
        digest = mask_sha256(array)
        if digest != stored.sha256:
            raise MaskIntegrityError(
                f"Mask {uid} ({stored.detector}/{stored.name}) fails its integrity "
                f"check: stored sha256 {stored.sha256[:12]}..., content hashes to "
                f"{digest[:12]}.... The stored bytes were changed after registration; "
                "it is not served. Restore it from a backup or register the mask again."
            )
        return array

    def _cache_path(self, stored: _Stored) -> Path | None:
        if self.disk is None or stored.legacy_key is not None:
            return None
        return self.disk / f"{stored.uid}.npy"

    def _from_disk(self, stored: _Stored) -> np.ndarray | None:
        """A local copy of the array if there is one and it matches its sha256."""
        path = self._cache_path(stored)
        if path is None:
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if (
            array.dtype != np.bool_
            or array.shape != stored.shape
            or mask_sha256(array) != stored.sha256
        ):
            logger.warning("Ignoring the damaged local copy %s of mask %s", path, stored.uid)
            return None
        return array

    def _to_disk(self, stored: _Stored, array: np.ndarray) -> None:
        path = self._cache_path(stored)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            with open(partial, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(partial, path)
        except OSError:
            # A cache that cannot be written costs speed, never correctness.
            logger.debug("Could not keep a local copy of mask %s", stored.uid, exc_info=True)

    def composite(self, uids: tuple[str, ...]) -> tuple[np.ndarray, str, PackedMasks]:
        """The read-only AND of the uids' masks, its sha256 and the components."""
        with self._lock:
            built = self._composites.get(uids)
        if built is None:
            self._source._prefetch(uids)
            with self._lock:
                fetching = any(uid not in self._packed for uid in uids)
            composite = None
            for uid in uids:
                # One unpacked component at a time: the components are kept
                # packed (PackedMasks), the composite unpacked.
                component = self._source._read(uid)
                if composite is None:
                    composite = component.copy()
                else:
                    np.logical_and(composite, component, out=composite)
                del component
            assert composite is not None
            composite.flags.writeable = False
            components = PackedMasks.concat(self._packed_of(uid) for uid in uids)
            if fetching:
                _return_freed_memory()
            built = (composite, mask_sha256(composite), components)
            with self._lock:
                # Uids are immutable, so the composite of the same uids is the
                # same array: the next run costs one query and no AND.
                self._composites[uids] = built
        return built

    def _packed_of(self, uid: str) -> PackedMasks:
        with self._lock:
            kept = self._packed.get(uid)
        return kept if kept is not None else PackedMasks([self._source._read(uid)])

    def _read_copy(self, uid: str) -> np.ndarray:
        return self._source._read(uid).copy()

    def lazy(self, uid: str) -> dask.array.Array:
        """A uid's mask as a lazy dask array: read (through ``_read``) when computed."""
        import dask
        import dask.array as da

        stored = self._source._stored_for(uid)
        task = dask.delayed(self._read_copy, pure=True)(uid, dask_key_name=f"chx-mask-read-{uid}")
        return da.from_delayed(task, shape=stored.shape, dtype=bool, name=f"chx-mask-{uid}")


def _return_freed_memory() -> None:
    """Give memory freed by transfers back to the OS (glibc keeps it otherwise).

    Reading arrays through tiled frees buffers on several threads (the HTTP
    client's, and an embedded server's); glibc keeps the freed pages in
    per-thread arenas, so a long-lived process (a router) would carry tens
    of MB it no longer uses. ``malloc_trim`` returns them; elsewhere than
    glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _read_whole(node: Any) -> np.ndarray:
    """A stored array in one request, on this thread.

    tiled's ``read()`` builds and computes a dask graph, which costs a thread
    pool and imports dask.distributed (about 30 MB of a router's memory) to
    fetch one small array.
    """
    links = getattr(node, "item", {}).get("links", {})
    if "full" not in links:
        return np.asarray(node.read())
    structure = node.structure()
    shape = tuple(structure.shape)
    response = node.context.http_client.get(
        links["full"],
        headers={"Accept": "application/octet-stream"},
        params={"expected_shape": ",".join(map(str, shape)) or "scalar"},
    )
    response.raise_for_status()
    dtype = structure.data_type.to_numpy_dtype()
    return np.frombuffer(response.read(), dtype=dtype).reshape(shape).copy()


def _disk_cache_directory(choice: str | Path | None | Literal[False]) -> Path | None:
    if choice is False:
        return None
    if choice is not None:
        return Path(choice)
    from .settings import settings

    configured = settings().cache_dir
    if configured is not None:
        return configured.expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("chx-masks", appauthor=False)) / "masks"
