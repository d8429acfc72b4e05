"""The ``chx-masks`` command line; imports heavy libraries only inside commands.

Used from a terminal at the beamline. Expected failures print one line
(``chx-masks: <what was wrong and what to do>``, in the command line's words:
:attr:`ChxMasksError.cli_message`) and exit with status 1; no traceback.
``--json`` gives output a script can read. The registry is chosen as
everywhere in chx-masks (``--uri``/``--profile``/``--dir``, else
``CHX_MASKS_URI``/``CHX_MASKS_PROFILE``, else the embedded default).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._errors import (
    ChxMasksError,
    MaskIntegrityError,
    MaskValidationError,
    RegistryUnavailableError,
)

if TYPE_CHECKING:
    from ._formats import Convention, Format
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


# ---------------------------------------------------------------- listings


def _list_detectors(state: _State, as_json: bool) -> None:
    reg = state.registry
    found = reg.detectors()
    active = reg.active_sets()
    missing = _missing(reg, active.values())
    if as_json:
        _print_json(
            [
                {
                    "detector": d.name,
                    "shape": list(d.shape),
                    "builtin": d.builtin,
                    "metadata": dict(d.metadata),
                    "active": list(active[d.name].names) if d.name in active else None,
                    "missing": list(missing.get(d.name, {})),
                }
                for d in found
            ]
        )
        return
    _table(
        ["detector", "shape", "pixels", "built in", "active masks"],
        [
            [
                d.name,
                f"{d.shape[0]} x {d.shape[1]}",
                f"{d.pixels:,}",
                "yes" if d.builtin else "no",
                _names_flagged(active[d.name].names, missing.get(d.name, {}))
                if d.name in active
                else "",
            ]
            for d in found
        ],
        right=[2],
    )
    _missing_advice(missing)


@main.command()
@_json_option
@pass_state
def detectors(state: _State, as_json: bool) -> None:
    """The detectors the registry knows, their shapes and active masks."""
    _list_detectors(state, as_json)


@main.group(cls=_Group)
def detector() -> None:
    """Add a detector (`chx-masks detectors` lists them)."""


@detector.command("add")
@click.argument("name")
@click.argument("rows", type=click.IntRange(min=1))
@click.argument("cols", type=click.IntRange(min=1))
@_meta_option
@_json_option
@pass_state
def detector_add(
    state: _State, name: str, rows: int, cols: int, meta: tuple[str, ...], as_json: bool
) -> None:
    """Make detector NAME known, with its frame shape ROWS x COLS.

    NAME is the image data key its runs record (e.g. pilatus800k_image).
    Adding a known detector again with the same shape changes nothing.
    """
    from ._errors import DetectorNotFoundError

    reg = state.registry
    try:
        known = reg.get_detector(name)
    except DetectorNotFoundError:
        known = None
    record = reg.register_detector(name, (rows, cols), metadata=_parse_meta(meta))
    if as_json:
        _print_json(
            {
                "detector": record.name,
                "shape": list(record.shape),
                "builtin": record.builtin,
                "metadata": dict(record.metadata),
                "created": known is None,
            }
        )
        return
    verb = "added detector" if known is None else "already known:"
    click.echo(
        f"{verb} {record.name} {record.shape[0]} x {record.shape[1]} ({record.pixels:,} pixels)"
    )


@detector.command("list")
@_json_option
@pass_state
def detector_list(state: _State, as_json: bool) -> None:
    """The detectors the registry knows (the same as `chx-masks detectors`)."""
    _list_detectors(state, as_json)


@main.command("list")
@click.argument("detector", required=False)
@click.option("--all", "show_all", is_flag=True, help="Also show retired lineages.")
@_json_option
@pass_state
def list_(state: _State, detector: str | None, show_all: bool, as_json: bool) -> None:
    """Current version of every mask (of DETECTOR, if given)."""
    records = state.registry.search(detector=detector, include_retired=show_all)
    if detector is not None:
        state.registry.get_detector(detector)
    if as_json:
        _print_json([_record_json(r) for r in records])
        return
    if not records:
        click.echo("No masks registered" + (f" for {detector}." if detector else "."))
        return
    headers = ["detector", "name", "version", "uid", "masked", "registered at"]
    rows = [
        [r.detector, r.name, r.version, r.uid[:8], _masked_short(r), _when(r.registered_at)]
        + ([_state_of(r)] if show_all else [])
        for r in records
    ]
    _table(headers + (["state"] if show_all else []), rows, right=[2, 4])


def _masked_short(record: MaskRecord) -> str:
    """``'2 (0.00038%)'``: masked pixels and their share, for a table column."""
    return f"{record.masked_pixels:,} ({_percent(record.masked_fraction)})"


@main.command()
@click.argument("detector")
@click.argument("name")
@_json_option
@pass_state
def history(state: _State, detector: str, name: str, as_json: bool) -> None:
    """Every version of DETECTOR/NAME, retired ones included."""
    records = state.registry.history(detector, name)
    if as_json:
        _print_json([_record_json(r) for r in records])
        return
    _table(
        ["version", "uid", "masked", "registered at", "by", "until", "state"],
        [
            [
                r.version,
                r.uid,
                _masked_short(r),
                _when(r.registered_at),
                r.created_by or "",
                _when(r.valid_until),
                _state_of(r),
            ]
            for r in records
        ],
        right=[0, 2],
    )


def _picture_of(reg: MaskRegistry, record: MaskRecord, png: Path | None) -> Path | None:
    """Draw one registered version to ``png`` (if asked) and return where."""
    if png is None:
        return None
    from ._plot import mask_png, record_title

    mask = reg.get_mask_by_uid(record.uid).compute()
    return mask_png(mask, png, title=record_title(record))


@main.command()
@click.argument("detector", required=False)
@click.argument("name", required=False)
@click.option("--version", "version", type=int, default=None, help="An exact version.")
@click.option(
    "--as-of", default=None, metavar="TIME", help="The version active at this time (ISO 8601)."
)
@click.option("--uid", default=None, help="Any mask ever registered, by uid.")
@_png_option
@_json_option
@pass_state
def show(
    state: _State,
    detector: str | None,
    name: str | None,
    version: int | None,
    as_of: str | None,
    uid: str | None,
    png: Path | None,
    as_json: bool,
) -> None:
    """One mask version: its record, metadata and (with --png) a picture."""
    reg = state.registry
    if uid is not None:
        if detector is not None or version is not None or as_of is not None:
            raise click.UsageError(
                "--uid names one version: give no DETECTOR, NAME, --version or --as-of with it."
            )
    elif detector is None or name is None:
        raise click.UsageError("Give DETECTOR NAME (or --uid UID).")
    else:
        uid = reg.get_mask_uid(detector, name, version=version, as_of=as_of)
    record = reg.describe(uid)
    picture = _picture_of(reg, record, png)
    if as_json:
        _print_json({**_record_json(record), "png": picture})
        return
    click.echo(click.style(f"{record.detector}/{record.name} v{record.version}", bold=True))
    fields = [
        ("uid", record.uid),
        ("state", _state_of(record)),
        ("registered at", _when(record.registered_at)),
        ("registered by", record.created_by or ""),
        ("valid until", _when(record.valid_until) or "(current)"),
        ("shape", f"{record.shape[0]} x {record.shape[1]}"),
        ("masked", _masked(record.masked_pixels, record.shape[0] * record.shape[1])),
        ("sha256", record.sha256),
    ]
    for label, value in fields:
        click.echo(f"  {label:<14} {value}")
    if record.metadata:
        click.echo("  metadata")
        for line in json.dumps(dict(record.metadata), indent=2, default=str).splitlines():
            click.echo(f"    {line}")
    if picture is not None:
        _wrote("picture", picture)


# ------------------------------------------------------------------ writes


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


def _file_command(command: str, update: bool, doc: str) -> None:
    """Add ``register`` or ``update``: the same options, one verb apart."""

    def force_option(func: Callable) -> Callable:
        return _force_option(func) if update else func

    @main.command(command, help=doc)
    @click.argument("detector")
    @click.argument("name")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @_file_options
    @_meta_option
    @force_option
    @_png_option
    @_json_option
    @pass_state
    def from_file(
        state: _State,
        detector: str,
        name: str,
        file: Path,
        fmt: str | None,
        convention: str | None,
        dataset: str | None,
        meta: tuple[str, ...],
        png: Path | None,
        as_json: bool,
        force: bool = False,
    ) -> None:
        from .io import register_from_file

        metadata = _parse_meta(meta)
        replaced = _earlier_metadata(state.registry, detector, name, metadata, update)
        uid = register_from_file(
            state.registry,
            detector,
            name,
            file,
            update=update,
            metadata=metadata,
            force=force,
            **_read_kw(fmt, convention, dataset),
        )
        _report_version(
            state.registry, uid, "updated" if update else "registered", as_json, png, replaced
        )


_file_command(
    "register", False, "Start the lineage DETECTOR/NAME with the mask in FILE (version 0)."
)
_file_command(
    "update",
    True,
    "Add the next version of DETECTOR/NAME from FILE. The "
    "previous version's metadata is kept, unless -m is given: then -m replaces "
    "all of it. A file holding exactly the current mask is refused (--force adds "
    "it anyway).",
)


@main.command("import")
@click.argument("detector")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@_file_options
@click.option(
    "--update",
    "update_existing",
    is_flag=True,
    help="Add a version to names that exist instead of skipping them.",
)
@click.option(
    "--force",
    is_flag=True,
    help="With --update, add a version even where the file holds exactly the "
    "current mask (reported as unchanged otherwise).",
)
@_json_option
@pass_state
def import_(
    state: _State,
    detector: str,
    files: tuple[Path, ...],
    fmt: str | None,
    convention: str | None,
    dataset: str | None,
    update_existing: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Register many mask FILES for DETECTOR, each named after its file stem.

    Every file is read and checked first: one bad file refuses the whole
    import, and nothing is registered. A file holding exactly a name's
    current mask is reported as unchanged; with --update, other files of
    existing names add a version.
    """
    from ._content import check_name, mask_sha256
    from ._errors import MaskExistsError
    from ._sources import register_with_source
    from .io import _read_for

    reg = state.registry
    reg.get_detector(detector)
    names = [f.stem for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MaskValidationError(f"Several files would be named {repeated}; rename them.")
    for name in names:  # a bad name refuses the import before anything is written
        check_name(name, "mask name (the file's stem)")
    loaded = [
        (path, *_read_for(reg, detector, path, _read_kw(fmt, convention, dataset))[:2])
        for path in files
    ]
    current = {r.name: r for r in reg.search(detector=detector)}
    done: list[dict[str, Any]] = []

    def report(path: Path, outcome: str, uid: str | None, version: int | None) -> None:
        done.append(
            {
                "file": str(path),
                "name": path.stem,
                "outcome": outcome,
                "uid": uid,
                "version": version,
            }
        )

    def update(path: Path, array: Any, source: dict[str, Any]) -> None:
        try:
            uid = register_with_source(
                reg, detector, path.stem, array, source, update=True, force=force
            )
        except MaskExistsError:  # another writer has just registered this very mask
            now = reg.describe(reg.get_mask_uid(detector, path.stem))
            report(path, "unchanged", now.uid, now.version)
            return
        report(path, "updated", uid, reg.describe(uid).version)

    with click.progressbar(loaded, label="importing", file=sys.stderr) as bar:
        for path, array, source in bar:
            now = current.get(path.stem)
            if now is None:
                try:
                    uid = register_with_source(reg, detector, path.stem, array, source)
                except MaskExistsError:  # registered since the listing above
                    if update_existing:
                        update(path, array, source)
                    else:
                        report(path, "skipped", None, None)
                    continue
                report(path, "registered", uid, reg.describe(uid).version)
            elif now.sha256 == mask_sha256(array) and not (update_existing and force):
                report(path, "unchanged", now.uid, now.version)
            elif update_existing:
                update(path, array, source)
            else:
                report(path, "skipped", None, None)
    if as_json:
        _print_json(done)
        return
    _table(
        ["file", "name", "outcome", "version", "uid"],
        [
            [
                d["file"],
                d["name"],
                d["outcome"],
                "" if d["version"] is None else d["version"],
                d["uid"] or "(exists; --update adds a version)",
            ]
            for d in done
        ],
        right=[3],
    )


@main.command()
@click.argument("detector")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Also when the detector's active set names it: the name is first "
    "removed from the active set (a new version of it).",
)
@_json_option
@pass_state
def delete(state: _State, detector: str, name: str, yes: bool, force: bool, as_json: bool) -> None:
    """Retire DETECTOR/NAME: gone from listings; every uid stays readable.

    A name the detector's active set uses is refused (every later run would
    fail to resolve it) unless --force is given.
    """
    reg = state.registry
    current = reg.describe(reg.get_mask_uid(detector, name))
    active = reg.active_set(detector)
    in_use = active is not None and name in active.names
    if in_use and not force:
        # The registry refuses with the sets that name it and both ways out;
        # no question is asked for a deletion that cannot happen.
        reg.delete_mask(detector, name, force=False)
    if not yes:
        also = ""
        if in_use and active is not None:
            rest = [n for n in active.names if n != name]
            also = (
                f" The active set of {detector} (v{active.version}: "
                f"{', '.join(active.names)}) names it; it becomes "
                f"{', '.join(rest) or '(none)'}."
            )
        click.confirm(
            f"Retire {detector}/{name} (v{current.version})?{also} Its uids stay readable",
            abort=True,
        )
    last = reg.delete_mask(detector, name, force=force)
    after = reg.active_set(detector) if in_use else None
    if as_json:
        _print_json(
            {**_record_json(last), "active_set": None if after is None else _active_json(after)}
        )
        return
    click.echo(
        f"retired {detector}/{name} at v{last.version}; uid {last.uid} still reads "
        "with `chx-masks show --uid`."
    )
    if after is not None:
        click.echo(f"active for {detector} from the next run: {_active_words(after)}")


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
@click.argument("detector")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--version", "version", type=int, default=None, help="An exact version.")
@click.option("--uid", default=None, help="A uid of DETECTOR/NAME instead of the current one.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="File format (default: from the suffix).",
)
@click.option(
    "--convention",
    type=click.Choice(CONVENTIONS),
    default=None,
    help="What nonzero means in the file (default: the format's own).",
)
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@_json_option
@pass_state
def export(
    state: _State,
    detector: str,
    name: str,
    file: Path,
    version: int | None,
    uid: str | None,
    fmt: Format | None,  # click.Choice(FORMATS) gives one of these or None
    convention: Convention | None,  # likewise click.Choice(CONVENTIONS)
    force: bool,
    as_json: bool,
) -> None:
    """Write DETECTOR/NAME to FILE in a format other tools read (pyFAI, Fit2D, ...).

    EDF, Fit2D .msk, NeXus and index lists are written nonzero = masked (as
    pyFAI, fabio and Eiger read them); .npy/.npz as bool, True = kept. A
    TIFF needs --convention: masked-nonzero for pyFAI and fabio, keep for
    chx-masks.
    """
    from ._formats import _convention_words, _resolve_format
    from .io import export_convention, export_mask

    if file.exists() and not force:
        raise _Failure(f"{file} exists; add --force to overwrite it.")
    reg = state.registry
    if uid is None:  # one exact version, so what is reported is what was written
        uid, version = reg.get_mask_uid(detector, name, version=version), None
    path = export_mask(
        reg, detector, name, file, version=version, uid=uid, format=fmt, convention=convention
    )
    written = _resolve_format(path, fmt)
    used = convention or export_convention(written)
    assert used is not None  # export_mask refused a format without a convention of its own
    record = reg.describe(uid)
    if as_json:
        _print_json(
            {
                "path": path,
                "format": written,
                "convention": used,
                "meaning": _convention_words(written, used),
                "uid": record.uid,
                "detector": record.detector,
                "name": record.name,
                "version": record.version,
            }
        )
        return
    _wrote(
        "mask",
        path,
        f"{record.detector}/{record.name} v{record.version}; {_convention_words(written, used)}",
    )


