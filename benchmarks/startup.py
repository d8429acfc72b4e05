"""Start-up of ``chx-masks`` commands: cold-process wall time and peak memory, side by side.

Run by developers, never by pytest (see ``benchmarks/README.md``)::

    python benchmarks/startup.py                     # 7 repetitions (~3-5 min)
    python benchmarks/startup.py --repeat 3 --only uri
    mkdir /tmp/head && git archive HEAD chx_masks | tar -x -C /tmp/head
    python benchmarks/startup.py --baseline /tmp/head   # this tree against HEAD

Each sample is a fresh process: ``chx-masks --help``; ``chx-masks --dir D
list`` (the embedded registry) three ways: with the directory's local server
already running (the default path, after a first command), as the first
command (which starts that server; it is stopped before each sample), and
with ``CHX_MASKS_LOCAL_SERVER=0`` (tiled's SQLite catalog served in the
command's own process); and ``chx-masks --uri URI list`` against a real
``chx-masks serve`` on 127.0.0.1. All registries hold the same masks.
Every command runs as the installed ``chx-masks`` script
(``chx_masks._cli:main``) and as ``python -m chx_masks``
(``chx_masks.__main__.main``, which also skips the collection at exit), and,
for each ``--baseline DIR``, both again with the ``chx_masks`` package in DIR
first on ``PYTHONPATH``. One repetition runs every (command, variant) once, in
an order rotated at each repetition, after one warm-up round; the figures are
medians. Wall time is from the start of the process to its exit; CPU time and
peak RSS are the child's own (``wait4``). The targets of issue 14 are for an
idle machine: the load average is printed with the results, and on a busy
machine the CPU seconds are the steadier figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

DETECTOR = "eiger500K_single_image"
API_KEY = "startupbenchmarkkey0123456789"
SERVER_START_TIMEOUT = 180.0
# Seconds, for the median on an idle machine (issue 14); None: reported only.
# "dir" is the default path (the directory's local server already running);
# "dir-first" the first command, which starts it; "dir-inprocess" the same
# command with CHX_MASKS_LOCAL_SERVER=0 (tiled served in the command's process).
TARGETS: dict[str, float | None] = {
    "help": None,
    "dir": 2.5,
    "dir-first": None,
    "dir-inprocess": None,
    "uri": 1.5,
}


@dataclass(frozen=True)
class Variant:
    """One way of running the command line: an entry point and a source tree."""

    label: str
    module: bool  # ``python -m chx_masks`` rather than the ``chx-masks`` script
    source: Path | None = None  # a directory holding another chx_masks package


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)

    def add(self, seconds: float, cpu_seconds: float, rss_mib: float) -> None:
        self.seconds.append(seconds)
        self.cpu_seconds.append(cpu_seconds)
        self.rss_mib.append(rss_mib)


def _script() -> Path:
    script = Path(sys.executable).with_name("chx-masks")
    if not script.exists():
        found = shutil.which("chx-masks")
        if found is None:
            sys.exit("startup.py: no chx-masks script; install the package (pip install -e .).")
        script = Path(found)
    return script


def _argv(variant: Variant, args: list[str]) -> list[str]:
    if variant.module:
        return [sys.executable, "-m", "chx_masks", *args]
    return [str(_script()), *args]


def _env(variant: Variant, extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CHX_MASKS_URI", "CHX_MASKS_PROFILE", "CHX_MASKS_API_KEY", "PYTHONPATH")
    }
    if variant.source is not None:
        env["PYTHONPATH"] = str(variant.source)
    return {**env, **extra}


def run_once(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, float, str]:
    """Wall and CPU seconds, peak RSS (MiB) and stdout of one process; exits on failure."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        # wait4, not Popen.wait: the child's own rusage (RUSAGE_CHILDREN would
        # give the largest of all children so far).
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if process.returncode != 0:
        sys.exit(f"startup.py: {' '.join(argv)} failed ({process.returncode}):\n{stderr}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, stdout


def fill_registry(directory: Path, masks: int, cwd: Path) -> list[str]:
    """Register ``masks`` small masks in an embedded registry (this tree's code)."""
    names = [f"mask_{i}" for i in range(masks)]
    code = (
        "import sys, numpy as np\n"
        "from chx_masks import MaskRegistry\n"
        "with MaskRegistry.embedded(sys.argv[1], disk_cache=False) as reg:\n"
        "    for i, name in enumerate(sys.argv[3:]):\n"
        "        mask = np.ones((514, 1030), dtype=bool)\n"
        "        mask[i::7, :] = False\n"
        "        reg.register_mask(sys.argv[2], name, mask)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-c", code, str(directory), DETECTOR, *names], check=True, cwd=cwd, env=env
    )
    return names


