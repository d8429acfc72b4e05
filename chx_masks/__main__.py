"""``python -m chx_masks`` runs the same command line as ``chx-masks``."""

from ._cli import main

main()