# -------------------------------------------------------------- composites


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
@click.argument("detector")
@click.argument("names", nargs=-1)
@click.option(
    "--as-of", default=None, metavar="TIME", help="The versions active at this time (ISO 8601)."
)
@click.option("--explain", is_flag=True, help="What each component masks.")
@_png_option
@_json_option
@pass_state
def composite(
    state: _State,
    detector: str,
    names: tuple[str, ...],
    as_of: str | None,
    explain: bool,
    png: Path | None,
    as_json: bool,
) -> None:
    """The AND of NAMES for DETECTOR (default: the detector's active set)."""
    reg = state.registry
    chosen = list(names)
    if not chosen:
        active = reg.active_set(detector, as_of=as_of)
        if active is None or not active.names:
            raise _Failure(
                f"No mask names given and {detector} has no active set; give "
                f"names or choose them with `chx-masks activate {detector} NAME...`."
            )
        chosen = list(active.names)
    result = reg.resolve_composite(detector, chosen, as_of=as_of)
    picture = None
    if png is not None:
        from ._plot import composite_png

        picture = composite_png(result, png)
    if as_json:
        _print_json({**_composite_json(result), "png": picture})
        return
    explanation = result.explain()
    parts = [f"{n} v{v}" for n, v in zip(result.names, result.versions, strict=True)]
    click.echo(f"{detector}: {' & '.join(parts)}")
    click.echo(
        f"  masked {explanation.masked_pixels:,} pixels "
        f"({_percent(explanation.masked_pixels / explanation.total_pixels)}); "
        f"sha256 {result.sha256}"
    )
    click.echo(f"  uids {', '.join(result.uids)}")
    if explain:
        click.echo("  " + str(explanation).replace("\n", "\n  "))
    if picture is not None:
        _wrote("picture", picture)


