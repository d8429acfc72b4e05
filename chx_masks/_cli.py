"""The ``chx-masks`` command line; imports heavy libraries only inside commands.

Used from a terminal at the beamline. Expected failures print one line
(``chx-masks: <what was wrong and what to do>``, in the command line's words:
:attr:`ChxMasksError.cli_message`) and exit with status 1; no traceback.
``--json`` gives output a script can read. The registry is chosen as
everywhere in chx-masks (``--uri``/``--profile``/``--dir``, else
``CHX_MASKS_URI``/``CHX_MASKS_PROFILE``, else the embedded default).

This module holds the ``main`` group, its shared options and output helpers;
the commands are in ``_cli_masks``, ``_cli_files``, ``_cli_generate`` and
``_cli_admin``, imported at its end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._errors import (
    ChxMasksError,
    MaskValidationError,
    RegistryUnavailableError,
)

if TYPE_CHECKING:
    from ._records import ActiveSet, CompositeMask, MaskRecord
    from ._registry import MaskRegistry

FORMATS = ("npy", "npz", "tiff", "edf", "msk", "nexus", "indices")
CONVENTIONS = ("keep", "masked-nonzero")
#: What applies to a detector whose active set names nothing (said wherever that shows).
FALLBACK = (
    "runs use the preprocessor's configured fallback masks (the profile's CHX_MASKS_FALLBACK)"
)


class _Failure(click.ClickException):
    """An expected failure: one line on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"chx-masks: {self.format_message()}", err=True)


#: The entry-point group through which other packages add commands.
COMMANDS_GROUP = "chx_masks.commands"


def _contributed() -> dict[str, Any]:
    """Entry points of :data:`COMMANDS_GROUP`, by command name (none loaded yet)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}


def _unavailable(name: str, ep: Any, err: ImportError) -> click.Command:
    """A stand-in for a contributed command whose package cannot be imported."""
    missing = err.name or str(err)

    @click.command(
        name,
        context_settings={"ignore_unknown_options": True},
        add_help_option=False,
        help=f"(unavailable: {missing} is missing)",
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        raise _Failure(
            f"{name} comes from {ep.value.split(':')[0]}, which needs {missing}: "
            'pip install "chx-masks[all]"'
        )

    return command


class _Group(click.Group):
    """Turns every :class:`ChxMasksError` into one line in the command line's words.

    Commands of other packages (the Bluesky integration's ``process`` and
    ``demo``) come from entry points of :data:`COMMANDS_GROUP`, loaded only
    when named or listed.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_contributed()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        ep = _contributed().get(cmd_name)
        if ep is None:
            return None
        try:
            return ep.load()
        except ImportError as err:
            return _unavailable(cmd_name, ep, err)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ChxMasksError as err:
            message = err.cli_message
            state = ctx.find_object(_State)
            # The registry says what is down; only we know how the user chose it.
            if isinstance(err, RegistryUnavailableError) and state is not None and state.origin:
                message = f"{message} ({state.origin})"
            raise _Failure(message) from err


def _read_key_file(path: Path) -> str:
    """The first line of ``path``, stripped: an API key kept out of the process list."""
    try:
        lines = path.expanduser().read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise click.BadParameter(
            f"cannot read {path}: {err.__class__.__name__}: "
            f"{getattr(err, 'strerror', None) or err}",
            param_hint="--api-key-file",
        ) from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise click.BadParameter(
            f"{path} is empty; put the API key on its first line.", param_hint="--api-key-file"
        )
    return key


