"""A ``chx-masks`` command in a fresh process, and what it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CODE = (
    "import json, sys\n"
    "from chx_masks._cli import main\n"
    "try:\n"
    "    main(sys.argv[1:], standalone_mode=False)\n"
    "finally:\n"
    "    print(json.dumps(sorted(sys.modules)))\n"
)


def command_modules(args: list[str], **env: str) -> tuple[str, set[str]]:
    """Run ``chx-masks ARGS`` in a fresh process: (its output, its sys.modules).

    ``env`` is added to this process's environment.
    """
    done = subprocess.run(
        [sys.executable, "-c", _CODE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    output, _, modules = done.stdout.rstrip("\n").rpartition("\n")
    return output, set(json.loads(modules))