@main.command()
@click.argument("detector")
@click.argument("names", nargs=-1)
@click.option(
    "--none",
    "clear",
    is_flag=True,
    help="Withdraw the choice: runs use the preprocessor's configured fallback "
    "masks (the profile's CHX_MASKS_FALLBACK).",
)
@click.option("--note", default=None, help="Why (e.g. the sample); kept in the history.")
@_json_option
@pass_state
def activate(
    state: _State,
    detector: str,
    names: tuple[str, ...],
    clear: bool,
    note: str | None,
    as_json: bool,
) -> None:
    """Choose the masks applied to DETECTOR from the next run on.

    Every IPython session and callback reads the choice at its next run
    start; nothing needs restarting.
    """
    if clear == bool(names):
        raise click.UsageError("Give mask NAMES, or --none to withdraw the choice.")
    active = state.registry.activate(detector, list(names), note=note)
    if as_json:
        _print_json(_active_json(active))
        return
    click.echo(f"active for {detector} from the next run: {_active_words(active)}")


def _active_words(active: ActiveSet) -> str:
    """``'a, b (active set v1, 2026-11-25 09:30 UTC, sample B)'``; the detector is said before."""
    note = f", {active.note}" if active.note else ""
    said = f"(active set v{active.version}, {active.at:%Y-%m-%d %H:%M} UTC{note})"
    if not active.names:
        return f"no masks chosen {said}: {FALLBACK}."
    return f"{', '.join(active.names)} {said}"