class _State:
    """The options every command shares; the registry opens on first use."""

    def __init__(
        self, uri: str | None, api_key: str | None, profile: str | None, directory: Path | None
    ) -> None:
        chosen = [
            n
            for n, v in (("--uri", uri), ("--profile", profile), ("--dir", directory))
            if v is not None
        ]
        if len(chosen) > 1:
            raise click.UsageError(f"Give one of {', '.join(chosen)}, not several.")
        self.uri, self.api_key, self.profile, self.directory = uri, api_key, profile, directory
        self._registry: MaskRegistry | None = None
        self._owned = False

    @property
    def registry(self) -> MaskRegistry:
        if self._registry is None:
            from ._default import default_registry, opened_default
            from ._registry import MaskRegistry
            from .settings import settings

            if self.uri is not None:
                key = self.api_key or settings().secret("api_key")
                self._registry, self._owned = MaskRegistry.from_uri(self.uri, api_key=key), True
            elif self.profile is not None:
                self._registry, self._owned = MaskRegistry.from_profile(self.profile), True
            elif self.directory is not None:
                self._registry, self._owned = _embedded(self.directory), True
            else:
                # The embedded default through its local server; otherwise (a
                # server or profile configured, the local server off or not
                # starting, a registry this process chose) the process's default.
                local = None
                configured = settings()
                if opened_default() is None and not (configured.uri or configured.profile):
                    from ._embedded import default_directory

                    local = _local_server(default_directory())
                if local is not None:
                    self._registry, self._owned = local, True
                else:
                    self._registry = default_registry()
        return self._registry

    @property
    def origin(self) -> str | None:
        """How the registry was chosen, as the user would change it; None if local."""
        if self.uri is not None:
            return "given with --uri"
        if self.profile is not None:
            return f"--profile {self.profile}"
        if self.directory is not None:
            return None
        from .settings import settings

        configured = settings()
        for name in ("uri", "profile"):
            if getattr(configured, name):
                return f"from $CHX_MASKS_{name.upper()}; unset it to use the embedded registry"
        return None

    def close(self) -> None:
        if self._registry is not None and self._owned:
            self._registry.close()


def _local_server(directory: Path) -> MaskRegistry | None:
    """The registry in ``directory`` through its local server; None if that is off."""
    from . import _local

    if not _local.enabled():
        return None
    return _local.connect(Path(directory).expanduser())


def _embedded(directory: Path) -> MaskRegistry:
    """The embedded registry in ``directory``, through its local server when enabled."""
    from ._registry import MaskRegistry

    return _local_server(directory) or MaskRegistry.embedded(Path(directory).expanduser())


pass_state = click.make_pass_decorator(_State)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chx-masks")
@click.option(
    "--uri",
    metavar="URI",
    default=None,
    help="tiled URI of the registry container (default: $CHX_MASKS_URI).",
)
@click.option(
    "--api-key",
    metavar="KEY",
    default=None,
    help="API key for --uri (default: $CHX_MASKS_API_KEY). Other users of the "
    "machine see it in `ps`: prefer $CHX_MASKS_API_KEY or --api-key-file.",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the API key for --uri from this file (its first line).",
)
@click.option(
    "--profile",
    metavar="NAME",
    default=None,
    help="A tiled profile naming the registry (default: $CHX_MASKS_PROFILE).",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="An embedded registry in this directory "
    "(default: $CHX_MASKS_DIR or the user data directory).",
)
@click.pass_context
def main(
    ctx: click.Context,
    uri: str | None,
    api_key: str | None,
    api_key_file: Path | None,
    profile: str | None,
    directory: Path | None,
) -> None:
    """Detector masks for CHX: a versioned registry on tiled.

    A mask is True where a pixel is kept. Every version has a uid that
    resolves forever; names are (detector, name) lineages with versions.
    """
    if api_key_file is not None:
        if api_key is not None:
            raise click.UsageError("Give --api-key or --api-key-file, not both.")
        api_key = _read_key_file(api_key_file)
    state = _State(uri, api_key, profile, directory)
    ctx.obj = state
    ctx.call_on_close(state.close)


# ------------------------------------------------------------------ output


