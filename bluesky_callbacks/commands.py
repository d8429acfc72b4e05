"""The ``chx-masks`` commands of the Bluesky integration: process, demo, run, runs-using.

Contributed to ``chx-masks`` through the ``chx_masks.commands`` entry points
(see :mod:`chx_masks.cli`): the registry library does not import the Bluesky
integration, and this module imports Bluesky, Prefect and Dask only inside
the commands, so that ``chx-masks --help`` stays quick and a command names
the extra it needs when that is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from chx_masks.cli import (
    CommandFailure,
    State,
    json_option,
    pass_state,
    percent,
    print_json,
    table,
    wrote,
)

__all__ = ["demo", "process", "run", "runs_using"]


def _masks_option(values: tuple[str, ...]) -> dict[str, list[str]]:
    masks: dict[str, list[str]] = {}
    for value in values:
        detector, sep, names = value.partition("=")
        if not sep or not detector or not names:
            raise click.BadParameter(
                f"{value!r} is not DETECTOR=NAME[,NAME...]", param_hint="--masks"
            )
        masks[detector] = [n for n in names.split(",") if n]
    return masks


@click.command()
@click.argument("run_uids", metavar="RUN_UID...", nargs=-1, required=True)
@click.option(
    "--runs",
    metavar="URI|DIR",
    default=None,
    help="Where the raw runs are (default: $CHX_MASKS_RUNS_URI, else DIR/runs "
    "beside the registry).",
)
@click.option(
    "--processed",
    metavar="URI|DIR",
    default=None,
    help="Where products go (default: $CHX_MASKS_PROCESSED_URI, else "
    "DIR/processed beside the registry).",
)
@click.option(
    "--readable-storage",
    "readable",
    metavar="DIR",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A directory of detector files (HDF5, .npy) the runs refer to; give it "
    "again for more (default: the run store's parent directory and the store "
    "itself). Local run stores only.",
)
@click.option(
    "--masks",
    "mask_specs",
    metavar="DET=NAME[,NAME...]",
    multiple=True,
    help="Masks for runs that recorded none, resolved as of each run's start.",
)
@click.option("--stream", default="primary", show_default=True)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="A dask.distributed scheduler (default: threads in this process).",
)
@click.option(
    "--frames-per-chunk",
    type=click.IntRange(1),
    default=None,
    help="Frames per chunk of work (default: about 64 MiB).",
)
@click.option(
    "--product-files",
    "product_files",
    metavar="DIR",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the product's HDF5 files go; the processed store must read "
    "that directory (default: inside a local processed store; a tiled server "
    "without it stores the product in tiled, sparse, several times larger).",
)
@json_option
@pass_state
def process(
    state: State,
    run_uids: tuple[str, ...],
    runs: str | None,
    processed: str | None,
    readable: tuple[Path, ...],
    mask_specs: tuple[str, ...],
    stream: str,
    scheduler: str | None,
    frames_per_chunk: int | None,
    product_files: Path | None,
    as_json: bool,
) -> None:
    """Mask stored runs with the masks they recorded; store the masked frames.

    The same processing as the end-of-run Prefect flow, without Prefect. A
    run processed before is not processed again: its product is reported;
    a run another process is processing right now is waited for. Detector
    files a run refers to are read where they are, if they lie in a
    directory given with --readable-storage (by default beside the run
    store: --runs /data/chx/runs reads files under /data/chx).
    """
    masks = _masks_option(mask_specs)
    try:
        # Not bluesky_callbacks.workflows: importing Prefect prints its telemetry
        # notice on a terminal (and reports the import) although no flow runs here.
        from ._process import located_store, plan_processing, write_product
    except ImportError as err:
        raise CommandFailure(
            f"process needs the workflows extra ({err.name} is missing): "
            'pip install "chx-masks[workflows]"'
        ) from err

    source = _existing_runs(state, runs)
    target = located_store(processed, "processed", state.directory)
    if source.remote:
        if readable:
            raise click.UsageError(
                f"--readable-storage is for a local run store; {source.location} is a tiled "
                "server, which reads the detector files its own configuration's "
                "readable_storage lists: drop --readable-storage."
            )
    else:
        source = source.reading(readable or None)
    client = None
    if scheduler is not None:
        from distributed import Client

        client = Client(scheduler)
    reports: list[dict[str, Any]] = []
    try:
        for run_uid in run_uids:
            plan = plan_processing(
                run_uid,
                runs=source,
                registry=state.registry,
                masks=masks or None,
                stream=stream,
                frames_per_chunk=frames_per_chunk,
            )
            chunks = sum(len(d.chunks) for d in plan.detectors)
            with click.progressbar(
                length=chunks, label=f"run {run_uid[:8]}", file=sys.stderr
            ) as bar:

                def progress(done: int, total: int, bar: Any = bar) -> None:
                    bar.update(done - bar.pos)

                product = write_product(
                    plan,
                    runs=source,
                    processed=target,
                    client=client,
                    progress=progress,
                    files=product_files,
                )
            reports.append(
                {
                    "uid": product.uid,
                    "parent_uid": product.parent_uid,
                    "created": product.created,
                    "frames": product.frames,
                    "nonzero": product.nonzero,
                    "masks": product.masks,
                    "processed": target.location,
                    "seconds": round(product.seconds, 3),
                }
            )
    finally:
        if client is not None:
            client.close()
    if as_json:
        print_json(reports[0] if len(reports) == 1 else reports)
        return
    for r in reports:
        state_word = "processed" if r["created"] else "already processed"
        counts = ", ".join(
            f"{k}: {n} frames, {r['nonzero'].get(k, 0)} non-zero pixels"
            for k, n in r["frames"].items()
        )
        click.echo(
            f"run {r['parent_uid']} {state_word}: product {r['uid']} in "
            f"{r['processed']} ({counts}; {r['seconds']:.1f} s)"
        )


@click.command()
@click.option(
    "--dir",
    "demo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The demo's own directory: its registry, run store and "
    "pictures (default: 'demo' in the data directory, i.e. $CHX_MASKS_DIR/demo "
    "or ~/.local/share/chx-masks/demo).",
)
@click.option(
    "--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None, hidden=True
)
@click.option(
    "--frames",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="Frames in the scan (Eiger 4M, uint32).",
)
@json_option
@pass_state
def demo(state: State, demo_dir: Path | None, out: Path | None, frames: int, as_json: bool) -> None:
    """The main job end to end, in a registry of its own.

    Registers masks for a simulated Eiger 4M, runs a scan with the RunEngine,
    the preprocessor, the masking router and TiledWriter, replays the stored
    run, checks the replay equals the live masked frames and draws pictures.
    Your registry (and a server named by $CHX_MASKS_URI) is never opened;
    running the demo again registers nothing new.
    """
    try:
        import bluesky  # noqa: F401  (the demo's scan; imported by run_demo)
        import bluesky_tiled_plugins  # noqa: F401
        import ophyd  # noqa: F401

        from ._demo import run_demo
    except ImportError as err:
        raise CommandFailure(
            f'The demo needs Bluesky ({err.name} is missing): pip install "chx-masks[all]".'
        ) from err
    if state.uri is not None or state.profile is not None:
        raise click.UsageError(
            "The demo keeps a registry of its own and never writes to a "
            "shared one: drop --uri/--profile (use `chx-masks demo --dir "
            "DIR` to choose where it goes)."
        )
    directory = demo_dir or out
    if directory is None:
        from chx_masks.stores import default_directory

        directory = (
            state.directory.expanduser() if state.directory is not None else default_directory()
        ) / "demo"

    def progress(label: str, total: int) -> Any:
        return click.progressbar(length=total, label=label, file=sys.stderr)

    echo = (lambda line: None) if as_json else click.echo
    summary = run_demo(directory, frames=frames, echo=echo, progress=progress)
    if as_json:
        print_json(summary.as_dict())
    else:
        click.echo(click.style("summary", bold=True))
        click.echo(f"  directory    {summary.directory} (the demo's own registry and runs)")
        click.echo(f"  raw run      {summary.raw_uid}")
        click.echo(f"  masked run   {summary.derived_uid} (replayed as {summary.replay_uid})")
        for name, info in summary.masks.items():
            click.echo(f"  mask         {name} v{info['version']}  {info['uid']}")
        click.echo(
            f"  masked       {percent(summary.masked_fraction)} of each frame; "
            f"composite sha256 {summary.composite_sha256[:16]}..."
        )
        click.echo(
            f"  router       {summary.router_frames_per_second:,.0f} frames/s alone "
            f"(4M uint32); {summary.scan_router_frames_per_second:,.0f} frames/s "
            "during the scan"
        )
        click.echo(
            f"  replay       equal to live: {summary.replay_equal}; lazy dask path "
            f"equal: {summary.lazy_equal}"
        )
        click.echo(f"  took         {summary.seconds:.1f} s")
        for kind, path in summary.pngs.items():
            wrote(kind.replace("_", " "), Path(path))
        click.echo("next, on the demo's registry and runs:")
        click.echo(f"  chx-masks --dir {summary.directory} list")
        click.echo(f"  chx-masks --dir {summary.directory} process {summary.raw_uid}")
    if not (summary.replay_equal and summary.lazy_equal):
        raise CommandFailure("The replayed frames differ from the live masked frames.")


def _existing_runs(state: State, runs: str | None) -> Any:
    """The runs store given with --runs, or the default; a local one must exist."""
    from ._stores import located_store

    source = located_store(runs, "runs", state.directory)
    if not source.remote and not Path(source.location, "catalog.db").is_file():
        raise CommandFailure(
            f"No run store at {source.location}: give --runs URI|DIR (where "
            "TiledWriter writes the runs)."
        )
    return source


def _stores(state: State, runs: str | None, processed: str | None) -> tuple[Any, Any]:
    """The runs store's client (it must exist) and the processed store's (None if absent)."""
    from ._stores import _client, located_store

    source = _existing_runs(state, runs)
    target = located_store(processed, "processed", state.directory)
    products = None
    if target.remote or Path(target.location, "catalog.db").is_file():
        products = _client(target, runs=False)
    return _client(source, runs=True), products


_RUNS_OPTION = click.option(
    "--runs",
    metavar="URI|DIR",
    default=None,
    help="Where the runs are (default: $CHX_MASKS_RUNS_URI, else DIR/runs beside the registry).",
)
_PROCESSED_OPTION = click.option(
    "--processed",
    metavar="URI|DIR",
    default=None,
    help="Where end-of-run products are (default: $CHX_MASKS_PROCESSED_URI, else "
    "DIR/processed beside the registry).",
)


def _when(moment: Any) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@click.command("run")
@click.argument("which", metavar="RUN")
@_RUNS_OPTION
@json_option
@pass_state
def run(state: State, which: str, runs: str | None, as_json: bool) -> None:
    """Show the masks a stored run used: per detector, the names, versions,
    uids and who registered them, how they were chosen, and whether the
    composite of those uids still has the sha256 the run recorded.

    RUN is a uid, a unique uid prefix (5 characters at least) or a scan id.
    """
    from ._run_masks import find_run, run_masks

    client, _ = _stores(state, runs, None)
    try:
        found = run_masks(find_run(client, which), state.registry)
    except KeyError as err:
        raise CommandFailure(f"{err.args[0]}; `chx-masks runs-using` lists runs by mask.") from None
    if as_json:
        print_json(_run_json(found))
        return
    click.echo(f"run {found.run_uid}  scan {found.scan_id}  {_when(found.time)}  {found.plan_name}")
    if found.error:
        click.echo(f"  its start recorded no masks: {found.error}")
    if not found.detectors and not found.error:
        click.echo("  its start recorded no masks (no detector of the run has an active set).")
    for det in found.detectors.values():
        check = {True: "matches", False: "DOES NOT MATCH", None: "not checked"}[det.verified]
        click.echo(f"\n{det.detector} (chosen by {det.chosen_by or '-'})")
        click.echo(f"  composite sha256 {det.sha256}: {check}")
        if det.error:
            click.echo(f"  {det.error}")
        registrants = det.created_by or ("-",) * len(det.uids)
        table(
            ["NAME", "VERSION", "UID", "REGISTERED BY"],
            zip(det.names, det.versions, det.uids, registrants, strict=False),
            right=[1],
        )
    if any(det.verified is False for det in found.detectors.values()):
        raise CommandFailure(
            "A composite does not match the sha256 its run recorded: run `chx-masks verify`."
        )


def _run_json(found: Any) -> dict[str, Any]:
    return {
        "run_uid": found.run_uid,
        "scan_id": found.scan_id,
        "time": None if found.time is None else found.time.isoformat(),
        "plan_name": found.plan_name,
        "mask_error": found.error,
        "detectors": {
            key: {
                "names": list(d.names),
                "versions": list(d.versions),
                "uids": list(d.uids),
                "created_by": list(d.created_by),
                "chosen_by": d.chosen_by,
                "sha256": d.sha256,
                "verified": d.verified,
                "error": d.error,
            }
            for key, d in found.detectors.items()
        },
    }


@click.command("runs-using")
@click.argument("what", metavar="UID | DET NAME", nargs=-1, required=True)
@click.option(
    "--version",
    "version",
    type=click.IntRange(0),
    default=None,
    help="With DET NAME: only runs that used this version (default: any version).",
)
@_RUNS_OPTION
@_PROCESSED_OPTION
@json_option
@pass_state
def runs_using(
    state: State,
    what: tuple[str, ...],
    version: int | None,
    runs: str | None,
    processed: str | None,
    as_json: bool,
) -> None:
    """List the runs whose start documents recorded a mask, newest first, with
    their derived (masked) runs and end-of-run products.

    Give one mask UID, or DET NAME for every version of that lineage
    (--version N for one). A tiled query on the runs catalog finds them.
    """
    from chx_masks import ChxMasksError

    from ._run_masks import lineage_uids
    from ._run_masks import runs_using as find_uses

    if len(what) > 2:
        raise click.UsageError("Give one mask UID, or DET NAME.")
    if len(what) == 1 and version is not None:
        raise click.UsageError("--version goes with DET NAME, not with a UID.")
    try:
        if len(what) == 2:
            uids = list(lineage_uids(state.registry, what[0], what[1], version))
        else:
            uids = [state.registry.describe(what[0]).uid]
    except ChxMasksError as err:
        raise CommandFailure(str(err)) from None
    client, products = _stores(state, runs, processed)
    uses = find_uses(client, uids, processed=products)
    if as_json:
        print_json(
            [
                {
                    "run_uid": u.run_uid,
                    "scan_id": u.scan_id,
                    "time": None if u.time is None else u.time.isoformat(),
                    "plan_name": u.plan_name,
                    "detectors": list(u.detectors),
                    "uids": list(u.uids),
                    "masks": list(u.masks),
                    "derived": list(u.derived),
                    "products": list(u.products),
                }
                for u in uses
            ]
        )
        return
    if not uses:
        click.echo(f"No run in the runs store recorded {' '.join(what)}.")
        return
    table(
        ["TIME", "SCAN", "RUN", "PLAN", "MASKS", "DERIVED", "PRODUCTS"],
        (
            [
                _when(u.time),
                u.scan_id,
                u.run_uid[:8],
                u.plan_name,
                ", ".join(u.masks),
                ",".join(x[:8] for x in u.derived) or "-",
                len(u.products),
            ]
            for u in uses
        ),
        right=[1, 6],
    )