@main.command()
@click.argument("detector", required=False)
@click.option("--history", "show_history", is_flag=True, help="Every change, oldest first.")
@_json_option
@pass_state
def active(state: _State, detector: str | None, show_history: bool, as_json: bool) -> None:
    """Which masks apply to each detector now (with --history, every change).

    A name that is no longer a current mask (retired, or never registered)
    is flagged: runs cannot resolve it.
    """
    reg = state.registry
    if detector is not None:
        current = reg.active_set(detector)
        now = {} if current is None else {detector: current}
    else:
        now = reg.active_sets()
    if show_history:
        sets = [s for det in sorted(now) for s in reg.active_history(det)]
    else:
        sets = [now[det] for det in sorted(now)]
    # Whether a name resolves is a fact about now: only current sets are flagged.
    missing = _missing(reg, now.values())

    def flagged(s: ActiveSet) -> dict[str, str]:
        return missing.get(s.detector, {}) if s.version == now[s.detector].version else {}

    if as_json:
        _print_json([_active_json(s, [n for n in s.names if n in flagged(s)]) for s in sets])
        return
    if not sets:
        click.echo(f"No active sets: {FALLBACK}.")
        return
    _table(
        ["detector", "version", "since", "by", "masks", "note"],
        [
            [
                s.detector,
                s.version,
                _when(s.at),
                s.created_by or "",
                _names_flagged(s.names, flagged(s)) or "(none)",
                s.note or "",
            ]
            for s in sets
        ],
        right=[1],
    )
    if any(not s.names for s in now.values()):
        click.echo(f"(none): {FALLBACK}.")
    _missing_advice(missing)


