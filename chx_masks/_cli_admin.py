"""``chx-masks`` commands for whoever runs the registry: ``purge``, ``verify`` and ``serve``.

Registered on :func:`chx_masks._cli.main` when :mod:`chx_masks._cli` is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ._cli import _Failure, _json_option, _print_json, _record_json, _State, main, pass_state
from ._errors import MaskIntegrityError


@main.command()
@click.argument("uid")
@click.option(
    "--reason", required=True, metavar="TEXT", help="Why the mask must go; the change log keeps it."
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_json_option
@pass_state
def purge(state: _State, uid: str, reason: str, yes: bool, as_json: bool) -> None:
    """Delete mask UID's bytes and record for good (tiled admins only), logging why.

    The one exception to "a uid resolves forever": runs that recorded UID can
    no longer be reprocessed with it. Give the full uid (`chx-masks show --uid
    PREFIX` prints it). On a server, the key must hold admin:apikeys.
    """
    import uuid

    try:
        uuid.UUID(uid)
    except ValueError:
        raise _Failure(
            f"{uid!r} is not a full uid: a purge cannot be undone, so it takes "
            "the whole uid (`chx-masks show --uid PREFIX` prints it)."
        ) from None
    reg = state.registry
    if not yes:
        try:
            known = reg.describe(uid)
            what = f" ({known.detector}/{known.name} v{known.version})"
        except MaskIntegrityError:
            what = " (its record fails its integrity check)"
        click.confirm(
            f"Purge mask {uid}{what} for good? Runs that recorded it can no "
            "longer be reprocessed with it",
            abort=True,
        )
    record = reg.purge(uid, reason=reason)
    if as_json:
        _print_json({**_record_json(record), "purged": True, "reason": reason})
        return
    click.echo(
        f"purged {record.detector}/{record.name} v{record.version} (uid {record.uid}); "
        "the change log records who and why."
    )


@main.command()
@click.option(
    "--repair",
    is_flag=True,
    help="Remove orphans of interrupted registrations (never a sealed mask) and "
    "seal registered masks whose seal was interrupted.",
)
@_json_option
@pass_state
@click.pass_context
def verify(ctx: click.Context, state: _State, repair: bool, as_json: bool) -> None:
    """Check the whole registry: every array's sha256, every record, slot and active set.

    Exit status 0 only when nothing is wrong (after --repair, if given).
    """
    from ._verify import verify_registry

    reg = state.registry
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total:
            bar = click.progressbar(length=total, label="Checking mask arrays", file=sys.stderr)
            bar.__enter__()
        if bar is not None:
            bar.update(done - bar.pos)

    try:
        report = verify_registry(reg, repair=repair, progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if as_json:
        _print_json(report.to_dict())
    else:
        counts = ", ".join(f"{n} {what}" for what, n in report.counts.items())
        for problem in report.repaired:
            click.echo(f"repaired  {problem.kind:<13} {problem.where}: {problem.detail}")
        for problem in report.problems:
            click.echo(f"PROBLEM   {problem.kind:<13} {problem.where}: {problem.detail}")
        if report.clean:
            click.echo(f"Registry at {reg.location} is clean ({counts}).")
        else:
            fixable = [p for p in report.problems if p.kind in ("orphan", "unsealed")]
            advice = (
                " `chx-masks verify --repair` fixes the orphans and seals."
                if (fixable and not repair)
                else ""
            )
            click.echo(
                f"Registry at {reg.location}: {len(report.problems)} problem(s) ({counts}).{advice}"
            )
    if not report.clean:
        ctx.exit(1)


@main.command()
@click.option(
    "--host",
    default=None,
    metavar="HOST",
    help="Interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for the network).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port (default 8000; 0 picks a free one).",
)
@click.option(
    "--dir",
    "serve_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Writable storage: arrays go to DIR/data, and the SQLite "
    "catalog is DIR/catalog.db (default: the embedded registry's directory, "
    "$CHX_MASKS_DIR or the user data directory).",
)
@click.option(
    "--catalog",
    metavar="URI",
    default=None,
    help="Catalog database instead of DIR/catalog.db, e.g. "
    "postgresql+asyncpg://USER@HOST:5432/DB for the shared deployment.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Run from a tiled configuration file instead (e.g. "
    "deploy/tiled-config.yml: PostgreSQL, accounts, API keys with scopes).",
)
@click.option(
    "--api-key",
    "server_key",
    metavar="KEY",
    envvar="TILED_SINGLE_USER_API_KEY",
    show_envvar=True,
    default=None,
    help="The key clients must give (default: generated and printed once). "
    "Given as a flag it shows in `ps`: prefer the environment variable.",
)
@click.option(
    "--public",
    is_flag=True,
    help="Anyone who can connect may read without a key (writing still needs one).",
)
@pass_state
def serve(
    state: _State,
    host: str | None,
    port: int | None,
    serve_dir: Path | None,
    catalog: str | None,
    config_file: Path | None,
    server_key: str | None,
    public: bool,
) -> None:
    """Serve a registry over HTTP with tiled, for other processes and machines.

    Prints the URI to give clients as CHX_MASKS_URI. Runs until Ctrl-C or
    SIGTERM.
    """
    from . import _serve

    if state.uri is not None or state.profile is not None:
        raise click.UsageError(
            "serve serves a local registry; --uri and --profile name "
            "a remote one. Use `chx-masks serve --dir DIR`."
        )
    if state.api_key is not None:
        raise click.UsageError(
            "Give the server's key after the command: `chx-masks serve --api-key KEY`."
        )
    directory = serve_dir or state.directory
    if config_file is not None:
        if directory is not None or catalog is not None:
            raise click.UsageError(
                "--config describes the catalog and storage; do not also give --dir or --catalog."
            )
        plan = _serve.plan_config(
            config_file, host=host, port=port, api_key=server_key, public=public
        )
    else:
        if directory is None:
            from ._embedded import default_directory

            directory = default_directory()
        plan = _serve.plan_directory(
            directory.expanduser().resolve(),
            catalog=catalog,
            host=host or "127.0.0.1",
            port=8000 if port is None else port,
            api_key=server_key,
            public=public,
        )

    def ready(info: Any) -> None:
        click.echo(_serve.announcement(info, plan.generated_key))
        sys.stdout.flush()

    _serve.run(plan, on_ready=ready)
    click.echo("chx-masks: server stopped.", err=True)
