"""``python -m chx_masks``: the ``chx-masks`` command line run as a process of its own.

:func:`main` is the process's entry point; :func:`chx_masks._cli.main` is the
command line itself, which tests also call in their own process.
"""

from __future__ import annotations

import gc


def main() -> None:
    """Run the command line, then end the process without a final collection.

    Python's shutdown runs the cyclic garbage collector over every object
    still alive: about 0.3 s after a command on a server registry and 1 to
    2 s after one on an embedded registry (tiled's in-process server), to
    free memory the operating system takes back anyway. Freezing the
    collector first skips that; exit handlers still run, standard streams
    are still flushed, and objects outside reference cycles are still freed
    as before. Only a process that is ending does this, never a library call.
    """
    from ._cli import main as command_line

    try:
        command_line()
    finally:
        gc.freeze()


if __name__ == "__main__":
    main()