def stop_local_server(directory: Path) -> None:
    """Stop the local server ``chx-masks`` started for ``directory``, if any."""
    code = (
        "import sys; from pathlib import Path; from chx_masks._local import stop; "
        "stop(Path(sys.argv[1]))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(directory)],
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


class Server:
    """``chx-masks serve --dir DIR`` on 127.0.0.1 (this tree's code), as a user runs it."""

    def __init__(self, directory: Path, cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TILED_SINGLE_USER_API_KEY": API_KEY}
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "chx_masks", "serve", "--dir", str(directory), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=cwd,
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        self.uri = ""
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if "export CHX_MASKS_URI=" in line:
                self.uri = line.split("=", 1)[1].strip()
                break
        if not self.uri:
            self.log.seek(0)
            log = self.log.read().decode(errors="replace")[-3000:]
            self.stop()
            sys.exit(f"startup.py: chx-masks serve printed no URI:\n{log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


def machine() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "chx_masks"],
        capture_output=True,
        text=True,
    ).stdout.split()
    versions = {}
    for package in ("tiled", "dask", "numpy"):
        found = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from importlib.metadata import version; print(version({package!r}))",
            ],
            capture_output=True,
            text=True,
        )
        versions[package] = found.stdout.strip() or "?"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "versions": versions,
        "git_rev": rev,
        "uncommitted_in_chx_masks": dirty[1::2],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="repetitions (default 7)")
    parser.add_argument("--masks", type=int, default=5, help="masks in each registry (default 5)")
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="also measure the chx_masks package in DIR (e.g. HEAD from "
        "`git archive HEAD chx_masks | tar -x -C DIR`); repeatable",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(TARGETS),
        help="measure only this command (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every sample here")
    options = parser.parse_args(argv)
    for base in options.baseline:
        if not (base / "chx_masks").is_dir():
            parser.error(f"--baseline {base} holds no chx_masks/ package")
    return options


def make_variants(baselines: list[Path]) -> list[Variant]:
    """Each ``--baseline`` as script and module, then this tree's two."""
    variants = []
    for base in baselines:
        variants += [
            Variant(f"{base.name}: chx-masks", module=False, source=base.resolve()),
            Variant(f"{base.name}: python -m", module=True, source=base.resolve()),
        ]
    variants += [Variant("chx-masks", module=False), Variant("python -m chx_masks", module=True)]
    return variants


def print_machine(info: dict[str, Any]) -> None:
    print(
        f"chx-masks start-up, {info['date']}, git {info['git_rev']}"
        + (
            f" + uncommitted {', '.join(info['uncommitted_in_chx_masks'])}"
            if info["uncommitted_in_chx_masks"]
            else ""
        )
    )
    print(
        f"  {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"; load average {info['load_average_at_start']}"
    )


Pair = tuple[str, Variant]
Commands = dict[str, tuple[list[str], dict[str, str]]]


