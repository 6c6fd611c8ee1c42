"""Helpers shared by the benchmarks that run RELION 5 beside polish3d (same data, same machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

#: Runs the polish3d CLI in a fresh interpreter: ``[sys.executable, "-c", POLISH3D_MAIN, "align", ...]``.
POLISH3D_MAIN = "import sys; from polish3d.cli import main; sys.argv[0] = 'polish3d'; main()"


def relion_binary(name: str) -> str | None:
    """RELION program ``name`` (e.g. ``relion_tomo_align``) from ``$RELION_BIN`` or ``PATH``;
    None when RELION is not installed."""
    folder = os.environ.get("RELION_BIN")
    if folder:
        exe = Path(folder) / name
        return str(exe) if exe.exists() else None
    return shutil.which(name)


def timed_process(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run ``cmd`` as a fresh process; return (wall seconds, peak resident MiB of that process).

    The peak is measured by GNU ``time`` when it is installed: Linux carries a process's peak
    resident set across ``execve``, so a child forked from this (large, JAX-importing) script
    would report at least this script's size; ``time``'s own child starts from ``time``'s small
    image. Without GNU ``time`` the child's own figure is used (an upper bound).
    """
    gnu_time = os.path.exists("/usr/bin/time")
    peak_file = log.with_suffix(".maxrss")
    full = ["/usr/bin/time", "-f", "%M", "-o", str(peak_file), *cmd] if gnu_time else cmd
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    if gnu_time:
        return wall, float(peak_file.read_text().split()[-1]) / 1024.0
    return wall, usage.ru_maxrss / 1024.0
