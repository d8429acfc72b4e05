"""``chx-masks`` commands that read mask files into the registry and write them out.

``register``, ``update``, ``import`` and ``export``; registered on
:func:`chx_masks._cli.main` when :mod:`chx_masks._cli` is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._cli import (
    CONVENTIONS,
    FORMATS,
    _earlier_metadata,
    _Failure,
    _file_options,
    _force_option,
    _json_option,
    _meta_option,
    _parse_meta,
    _png_option,
    _print_json,
    _read_kw,
    _report_version,
    _State,
    _table,
    _wrote,
    main,
    pass_state,
)
from ._errors import MaskValidationError

if TYPE_CHECKING:
    from ._formats import Convention, Format
    from ._registry import MaskRegistry


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


def _read_all(
    reg: MaskRegistry, detector: str, files: tuple[Path, ...], read_kw: dict[str, Any]
) -> list[tuple[Path, Any, dict[str, Any]]]:
    """(file, mask, source) for each of ``files``; any bad name or file refuses them all."""
    from ._content import check_name
    from .io import _read_for

    reg.get_detector(detector)
    names = [f.stem for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MaskValidationError(f"Several files would be named {repeated}; rename them.")
    for name in names:  # a bad name refuses the import before anything is written
        check_name(name, "mask name (the file's stem)")
    loaded = []
    for path in files:
        array, source, _ = _read_for(reg, detector, path, dict(read_kw))
        loaded.append((path, array, source))
    return loaded


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
    from ._content import mask_sha256
    from ._errors import MaskExistsError
    from ._sources import register_with_source

    reg = state.registry
    loaded = _read_all(reg, detector, files, _read_kw(fmt, convention, dataset))
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
