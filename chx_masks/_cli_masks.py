"""``chx-masks`` commands that show masks, detectors, composites and active sets, and change them.

Registered on :func:`chx_masks._cli.main` when :mod:`chx_masks._cli` is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._cli import (
    FALLBACK,
    _active_json,
    _composite_json,
    _Failure,
    _Group,
    _json_option,
    _masked,
    _meta_option,
    _missing,
    _missing_advice,
    _names_flagged,
    _parse_meta,
    _percent,
    _picture_of,
    _png_option,
    _print_json,
    _record_json,
    _State,
    _state_of,
    _table,
    _when,
    _wrote,
    main,
    pass_state,
)

if TYPE_CHECKING:
    from ._records import ActiveSet, MaskRecord


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


@main.command()
@click.argument("detector")
@click.argument("name")
@click.argument("old", type=click.IntRange(0), required=False)
@click.argument("new", type=click.IntRange(0), required=False)
@_png_option
@_json_option
@pass_state
def diff(
    state: _State,
    detector: str,
    name: str,
    old: int | None,
    new: int | None,
    png: Path | None,
    as_json: bool,
) -> None:
    """Versions OLD and NEW of DETECTOR/NAME side by side: the pixels newly
    masked and newly kept (default: the last two versions; OLD alone: OLD
    against the latest). --png draws them in two colours."""
    change = state.registry.diff(detector, name, old, new)
    assert change.old is not None and change.new is not None
    picture = None
    if png is not None:
        from ._diff import diff_png

        title = f"{detector}/{name} v{change.old.version} -> v{change.new.version}"
        picture = diff_png(change, png, title=title)
    figures = {
        "newly masked": change.newly_masked_pixels,
        "newly kept": change.newly_kept_pixels,
        "masked in both": change.masked_in_both_pixels,
    }
    if as_json:
        _print_json(
            {
                "old": _record_json(change.old),
                "new": _record_json(change.new),
                **{what.replace(" ", "_"): n for what, n in figures.items()},
                "png": picture,
            }
        )
        return
    total = change.new_mask.size
    click.echo(
        f"{detector}/{name} v{change.old.version} ({change.old.uid[:8]}) -> "
        f"v{change.new.version} ({change.new.uid[:8]})"
    )
    _table(
        ["pixels", "count", "share"],
        [[what, f"{n:,}", _percent(n / total)] for what, n in figures.items()],
        right=[1, 2],
    )
    if picture is not None:
        _wrote("picture", picture)


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