def _json_option(func: Callable) -> Callable:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table."
    )(func)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _percent(fraction: float) -> str:
    """A percentage that never reads 0% or 100% unless it is exactly that.

    >>> _percent(0.05), _percent(2 / 529_420), _percent(1 - 2 / 529_420), _percent(0)
    ('5.000%', '0.00038%', '>99.999%', '0%')
    """
    if fraction <= 0 or fraction >= 1:
        return f"{fraction:.0%}"
    shown = f"{fraction:.3%}"
    if shown == "0.000%":
        return f"{fraction * 100:.2g}%"
    if shown == "100.000%":
        return ">99.999%"
    return shown


def _masked(pixels: int, total: int) -> str:
    """``'2 pixels (0.00038%)'``: the count, then a percentage that is not misleading."""
    return f"{pixels:,} pixel{'' if pixels == 1 else 's'} ({_percent(pixels / total)})"


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] = ()
) -> None:
    """Aligned columns; the header bold when stdout is a terminal."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    right = set(right)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    click.echo(click.style(line(headers), bold=True))
    for row in rows:
        click.echo(line(row))


def _record_json(record: MaskRecord) -> dict[str, Any]:
    # "state", not "active": an *active set* is another thing (``chx-masks active``).
    return {
        "uid": record.uid,
        "detector": record.detector,
        "name": record.name,
        "version": record.version,
        "state": _state_of(record),
        "current": record.active,
        "registered_at": record.registered_at,
        "created_by": record.created_by,
        "superseded_at": record.superseded_at,
        "retired_at": record.retired_at,
        "sha256": record.sha256,
        "shape": list(record.shape),
        "masked_pixels": record.masked_pixels,
        "masked_fraction": record.masked_fraction,
        "metadata": dict(record.metadata),
    }


def _state_of(record: MaskRecord) -> str:
    if record.retired_at is not None:
        return "retired"
    return "current" if record.superseded_at is None else "superseded"


def _active_json(active: ActiveSet, missing: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "detector": active.detector,
        "names": list(active.names),
        "version": active.version,
        "at": active.at,
        "note": active.note,
        "created_by": active.created_by,
        "missing": list(missing),
    }


def _missing(reg: MaskRegistry, sets: Iterable[ActiveSet]) -> dict[str, dict[str, str]]:
    """``{detector: {name: why}}`` for active names that are not a current mask.

    Runs cannot resolve such a name, so every listing of active sets flags it.
    One query per detector; a second per missing name says why (rare).
    """
    from ._errors import MaskNotFoundError

    found: dict[str, dict[str, str]] = {}
    for active in sets:
        for name in reg.missing_names(active.detector, active.names) if active.names else ():
            try:
                reg.history(active.detector, name)
                why = "retired"
            except MaskNotFoundError:
                why = "never registered"
            found.setdefault(active.detector, {})[name] = why
    return found


def _names_flagged(names: Sequence[str], missing: dict[str, str]) -> str:
    """``'gaps, beamstop (not registered: retired), ghost (not registered)'``."""
    why = {
        n: " (not registered: retired)" if w == "retired" else " (not registered)"
        for n, w in missing.items()
    }
    return ", ".join(n + why.get(n, "") for n in names)


def _missing_advice(missing: dict[str, dict[str, str]]) -> None:
    for detector, names in missing.items():
        them = "it" if len(names) == 1 else "them"
        click.echo(
            f"Runs on {detector} cannot resolve {', '.join(names)}: register {them}, "
            f"or choose masks without {them} with `chx-masks activate {detector} "
            "NAME...`."
        )


def _composite_json(composite: CompositeMask) -> dict[str, Any]:
    explanation = composite.explain()
    return {
        "detector": composite.detector,
        **composite.provenance(),
        "as_of": composite.as_of,
        "masked_pixels": explanation.masked_pixels,
        "masked_fraction": explanation.masked_pixels / explanation.total_pixels,
        "components": [c.__dict__ for c in explanation.components],
    }


def _wrote(kind: str, path: Path, how: str | None = None) -> None:
    click.echo(f"wrote {kind} {path}" + (f" ({how})" if how else ""))


def _parse_meta(pairs: Sequence[str]) -> dict[str, Any] | None:
    """``KEY=VALUE`` pairs; a value that parses as JSON is taken as JSON."""
    if not pairs:
        return None
    metadata: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MaskValidationError(f"--meta takes KEY=VALUE, not {pair!r}.")
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return metadata


_meta_option = click.option(
    "-m",
    "--meta",
    "meta",
    multiple=True,
    metavar="KEY=VALUE",
    help="Metadata stored with the version (repeatable; JSON values allowed). With an "
    "update, -m replaces all of the previous version's metadata; without -m it is kept.",
)
_png_option = click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a picture of the mask to this PNG file.",
)


def _picture_of(reg: MaskRegistry, record: MaskRecord, png: Path | None) -> Path | None:
    """Draw one registered version to ``png`` (if asked) and return where."""
    if png is None:
        return None
    from ._plot import mask_png, record_title

    mask = reg.get_mask_by_uid(record.uid).compute()
    return mask_png(mask, png, title=record_title(record))


def _file_options(func: Callable) -> Callable:
    func = click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default=None,
        help="File format (default: from the suffix).",
    )(func)
    func = click.option(
        "--convention",
        type=click.Choice(CONVENTIONS),
        default=None,
        help="What nonzero means in the file (default: the format's own).",
    )(func)
    func = click.option(
        "--dataset", default=None, metavar="PATH", help="Array inside an .npz or HDF5/NeXus file."
    )(func)
    return func


def _report_version(
    reg: MaskRegistry,
    uid: str,
    verb: str,
    as_json: bool,
    png: Path | None = None,
    replaced: dict[str, Any] | None = None,
) -> None:
    """One line for a new version; ``replaced``: the metadata it no longer carries."""
    record = reg.describe(uid)
    picture = _picture_of(reg, record, png)
    if as_json:
        extra = {} if replaced is None else {"metadata_replaced": {"dropped": replaced}}
        _print_json({**_record_json(record), **extra, "png": picture})
        return
    by = f"  by {record.created_by}" if record.created_by else ""
    click.echo(
        f"{verb} {record.detector}/{record.name} v{record.version}  uid {record.uid}  "
        f"masks {_masked(record.masked_pixels, record.shape[0] * record.shape[1])}"
        f"{by}"
    )
    if replaced is not None:
        kept = {k: v for k, v in record.metadata.items() if k != "source"}
        dropped = f"; dropped {json.dumps(replaced, default=str)}" if replaced else ""
        click.echo(f"  metadata replaced: now {json.dumps(kept, default=str)}{dropped}")
    if picture is not None:
        _wrote("picture", picture)


def _earlier_metadata(
    reg: MaskRegistry, detector: str, name: str, metadata: dict[str, Any] | None, update: bool
) -> dict[str, Any] | None:
    """What an update with ``-m`` drops of the current version's metadata (None: no -m)."""
    if not update or metadata is None:
        return None
    current = reg.describe(reg.get_mask_uid(detector, name)).metadata
    return {k: v for k, v in current.items() if k != "source" and k not in metadata}


def _read_kw(fmt: str | None, convention: str | None, dataset: str | None) -> dict[str, Any]:
    return {
        k: v
        for k, v in (("format", fmt), ("convention", convention), ("dataset", dataset))
        if v is not None
    }


_force_option = click.option(
    "--force",
    is_flag=True,
    help="Add the version even if it holds exactly the current version's mask.",
)


# ---------------------------------------------------------------- commands
# Each module adds its commands to ``main``; imported last, as they use the above.
from . import _cli_admin, _cli_files, _cli_generate, _cli_masks  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    # Run as a script this module is not chx_masks._cli, whose main has the commands.
    from chx_masks._cli import main as _main

    _main()
