"""``chx-masks generate``: the group and its subcommands, each making a mask and registering it.

Registered on :func:`chx_masks._cli.main` when :mod:`chx_masks._cli` is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ._cli import (
    _earlier_metadata,
    _Failure,
    _force_option,
    _Group,
    _json_option,
    _masked,
    _meta_option,
    _parse_meta,
    _percent,
    _png_option,
    _print_json,
    _report_version,
    _State,
    _wrote,
    main,
    pass_state,
)
from ._errors import MaskValidationError


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