def measure(
    options: argparse.Namespace, variants: list[Variant], commands: list[str]
) -> tuple[list[Pair], dict[tuple[str, str], Samples]]:
    """Fill the registries, start what the commands need and sample every (command, variant)."""
    with tempfile.TemporaryDirectory(prefix="chx-startup-") as tmp:
        root = Path(tmp)
        # Children run here, not in the repository, so that --baseline's
        # PYTHONPATH is not overridden by the working directory on sys.path.
        cwd = root / "cwd"
        cwd.mkdir()
        embedded, served, first = root / "embedded", root / "served", root / "first"
        server = None
        names: list[str] = []
        if {"dir", "uri"} & set(commands):
            print(f"  filling a registry with {options.masks} masks ...", flush=True)
            names = fill_registry(embedded, options.masks, cwd)
            shutil.copytree(embedded, served)
            shutil.copytree(embedded, first)
        try:
            args: Commands = {"help": (["--help"], {})}
            # The embedded registry's default data directory must not be touched.
            args["dir"] = (["--dir", str(embedded), "list"], {})
            args["dir-inprocess"] = (
                ["--dir", str(embedded), "list"],
                {"CHX_MASKS_LOCAL_SERVER": "0"},
            )
            args["dir-first"] = (["--dir", str(first), "list"], {})
            if "uri" in commands:
                server = Server(served, cwd)
                print(f"  server at {server.uri}", flush=True)
                args["uri"] = (["--uri", server.uri, "list"], {"CHX_MASKS_API_KEY": API_KEY})
            env_base = {
                "CHX_MASKS_DIR": str(root / "default"),
                "CHX_MASKS_CACHE_DIR": str(root / "cache"),
                "CHX_MASKS_LOCAL_IDLE": "300",
            }
            pairs = [(c, v) for c in commands for v in variants]
            samples = {(c, v.label): Samples() for c, v in pairs}
            print(
                f"  {len(pairs)} (command, variant) pairs x {options.repeat} repetitions "
                "(+1 warm-up) ...",
                flush=True,
            )
            for repetition in range(-1, options.repeat):
                shift = max(repetition, 0) % len(pairs)
                for command, variant in pairs[shift:] + pairs[:shift]:
                    if command == "dir-first":
                        stop_local_server(first)
                    sample = sample_once(command, variant, args, env_base, names, cwd)
                    if repetition >= 0:  # the warm-up compiles bytecode and fills caches
                        samples[command, variant.label].add(*sample)
                if repetition >= 0:
                    print(f"    repetition {repetition + 1}/{options.repeat} done", flush=True)
        finally:
            if server is not None:
                server.stop()
            for directory in (embedded, first):
                stop_local_server(directory)
    return pairs, samples


def sample_once(
    command: str,
    variant: Variant,
    args: Commands,
    env_base: dict[str, str],
    names: list[str],
    cwd: Path,
) -> tuple[float, float, float]:
    """One run of ``command`` as ``variant``: wall seconds, CPU seconds, peak RSS (MiB)."""
    command_args, extra = args[command]
    seconds, cpu, rss, stdout = run_once(
        _argv(variant, command_args), _env(variant, {**env_base, **extra}), cwd
    )
    if command != "help" and not all(n in stdout for n in names):
        sys.exit(f"startup.py: {command} {variant.label} did not list every mask:\n{stdout}")
    return seconds, cpu, rss


def print_table(
    pairs: list[Pair], samples: dict[tuple[str, str], Samples], variants: list[Variant]
) -> None:
    shown = {
        "help": "--help",
        "dir": "--dir D list",
        "dir-first": "--dir D list",
        "dir-inprocess": "--dir D list",
        "uri": "--uri URI list",
    }
    labels = {"dir": " (server up)", "dir-first": " (first)", "dir-inprocess": " (no server)"}
    width = max(len(v.label) for v in variants) + max(len(x) for x in labels.values())
    header = (
        f"{'command':16} {'variant':{width}} {'median s':>9} {'min s':>7} {'max s':>7} "
        f"{'CPU s':>6} {'peak RSS MiB':>13} {'target':>8}  verdict"
    )
    print(header)
    print("-" * len(header))
    for command, variant in pairs:
        s = samples[command, variant.label]
        median = statistics.median(s.seconds)
        target = TARGETS[command]
        verdict = "-" if target is None else ("PASS" if median < target else "FAIL")
        shown_target = "none" if target is None else f"< {target:.1f} s"
        label = variant.label + labels.get(command, "")
        print(
            f"{shown[command]:16} {label:{width}} {median:9.2f} {min(s.seconds):7.2f} "
            f"{max(s.seconds):7.2f} {statistics.median(s.cpu_seconds):6.2f} "
            f"{statistics.median(s.rss_mib):13.0f} "
            f"{shown_target:>8}  {verdict}"
        )


def write_json(
    path: Path,
    info: dict[str, Any],
    pairs: list[Pair],
    samples: dict[tuple[str, str], Samples],
) -> None:
    path.write_text(
        json.dumps(
            {
                "machine": info,
                "samples": [
                    {
                        "command": c,
                        "variant": v.label,
                        "seconds": samples[c, v.label].seconds,
                        "cpu_seconds": samples[c, v.label].cpu_seconds,
                        "peak_rss_mib": samples[c, v.label].rss_mib,
                    }
                    for c, v in pairs
                ],
            },
            indent=2,
        )
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    variants = make_variants(options.baseline)
    commands = options.only or list(TARGETS)
    info = machine()
    print_machine(info)
    pairs, samples = measure(options, variants, commands)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\n  load average at the end {info['load_average_at_end']}\n")
    print_table(pairs, samples, variants)
    if options.json is not None:
        write_json(options.json, info, pairs, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
