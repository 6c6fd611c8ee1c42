"""``polish3d align`` as a RELION 5 External job inside a (miniature) RELION project.

The project is built in ``tmp_path`` from the reduced convention-check fixture (a real RELION 5
project: the five lowest-dose tilts of its 41-tilt series, 256² images at 8 Å/px, a half map used
for both halves, mask, ``postprocess.star``; see tests/data/convention-check), laid out as a
RELION 5 pipeline lays it out: per-tilt motion-corrected images under ``MotionCorr/job002/``,
tilt-series STARs from ``AlignTiltSeries/job005/``, the tomogram set of ``Tomograms/job006/``,
particles and optimisation set of ``Extract/job010/``, half maps of ``Refine3D/job011/``, the
mask of ``MaskCreate/job012/`` and the FSC of ``PostProcess/job013/``. Every path inside the STAR
files is relative to the project folder, as RELION writes them.

``polish3d align`` is then run from the project folder with exactly the command line RELION's
External job builds (``--o External/job014/ --in_parts … --in_3dref … --in_mask …``, a user
label ``--fsc …``, ``--j``), as a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polish3d.geometry import dose_order
from polish3d.io import open_stack, read_star, write_map, write_star

CC = Path(__file__).resolve().parent / "data" / "convention-check"
N_PARTICLES = 10
N_TILTS = 5  # the bundled low-dose tilts
JOB = "External/job014/"


def _polish3d() -> list[str]:
    exe = Path(sys.executable).with_name("polish3d")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "polish3d.cli"]


def build_project(root: Path, n_particles: int = N_PARTICLES) -> dict[str, str]:
    """A miniature RELION 5 project under ``root``; returns the External job's input paths."""
    root.mkdir(parents=True, exist_ok=True)
    # tilt images: one MRC file per tilt, as MotionCorr writes them; the bundled stack holds the
    # lowest-dose rows of the per-tilt table, in table order
    stack = open_stack(CC / "tilt_series" / "TS_01_lowdose.mrcs")
    table = read_star(CC / "tilt_series" / "TS_01.star")["TS_01"]
    rows = np.sort(dose_order(table["rlnMicrographPreExposure"].to_numpy(float))[: stack.shape[0]])
    table = table.iloc[rows].reset_index(drop=True)
    frames = root / "MotionCorr" / "job002" / "frames"
    names = []
    for k, j in enumerate(rows):
        rel = f"MotionCorr/job002/frames/TS_01_{j + 1:03d}.mrc"
        write_map(root / rel, np.asarray(stack[k], np.float32)[None], 8.0)
        names.append(rel)
    assert frames.is_dir()
    # per-tilt table (AlignTiltSeries), micrograph names → the per-tilt files
    ts_rel = "AlignTiltSeries/job005/tilt_series/TS_01.star"
    table["rlnMicrographName"] = names
    write_star(root / ts_rel, {"TS_01": table})
    # tomogram set (Tomograms)
    tomo_rel = "Tomograms/job006/tomograms.star"
    g = read_star(CC / "tomograms.star")["global"].copy()
    g["rlnTomoTiltSeriesStarFile"] = [ts_rel]
    write_star(root / tomo_rel, {"global": g})
    # particles (Extract): a subset
    blocks = read_star(CC / "particles.star")
    blocks["particles"] = blocks["particles"].iloc[:n_particles].reset_index(drop=True)
    parts_rel = "Extract/job010/particles.star"
    write_star(root / parts_rel, blocks)
    opt_rel = "Extract/job010/optimisation_set.star"
    write_star(root / opt_rel, {"": {"rlnTomoParticlesFile": parts_rel, "rlnTomoTomogramsFile": tomo_rel}})
    # references (Refine3D half maps, MaskCreate, PostProcess)
    ref = root / "Refine3D" / "job011"
    ref.mkdir(parents=True)
    shutil.copy(CC / "reference" / "half1.mrc", ref / "run_half1_class001_unfil.mrc")
    shutil.copy(CC / "reference" / "half1.mrc", ref / "run_half2_class001_unfil.mrc")  # not bundled
    (root / "MaskCreate" / "job012").mkdir(parents=True)
    shutil.copy(CC / "reference" / "mask.mrc", root / "MaskCreate" / "job012" / "mask.mrc")
    post = read_star(CC / "reference" / "postprocess.star")
    post["general"] = dict(post["general"], rlnMaskName="MaskCreate/job012/mask.mrc")
    write_star(root / "PostProcess" / "job013" / "postprocess.star", post)
    return {
        "in_parts": opt_rel,
        "in_3dref": "Refine3D/job011/run_half1_class001_unfil.mrc",
        "in_mask": "MaskCreate/job012/mask.mrc",
        "fsc": "PostProcess/job013/postprocess.star",
    }