# -------------------------------------------------------------- generators


@main.group(cls=_Group)
def generate() -> None:
    """Make a mask (module gaps, chip lines, hot pixels, shapes) and register it."""


def _generator_options(func: Callable) -> Callable:
    # click's decorators, each typed by what it wraps.
    options: list[Callable[[Any], Any]] = [
        click.argument("detector"),
        click.argument("name"),
        click.option(
            "--grow",
            "grow_by",
            type=int,
            default=0,
            help="Grow the masked region by this many pixels.",
        ),
        click.option(
            "--update",
            "update_existing",
            is_flag=True,
            help="Add a version to an existing DETECTOR/NAME.",
        ),
        _force_option,
        click.option("--dry-run", is_flag=True, help="Make the mask; register nothing."),
        _meta_option,
        _png_option,
        _json_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _finish_generated(
    state: _State,
    made: Any,
    detector: str,
    name: str,
    grow_by: int,
    update_existing: bool,
    force: bool,
    dry_run: bool,
    meta: tuple[str, ...],
    png: Path | None,
    as_json: bool,
) -> None:
    from . import generate as gen

    if grow_by:
        made = gen.grow(made, grow_by)
    reg = state.registry
    shape = reg.get_detector(detector).shape
    if made.mask.shape != shape:
        raise MaskValidationError(
            f"The generated mask is {made.mask.shape}, but {detector} frames are {shape}."
        )
    if dry_run:
        picture = None
        if png is not None:
            from ._plot import mask_png

            fraction = made.masked_pixels / made.mask.size
            picture = mask_png(
                made.mask,
                png,
                title=f"{detector}/{name} (not registered)  masked {_percent(fraction)}",
            )
        if as_json:
            _print_json(
                {
                    "detector": detector,
                    "name": name,
                    "masked_pixels": made.masked_pixels,
                    "source": made.source,
                    "png": picture,
                }
            )
        else:
            click.echo(
                f"would register {detector}/{name}: masks "
                f"{_masked(made.masked_pixels, made.mask.size)}"
            )
            if picture is not None:
                _wrote("picture", picture)
        return
    metadata = _parse_meta(meta)
    replaced = _earlier_metadata(reg, detector, name, metadata, update_existing)
    uid = made.register(reg, detector, name, update=update_existing, metadata=metadata, force=force)
    _report_version(
        reg, uid, "updated" if update_existing else "registered", as_json, png, replaced
    )


@generate.command("module-gaps")
@_generator_options
@pass_state
def generate_module_gaps(state: _State, detector: str, name: str, **options: Any) -> None:
    """The inter-module gaps of a CHX Eiger (from pyFAI's geometry)."""
    from . import generate as gen

    _finish_generated(state, gen.module_gaps(detector), detector, name, **options)


@generate.command("chip-lines")
@_generator_options
@click.option("--width", type=int, default=1, help="Pixels masked each side of a boundary.")
@pass_state
def generate_chip_lines(
    state: _State, detector: str, name: str, width: int, **options: Any
) -> None:
    """The double-size pixels along the chip boundaries of a CHX Eiger."""
    from . import generate as gen

    _finish_generated(state, gen.chip_lines(detector, width=width), detector, name, **options)


def _read_stack(path: Path, dataset: str | None) -> Any:
    """A (frames, rows, cols) stack from .npy or HDF5, read frame by frame with a bar."""
    import numpy as np

    if path.suffix.lower() == ".npy":
        source = np.load(path, mmap_mode="r")
        close = None
    else:
        try:
            from ._hdf5 import h5py_with_filters

            h5py = h5py_with_filters()
        except ImportError as err:
            raise _Failure(
                'Reading HDF5 needs h5py and hdf5plugin: pip install "chx-masks[io]".'
            ) from err
        try:
            handle = h5py.File(path, "r")
        except OSError as err:
            raise MaskValidationError(f"{path} is not an .npy or HDF5 file: {err}.") from err
        key = dataset or "/entry/data/data"
        if key not in handle:
            handle.close()
            raise MaskValidationError(f"{path} has no dataset {key}; give --dataset.")
        source, close = handle[key], handle.close
    try:
        if source.ndim != 3:
            raise MaskValidationError(
                f"{path} holds an array of shape {tuple(source.shape)}; a dark series is "
                "(frames, rows, cols)."
            )
        stack = np.empty(source.shape, dtype=source.dtype)
        with click.progressbar(
            range(source.shape[0]), label="reading darks", file=sys.stderr
        ) as bar:
            for i in bar:
                stack[i] = source[i]
    finally:
        if close is not None:
            close()
    return stack


@generate.command("hot-pixels")
@_generator_options
@click.argument("darks", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--threshold",
    type=float,
    required=True,
    help="Mean dark counts per frame above which a pixel is hot.",
)
@click.option("--dataset", default=None, help="HDF5 dataset (default /entry/data/data).")
@pass_state
def generate_hot_pixels(
    state: _State,
    detector: str,
    name: str,
    darks: Path,
    threshold: float,
    dataset: str | None,
    **options: Any,
) -> None:
    """Hot pixels from a dark series DARKS (.npy or HDF5, frames x rows x cols)."""
    from . import generate as gen

    made = gen.hot_dead_pixels(_read_stack(darks, dataset), hot_threshold=threshold)
    _finish_generated(state, made, detector, name, **options)


@generate.command("circle")
@_generator_options
@click.option("--center", nargs=2, type=float, required=True, metavar="ROW COL")
@click.option("--radius", type=float, required=True, help="In pixels.")
@pass_state
def generate_circle(
    state: _State,
    detector: str,
    name: str,
    center: tuple[float, float],
    radius: float,
    **options: Any,
) -> None:
    """A round region (e.g. a beamstop) masked."""
    from . import generate as gen

    shape = state.registry.get_detector(detector).shape
    _finish_generated(state, gen.circle(shape, center, radius), detector, name, **options)


@generate.command("rectangle")
@_generator_options
@click.option("--top-left", nargs=2, type=int, required=True, metavar="ROW COL")
@click.option("--bottom-right", nargs=2, type=int, required=True, metavar="ROW COL")
@pass_state
def generate_rectangle(
    state: _State,
    detector: str,
    name: str,
    top_left: tuple[int, int],
    bottom_right: tuple[int, int],
    **options: Any,
) -> None:
    """A rectangle masked (e.g. a beamstop arm)."""
    from . import generate as gen

    shape = state.registry.get_detector(detector).shape
    made = gen.rectangle(shape, top_left, bottom_right)
    _finish_generated(state, made, detector, name, **options)


@generate.command("polygon")
@_generator_options
@click.option(
    "--vertex",
    "vertices",
    nargs=2,
    type=float,
    multiple=True,
    required=True,
    metavar="ROW COL",
    help="Repeat for each vertex (at least 3).",
)
@pass_state
def generate_polygon(
    state: _State,
    detector: str,
    name: str,
    vertices: tuple[tuple[float, float], ...],
    **options: Any,
) -> None:
    """A polygon masked (even-odd rule)."""
    from . import generate as gen

    shape = state.registry.get_detector(detector).shape
    _finish_generated(state, gen.polygon(shape, list(vertices)), detector, name, **options)


# ------------------------------------------------------------------- serve


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


if __name__ == "__main__":  # pragma: no cover
    main()
