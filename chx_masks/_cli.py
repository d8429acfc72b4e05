"""The ``chx-masks`` command line; imports heavy libraries only inside commands.

Used from a terminal at the beamline. Expected failures print one line and
exit with status 1; no traceback.
"""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chx-masks")
def main() -> None:
    """Detector masks for CHX: a versioned registry on tiled."""


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Embedded registry directory (default: $CHX_MASKS_DIR or the "
              "user data directory).")
def demo(directory: str | None) -> None:
    """Register, compose, version and retire masks on the default registry."""
    from ._default import default_registry, set_default_registry
    from ._demo import run_demo
    from ._errors import ChxMasksError

    try:
        if directory is not None:
            set_default_registry(directory)
        run_demo(default_registry(), echo=click.echo)
    except ChxMasksError as err:
        click.echo(f"chx-masks: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