def external_job_command(inputs: dict[str, str], job: str = JOB) -> list[str]:
    """The command line RELION 5's External job builds (``pipeline_jobs.cpp``)."""
    return _polish3d() + [
        "align", "--o", job,
        "--in_parts", inputs["in_parts"],
        "--in_3dref", inputs["in_3dref"],
        "--in_mask", inputs["in_mask"],
        # user-defined label/value pairs
        "--fsc", inputs["fsc"], "--b", "64", "--r", "20", "--outer", "1",
        "--j", "2",
    ]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # fewer XLA optimisation passes: compiling dominates on data this small (test speed only)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _check_paths_resolve(project: Path, opt_rel: str) -> list[str]:
    """Every path named in the output STAR files, resolved against the project folder."""
    seen = []
    opt = read_star(project / opt_rel)[""]
    for key in ("rlnTomoParticlesFile", "rlnTomoTomogramsFile"):
        rel = str(opt[key])
        assert not Path(rel).is_absolute(), rel
        assert (project / rel).is_file(), f"{opt_rel}: {key} {rel} does not resolve"
        seen.append(rel)
    tomos = read_star(project / str(opt["rlnTomoTomogramsFile"]))["global"]
    for name, ts_rel in zip(tomos["rlnTomoName"], tomos["rlnTomoTiltSeriesStarFile"], strict=True):
        assert not Path(ts_rel).is_absolute(), ts_rel
        assert (project / ts_rel).is_file(), f"tomograms.star: {ts_rel} does not resolve"
        seen.append(ts_rel)
        table = read_star(project / ts_rel)[name]
        for cell in table["rlnMicrographName"].astype(str):
            img = cell.split("@", 1)[-1]
            assert not Path(img).is_absolute(), img
            assert (project / img).is_file(), f"{ts_rel}: {cell} does not resolve"
    return seen


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("relion_project")
    inputs = build_project(root)
    proc = _run(external_job_command(inputs), root)
    return root, inputs, proc


def test_external_job_succeeds(project):
    root, _, proc = project
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = root / JOB
    assert (job / "RELION_JOB_EXIT_SUCCESS").is_file()
    assert not (job / "RELION_JOB_EXIT_FAILURE").exists()
    for f in ("optimisation_set.star", "tomograms.star", "particles.star", "tilt_series/TS_01.star",
              "metrics.json", "polish3d.log", "temp/TS_01.npz"):
        assert (job / f).is_file(), f
    # nothing is written outside the job folder
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["AlignTiltSeries", "Extract", "External", "MaskCreate", "MotionCorr", "PostProcess",
         "Refine3D", "Tomograms"]
    )


def test_output_nodes(project):
    root, _, proc = project
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = read_star(root / JOB / "RELION_OUTPUT_NODES.star")["output_nodes"]
    got = dict(zip(nodes["rlnPipeLineNodeName"], nodes["rlnPipeLineNodeTypeLabel"], strict=True))
    assert got == {
        JOB + "optimisation_set.star": "TomoOptimisationSet.star.relion.tomo.polish",
        JOB + "tomograms.star": "TomogramGroupMetadata.star.relion.tomo.polish",
        JOB + "particles.star": "ParticleGroupMetadata.star.relion.tomo.polish",
    }
    for name in got:
        assert (root / name).is_file()


def test_output_paths_resolve_from_project(project):
    root, _, proc = project
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = _check_paths_resolve(root, JOB + "optimisation_set.star")
    # the outputs are the job's own files (RELION style: project-relative, job prefix)
    assert seen == [JOB + "particles.star", JOB + "tomograms.star", JOB + "tilt_series/TS_01.star"]
    # refined particles keep every row and the subset size
    parts = read_star(root / JOB / "particles.star")["particles"]
    assert len(parts) == N_PARTICLES


def test_output_reads_back_with_polish3d(project, monkeypatch):
    """The refined set is a valid input again (read from the project folder, as RELION would)."""
    root, _, proc = project
    assert proc.returncode == 0, proc.stderr[-3000:]
    from polish3d.io import read_optimisation_set, read_particle_set, read_tomogram_set

    monkeypatch.chdir(root)
    opt = read_optimisation_set(JOB + "optimisation_set.star")
    tomos = read_tomogram_set(opt.tomograms_file)
    ts = tomos.tilt_series("TS_01")  # images must exist
    assert ts.n_tilts == N_TILTS and ts.image_size_px == (256, 256)
    parts = read_particle_set(opt.particles_file).for_tomogram(ts)
    assert parts.n_particles == N_PARTICLES
    assert np.all(np.isfinite(ts.projections)) and np.all(np.isfinite(parts.positions_px))


def test_continue_only_do_unfinished(project):
    """RELION's "continue" re-runs the job with --only_do_unfinished: the tomogram is skipped."""
    root, inputs, proc = project
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = (root / JOB / "tomograms.star").read_text()
    again = _run(external_job_command(inputs) + ["--only_do_unfinished"], root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr
    assert (root / JOB / "RELION_JOB_EXIT_SUCCESS").is_file()
    assert (root / JOB / "tomograms.star").read_text() == before


def test_missing_mask_fails_cleanly(project):
    root, inputs, _ = project
    bad = dict(inputs, in_mask="MaskCreate/job012/no_such_mask.mrc")
    job = "External/job015/"
    proc = _run(external_job_command(bad, job), root)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("polish3d: error:")]
    assert len(errors) == 1, proc.stderr
    assert "no_such_mask.mrc" in errors[0]
    assert "Traceback" not in proc.stderr
    assert (root / job / "RELION_JOB_EXIT_FAILURE").is_file()
    assert not (root / job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (root / job / "RELION_OUTPUT_NODES.star").exists()


def test_particles_star_as_in_parts(project):
    """--in_parts may be a particles STAR; then the tomogram set comes from --t (user label)."""
    root, inputs, _ = project
    job = "External/job016/"
    cmd = external_job_command(dict(inputs, in_parts="Extract/job010/particles.star"), job)
    # no --t: a clear error naming the missing tomogram set
    proc = _run(cmd, root)
    assert proc.returncode == 2
    assert "tomogram set" in proc.stderr
    assert (root / job / "RELION_JOB_EXIT_FAILURE").is_file()


def test_python_dash_m_runs_the_command_line():
    """``python -m polish3d`` is the ``polish3d`` command (for environments without the script)."""
    out = subprocess.run([sys.executable, "-m", "polish3d", "--version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().startswith("polish3d ")
