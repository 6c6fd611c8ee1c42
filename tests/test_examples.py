"""The examples run, on tiny settings (the full settings are for people, not CI)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent

#: `polish3d simulate` flags of a tiny project: 1 tilt series, 10 particles, 7 tilts of 128² px.
TINY_SIM = (
    "--n_tomograms 1 --n_particles 10 --n_unlisted 0 --image_size 128 --tilt_min -30 "
    "--tilt_max 30 --tilt_step 10 --thickness 48 --angpix 16"
)


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # compiling dominates on tiny data
    env.update(extra)
    return env


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), EXAMPLES / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_02_relion_project(tmp_path):
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "02_relion_project.sh"), str(tmp_path / "project")],
        env=_env(BOX="32", R="8", OUTER="1", J="1", SIM_ARGS=TINY_SIM),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    job = tmp_path / "project" / "Polish" / "job001"
    for f in ("optimisation_set.star", "tomograms.star", "particles.star", "RELION_OUTPUT_NODES.star",
              "score.json"):
        assert (job / f).is_file(), f
    assert "already finished; skipped" in proc.stderr
    # two score tables: the input's error is not zero (the truth was found, not the input again)
    tables = [ln for ln in proc.stdout.splitlines() if ln.startswith("all")]
    assert len(tables) == 2
    assert float(tables[0].split()[2]) > 1.0


def test_03_python_api(tmp_path):
    """Run in-process (it shares the compiled functions with test_api: same shapes)."""
    mod = _load("03_python_api.py")
    out = mod.main(tmp_path, small=True)
    assert out["before_px"] > 1.0
    assert out["after_px"] < out["before_px"]
    assert abs(out["score_rms_px"] - out["after_px"]) < 1e-3  # files and arrays agree
    assert (tmp_path / "refined" / "optimisation_set.star").is_file()


@pytest.mark.skipif(not (EXAMPLES / "simulate_align_score.py").exists(),
                    reason="examples/simulate_align_score.py not written yet")
def test_simulate_align_score(tmp_path):
    """The README example (small settings: ``--small`` / ``POLISH3D_EXAMPLE_SMALL=1``)."""
    text = (EXAMPLES / "simulate_align_score.py").read_text()
    args = [sys.executable, str(EXAMPLES / "simulate_align_score.py"), str(tmp_path / "out")]
    if "--small" in text:
        args.append("--small")
    proc = subprocess.run(args, env=_env(POLISH3D_EXAMPLE_SMALL="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
