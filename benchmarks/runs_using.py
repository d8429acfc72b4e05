"""``runs_using`` on a large runs catalog: one tiled query per uid against reading every run.

Run by developers, never by pytest (see ``benchmarks/README.md``)::

    python benchmarks/runs_using.py                       # 10,000 runs, SQLite
    python benchmarks/runs_using.py --postgres postgresql://root@127.0.0.1:5432/postgres
    python benchmarks/runs_using.py --runs 2000 --repeat 3

A catalog of N runs is made (SQLite in a temporary directory; with
``--postgres ADMIN_URI`` also a fresh PostgreSQL database, dropped after):
each run a container with the start document ``MaskProvenance`` writes
(``masks``, ``mask_uids``), the runs cycling through 100 versions of a
beamstop lineage and sharing one gaps mask, and every tenth run a masked run
made from it (``parent_uid``). It is served in-process (``build_app`` +
``Context.from_app``, the transport of ``open_run_store``), and
``runs_using(runs, [uid])`` is timed against the naive answer, a walk over
every run's start document, for one uid used by 1% of the runs. Both must
give the same runs. Medians of ``--repeat`` interleaved samples.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

VERSIONS = 100


def _start(i: int, beamstop: list[str], gaps: str) -> dict[str, Any]:
    uid = str(uuid.uuid4())
    version = i % VERSIONS
    uids = [gaps, beamstop[version]]
    return {
        "uid": uid,
        "scan_id": i + 1,
        "time": 1.7e9 + i,
        "plan_name": "count",
        "masks": {
            "eiger4m_single_image": {
                "names": ["gaps", "beamstop"],
                "versions": [0, version],
                "uids": uids,
                "sha256": "0" * 64,
                "chosen_by": "active set v1",
            }
        },
        "mask_uids": uids,
    }


async def _fill(adapter: Any, runs: int, beamstop: list[str], gaps: str) -> None:
    """Write the runs straight through the catalog adapter (no HTTP: minutes, not hours)."""
    from tiled.structures.core import StructureFamily

    await adapter.startup()
    for i in range(runs):
        start = _start(i, beamstop, gaps)
        await adapter.create_node(
            StructureFamily.container,
            {"start": start},
            key=start["uid"],
            specs=[{"name": "BlueskyRun", "version": "3.0"}],
        )
        if i % 10 == 0:
            derived = {**_start(i, beamstop, gaps), "parent_uid": start["uid"]}
            await adapter.create_node(
                StructureFamily.container,
                {"start": derived},
                key=derived["uid"],
                specs=[{"name": "BlueskyRun", "version": "3.0"}],
            )
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1:,} runs", file=sys.stderr, flush=True)
    # The app opens its own connections, on its own event loop.
    await adapter.context.engine.dispose()


def _catalog(uri: str, storage: Path, runs: int) -> tuple[Any, list[str]]:
    """A client of a new catalog at ``uri`` holding ``runs`` runs; the beamstop uids."""
    from tiled.catalog import from_uri
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    beamstop = [str(uuid.uuid4()) for _ in range(VERSIONS)]
    gaps = str(uuid.uuid4())
    adapter = from_uri(
        uri,
        writable_storage=[str(storage)],
        init_if_not_exists=True,
        specs=[{"name": "CatalogOfBlueskyRuns", "version": "3.0"}],
    )
    began = time.perf_counter()
    asyncio.run(_fill(adapter, runs, beamstop, gaps))
    print(f"  filled in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    context = Context.from_app(build_app(adapter))
    return from_context(context), beamstop


def _naive(runs: Any, uid: str) -> list[str]:
    """Every run's start read, newest first: what a scan without a query costs."""
    found = [
        (run.metadata["start"]["time"], key)
        for key, run in runs.items()
        if uid in run.metadata["start"].get("mask_uids", ())
        and "parent_uid" not in run.metadata["start"]
    ]
    return [key for _, key in sorted(found, reverse=True)]


def measure(label: str, uri: str, storage: Path, runs: int, repeat: int) -> dict[str, Any]:
    from bluesky_callbacks._run_masks import runs_using

    print(f"{label}: a catalog of {runs:,} runs", file=sys.stderr)
    client, beamstop = _catalog(uri, storage, runs)
    uid = beamstop[7]
    query, naive = [], []
    for _ in range(repeat):
        began = time.perf_counter()
        got = [use.run_uid for use in runs_using(client, uid)]
        query.append(time.perf_counter() - began)
        began = time.perf_counter()
        want = _naive(client, uid)
        naive.append(time.perf_counter() - began)
        assert got == want, (len(got), len(want))
    client.context.close()
    result = {
        "catalog": label,
        "runs": runs,
        "found": len(got),
        "runs_using_s": statistics.median(query),
        "naive_s": statistics.median(naive),
    }
    print(
        f"{label:>10}: {runs:,} runs ({(runs + 9) // 10:,} masked runs besides), "
        f"uid in {len(got)} of them: runs_using {result['runs_using_s']:.3f} s "
        f"(target < 1 s: {'PASS' if result['runs_using_s'] < 1 else 'FAIL'}), reading every "
        f"run {result['naive_s']:.2f} s, ratio {result['naive_s'] / result['runs_using_s']:.0f}x"
    )
    return result


def _postgres_database(admin_uri: str) -> tuple[str, Any]:
    """A fresh database on the server of ``admin_uri``: its URI and a function dropping it."""
    import asyncpg

    name = f"chx_masks_bench_{uuid.uuid4().hex[:10]}"

    async def execute(statement: str) -> None:
        connection = await asyncpg.connect(admin_uri, timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    base = admin_uri.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}", lambda: asyncio.run(
        execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="runs in the catalog")
    parser.add_argument("--repeat", type=int, default=5, help="samples of each")
    parser.add_argument(
        "--postgres",
        metavar="ADMIN_URI",
        default=None,
        help="also a PostgreSQL catalog, in a fresh database on this server",
    )
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        measure("SQLite", f"sqlite:///{tmp}/catalog.db", Path(tmp), args.runs, args.repeat)
        if args.postgres:
            uri, drop = _postgres_database(args.postgres)
            try:
                measure("PostgreSQL", uri, Path(tmp), args.runs, args.repeat)
            finally:
                drop()
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
