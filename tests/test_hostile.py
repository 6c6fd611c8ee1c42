"""Hostile inputs and faults, tried from the command line on a tiny simulated set (issue 11).

Every case checks the exit code, the message (it names the file or flag and what was expected;
no traceback, no ``np.float64(...)``), that the inputs are unchanged byte for byte, and what the
output folder holds afterwards (nothing, for a refusal before the run starts).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from polish3d.cli import app
from polish3d.simulate import SimulationConfig, simulate

TINY = SimulationConfig(
    n_tomograms=1, n_particles=8, n_unlisted=0, image_size_px=(128, 128), tilt_min_deg=-30,
    tilt_max_deg=30, tilt_step_deg=10, tomo_thickness_px=32, pixel_size_ang=16.0, box_px=32,
    shift_err_px=2.0, position_err_px=1.5, seed=5,
)
FLAGS = ["--b", "32", "--r", "8", "--j", "2", "--outer", "1"]
STAR_OUTPUTS = ("optimisation_set.star", "tomograms.star", "particles.star", "RELION_OUTPUT_NODES.star")


def _digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (symlinks as their target text)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[p.relative_to(root).as_posix()] = "link:" + os.readlink(p)
        elif p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cli(cwd: Path, *args: str):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def _no_constants(name):
    raise AssertionError(f"{name} in a JSON file (not JSON)")


def _clean_message(res) -> str:
    text = res.output
    assert "Traceback" not in text, text
    assert "np.float64" not in text and "np.int64" not in text, text
    return text


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding ``sim/`` (the tiny set) and, once refined, ``Polish/job001/``."""
    r = tmp_path_factory.mktemp("hostile")
    simulate(TINY, r / "sim")
    return r


@pytest.fixture(scope="module")
def refined(root) -> Path:
    """One good run (inputs checked unchanged); later tests reuse its folder."""
    before = _digest(root / "sim")
    res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", "Polish/job001")
    assert res.exit_code == 0, res.output
    assert _digest(root / "sim") == before
    out = root / "Polish/job001"
    assert not (out / ".polish3d.lock").exists()
    return out


def _variant(root: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny set under ``tmp_path/set`` changed by ``edit(folder)``."""
    d = tmp_path / "set"
    shutil.copytree(root / "sim", d)
    edit(d)
    return d


def _refused(res, cwd: Path, out: str, *needles: str) -> str:
    """Exit 2, one message naming ``needles``, and no output folder left behind."""
    text = _clean_message(res)
    assert res.exit_code == 2, text
    assert "polish3d: error:" in text
    for n in needles:
        assert n in text, (n, text)
    assert not (cwd / out).exists(), f"{out} was created by a refused run"
    return text


# ----------------------------------------------------------------------------------------------
# item 1: --o never overwrites an input


@pytest.mark.parametrize(
    "out",
    ["sim", "./sim/", "ABS/sim", "link", "sim/tilt_series/..", "sim/particles.star",
     "sim/reference/half1.mrc"],
)
def test_output_over_inputs_refused(root, out):
    before = _digest(root / "sim")
    if out == "link":
        (root / "link").unlink(missing_ok=True)
        (root / "link").symlink_to("sim")
    out = out.replace("ABS", str(root))
    res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", out)
    text = _clean_message(res)
    assert res.exit_code == 2, text
    assert f"--o {out}" in text and "input" in text
    assert _digest(root / "sim") == before  # nothing changed, nothing added (no log, no lock)


def test_output_file_linked_to_an_input_refused(root, tmp_path):
    """An output folder whose particles.star is a (hard or symbolic) link to the input."""
    before = _digest(root / "sim")
    for kind in ("symlink", "hardlink"):
        out = tmp_path / kind
        out.mkdir()
        target = root / "sim" / "particles.star"
        if kind == "symlink":
            (out / "particles.star").symlink_to(target)
        else:
            os.link(target, out / "particles.star")
        res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", out)
        text = _clean_message(res)
        assert res.exit_code == 2, text
        assert "particles.star would overwrite the input particle set" in text
        assert sorted(p.name for p in out.iterdir()) == ["particles.star"]
    assert _digest(root / "sim") == before


def test_refined_set_cannot_be_written_over_itself(root, refined):
    before = _digest(refined)
    refs = ["--ref1", "sim/reference/half1.mrc", "--ref2", "sim/reference/half2.mrc"]
    res = _cli(root, "align", "--i", "Polish/job001/optimisation_set.star", *refs, *FLAGS,
               "--o", "Polish/job001/")
    text = _clean_message(res)
    assert res.exit_code == 2, text
    assert "would overwrite the input" in text
    assert _digest(refined) == before


def test_output_is_an_existing_file(root, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", f)
    text = _clean_message(res)
    assert res.exit_code == 2 and "is an existing file, not a folder" in text
    assert f.read_text() == "mine\n"


def test_output_folder_not_writable(root, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only kernel folder
        target = Path("/sys/kernel")
        if not target.is_dir() or os.access(target / "polish3d-probe", os.F_OK):
            pytest.skip("no read-only folder for root here")
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
    res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", target)
    text = _clean_message(res)
    assert res.exit_code == 2, text
    assert f"--o {target}: cannot write in this folder" in text
    assert not (target / "polish3d.log").exists()


# ----------------------------------------------------------------------------------------------
# item 6 and 7: flag values, single dash


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--s_vel", "-1"], ["--s_vel -1", "positive velocity sigma"]),
        (["--s_div", "-5", "--motion"], ["--s_div -5", "positive divergence sigma"]),
        (["--j", "0"], ["--j 0", "threads >= 1"]),
        (["--j", "-3"], ["--j -3", "threads >= 1"]),
        (["--r", "13"], ["--r 13", "--r < --b/2 − 3 = 13"]),
        (["--r", "0"], ["--r 0", "positive"]),
        (["--r", "nan"], ["--r nan", "finite"]),
        (["--b", "33"], ["--b 33", "even"]),
        (["--b", "128"], ["--b 128", "smaller than the tilt images", "128×128"]),
        (["--b", "200", "--r", "20"], ["--b 200", "smaller than the tilt images"]),
        (["--min_frame", "5", "--max_frame", "2"], ["--min_frame 5 --max_frame 2"]),
        (["--min_frame", "-1"], ["--min_frame -1", ">= 0"]),
        (["--min_frame", "9"], ["--min_frame 9", "7 tilts"]),
        (["--it", "0"], ["--it 0"]),
        (["--outer", "0"], ["--outer 0"]),
        (["--cutoff_fract", "1.5"], ["--cutoff_fract 1.5", "[0, 1)"]),
        (["--range_reg", "-1"], ["--range_reg -1"]),
        (["--max_ed", "-2"], ["--max_ed -2"]),
        (["--device", "banana"], ["--device banana", "expected cpu, gpu or tpu"]),
        (["--const_a", "--const_s", "--const_p"], ["nothing to refine"]),
        (["--shift_only", "--const_s"], ["nothing to refine"]),
        (["leftover.star"], ["unexpected argument 'leftover.star'"]),
    ],
)
def test_bad_flag_values(root, flags, needles):
    args = ["align", "--i", "sim/optimisation_set.star", *FLAGS, *flags, "--o", "Polish/bad"]
    _refused(_cli(root, *args), root, "Polish/bad", *needles)


def test_r_rule_is_the_stated_rule():
    from polish3d.cli import FLAG_OF_OPTION
    from polish3d.config import OptionError, RefineConfig

    assert RefineConfig.build(32, r=12.9).tomogram.r == 12.9
    for r in (13.0, 13.5):
        with pytest.raises(OptionError, match="tomogram.r < tomogram.box/2 − 3") as e:
            RefineConfig.build(32, r=r)
        assert "--r < --b/2 − 3 = 13 for --b 32" in e.value.worded(FLAG_OF_OPTION.get)


def test_single_dash_option_is_not_dropped(root):
    res = _cli(root, "align", "-i", "sim/optimisation_set.star", "--b", "32", "--o", "Polish/dash")
    _refused(res, root, "Polish/dash", "-i: unknown option", "did you mean --i?")


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_absent_device(root, platform):
    import jax

    try:
        if jax.devices(platform):
            pytest.skip(f"this machine has a {platform}")
    except RuntimeError:
        pass
    args = ["align", "--i", "sim/optimisation_set.star", *FLAGS, "--device", platform, "--o", "Polish/dev"]
    res = _cli(root, *args)
    text = _refused(res, root, "Polish/dev", f"--device {platform}: no {platform} device", "available: cpu")
    assert "rocm" not in text.lower() and "cuda" not in text.lower()


# ----------------------------------------------------------------------------------------------
# items 3 and 4: inputs under which nothing can be refined


def _edit_map(d: Path, fn) -> None:
    from polish3d.io import read_map, write_map

    for h in ("half1", "half2"):
        m, px = read_map(d / f"reference/{h}.mrc")
        write_map(d / f"reference/{h}.mrc", fn(np.array(m)), px)


def _nan_voxel(m):
    m[3, 4, 5] = np.nan
    return m


def _edit_particles(d: Path, fn) -> None:
    from polish3d.io import read_star, write_star

    blocks = read_star(d / "particles.star")
    blocks["particles"] = fn(blocks["particles"].copy())
    write_star(d / "particles.star", blocks)


def _edit_stack(d: Path, fn) -> None:
    from polish3d.io import open_stack, write_stack

    s = fn(np.array(open_stack(d / "tilt_series/TS_01.mrcs")))
    with pytest.warns(RuntimeWarning):  # mrcfile warns about NaN: expected here
        write_stack(d / "tilt_series/TS_01.mrcs", s, TINY.pixel_size_ang)


def _outside(t):
    t["rlnCenteredCoordinateXAngst"] = t["rlnCenteredCoordinateXAngst"] + 1e5
    return t


def _edit_mask(d: Path, fn) -> None:
    from polish3d.io import read_map, write_map

    m, px = read_map(d / "reference/mask.mrc")
    write_map(d / "reference/mask.mrc", fn(np.array(m)), px)


HOSTILE = {
    "mask_shape": (lambda d: _edit_mask(d, lambda m: m[:-2, :-2, :-2]), ["mask.mrc is (30, 30, 30)"]),
    "zero_mask": (lambda d: _edit_mask(d, np.zeros_like), ["mask.mrc: the mask is zero everywhere"]),
    "nan_reference": (lambda d: _edit_map(d, _nan_voxel), ["half1.mrc", "not finite (NaN or inf)"]),
    "zero_reference": (lambda d: _edit_map(d, np.zeros_like), ["half1.mrc", "constant (0 everywhere)"]),
    "constant_reference": (lambda d: _edit_map(d, lambda m: np.full_like(m, 2.5)), ["constant (2.5"]),
    "no_particles": (lambda d: _edit_particles(d, lambda t: t.iloc[:0]), ["particles.star", "no particles"]),
    "all_outside": (lambda d: _edit_particles(d, _outside), ["nothing to refine", "none of its 8 particles"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("pipeline", [False, True])
def test_nothing_to_refine_fails(root, tmp_path, case, pipeline):
    edit, needles = HOSTILE[case]
    d = _variant(root, tmp_path, edit)
    before = _digest(d)
    out = tmp_path / "job"
    extra = []
    if pipeline:  # RELION creates the job folder before it starts the job
        out.mkdir()
        (out / "RELION_JOB_EXIT_SUCCESS").touch()  # from an earlier run: must go
        extra = ["--pipeline_control", str(out)]
    res = _cli(d, "align", "--i", "optimisation_set.star", *FLAGS, "--o", out, *extra)
    text = _clean_message(res)
    assert res.exit_code == 2, text
    for n in needles:
        assert n in text, (n, text)
    assert _digest(d) == before
    if pipeline:
        assert sorted(p.name for p in out.iterdir()) == ["RELION_JOB_EXIT_FAILURE", "polish3d.log"]
        assert needles[-1] in (out / "polish3d.log").read_text().splitlines()[-1]
    else:
        assert not out.exists()


def test_nan_patch_is_masked_and_counted(root, tmp_path):
    def patch(s):
        s[3, 40:50, 40:50] = np.nan
        return s

    d = _variant(root, tmp_path, lambda d: _edit_stack(d, patch))
    before = _digest(d)
    res = _cli(d, "align", "--i", "optimisation_set.star", *FLAGS, "--o", "out")
    assert res.exit_code == 0, res.output
    assert {k: v for k, v in _digest(d).items() if not k.startswith("out/")} == before
    logtext = (d / "out/polish3d.log").read_text()
    assert "100 non-finite pixel(s) (NaN/inf) in 1 tilt image(s)" in logtext and "tilt 4: 100" in logtext
    m = json.loads((d / "out/metrics.json").read_text(), parse_constant=_no_constants)["tomograms"]["TS_01"]
    assert m["non_finite_pixels"] == {"4": 100}
    assert np.all(np.isfinite(m["per_tilt_cc_first"]))
    from polish3d.score import score

    s = score(d / "out/optimisation_set.star", d / "truth/optimisation_set.star")
    assert s["overall"]["rms"] < 0.5


def test_all_pixels_non_finite_fails(root, tmp_path):
    d = _variant(root, tmp_path, lambda d: _edit_stack(d, lambda s: np.full_like(s, np.nan)))
    out = tmp_path / "job"
    out.mkdir()
    res = _cli(d, "align", "--i", "optimisation_set.star", *FLAGS, "--o", out, "--pipeline_control", out)
    text = _clean_message(res)
    assert res.exit_code == 2, text
    assert "nothing was refined: TS_01: every tilt image is entirely non-finite" in text
    assert (out / "RELION_JOB_EXIT_FAILURE").exists() and not (out / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not any((out / f).exists() for f in STAR_OUTPUTS)
    assert not (out / ".polish3d.lock").exists()
    assert "ERROR nothing was refined" in (out / "polish3d.log").read_text()


def test_non_finite_refinement_is_not_written(root, tmp_path, monkeypatch):
    """Whatever goes wrong inside, NaN geometry never reaches the STAR files."""
    from polish3d.model import TomogramResult
    from polish3d.refine import tomogram

    def broken(ts, parts, *args, **kwargs):
        figures = dict.fromkeys(("seconds", "displacement_rms_px", "displacement_max_px"), 0.0)
        return TomogramResult(name=ts.name, projections=np.full((ts.n_tilts, 4, 4), np.nan),
                              positions_px=np.asarray(parts.positions_px), metrics=figures)

    monkeypatch.setattr(tomogram, "refine_tomogram", broken)
    out = tmp_path / "job"
    res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", out)
    text = _clean_message(res)
    assert res.exit_code == 2, text
    assert "nothing was refined: TS_01: the refinement produced non-finite geometry" in text
    assert not any((out / f).exists() for f in STAR_OUTPUTS) and not (out / "temp/TS_01.npz").exists()


def _fake_refinement(monkeypatch, fault=None):
    """Replace the refinement by an instant one that returns the input geometry, or raises."""
    from polish3d.model import TomogramResult
    from polish3d.refine import tomogram

    def fake(ts, parts, *args, **kwargs):
        if fault is not None:
            raise fault
        figures = dict.fromkeys(("seconds", "displacement_rms_px", "displacement_max_px"), 0.0)
        return TomogramResult(name=ts.name, projections=np.asarray(ts.projections),
                              positions_px=np.asarray(parts.positions_px), metrics=figures)

    monkeypatch.setattr(tomogram, "refine_tomogram", fake)


@pytest.mark.parametrize(
    ("fault", "code", "needle"),
    [
        (OSError(28, "No space left on device", "particles.star"), 1,
         "polish3d: error: No space left on device: particles.star"),
        (RuntimeError("boom"), 1, "internal error: RuntimeError: boom (--verbose shows the traceback)"),
        (KeyboardInterrupt(), 130, "polish3d: interrupted (SIGINT)"),
    ],
)
def test_faults_during_the_run(root, tmp_path, monkeypatch, fault, code, needle):
    """A fault while the run writes: its exit code, one line, the failure marker, the log line,
    the lock released, no STAR output."""
    from polish3d import output_folder

    if isinstance(fault, OSError):  # the disk fills up while the outputs are written
        _fake_refinement(monkeypatch)

        def full(*args, **kwargs):
            raise fault

        monkeypatch.setattr(output_folder, "write_outputs", full)
    else:
        _fake_refinement(monkeypatch, fault)
    out = tmp_path / "job"
    res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", out,
               "--pipeline_control", out)
    text = _clean_message(res)
    assert res.exit_code == code, text
    assert needle in text
    assert (out / "RELION_JOB_EXIT_FAILURE").exists() and not (out / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (out / ".polish3d.lock").exists()
    assert not any((out / f).exists() for f in STAR_OUTPUTS)
    assert " ERROR " in (out / "polish3d.log").read_text().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# item 8: errors in the log, the lock, SIGTERM


def test_flag_error_goes_into_the_log(root, tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--j", "0", "--o", out)
    assert res.exit_code == 2
    last = (out / "polish3d.log").read_text().splitlines()[-1]
    assert last.endswith("ERROR --j 0: expected a number of threads >= 1"), last


def test_pipeline_error_always_leaves_the_failure_marker(root, tmp_path):
    out = tmp_path / "External/job020"  # not created yet
    res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--s_vel", "-0.5", "--o", out,
               "--pipeline_control", out)
    assert res.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["RELION_JOB_EXIT_FAILURE", "polish3d.log"]
    assert "ERROR --s_vel -0.5: expected a positive velocity sigma" in (out / "polish3d.log").read_text()


def test_second_run_on_a_locked_folder_refuses(root, refined):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = refined / ".polish3d.lock"
    try:
        lock.write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        before = _digest(refined)
        res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", "Polish/job001",
                   "--only_do_unfinished")
        text = _clean_message(res)
        assert res.exit_code == 2, text
        assert f"another polish3d run is writing this folder (pid {sleeper.pid}" in text
        assert _digest(refined) == before  # not even a log line in the other run's folder
    finally:
        sleeper.kill()
        sleeper.wait()
    # its owner is gone: the stale lock is taken over
    res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", "Polish/job001",
               "--only_do_unfinished")
    assert res.exit_code == 0, res.output
    assert f"removing a stale lock Polish/job001/.polish3d.lock (pid {sleeper.pid} has exited)" in (
        refined / "polish3d.log"
    ).read_text()
    assert not lock.exists()


def test_lock_held_by_a_live_process(tmp_path):
    from polish3d.output_folder import OutputLock

    with OutputLock(tmp_path / "o"):
        assert (tmp_path / "o/.polish3d.lock").read_text().split()[0] == str(os.getpid())
        code = (
            "import sys; from polish3d.output_folder import OutputLock\n"
            "from polish3d.errors import OutputRefused\n"
            f"try:\n    OutputLock({str(tmp_path / 'o')!r}).__enter__()\nexcept OutputRefused as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert run.returncode == 3, run.stderr
        assert "another polish3d run" in run.stdout
    assert not (tmp_path / "o/.polish3d.lock").exists()


def _polish3d() -> list[str]:
    exe = Path(sys.executable).with_name("polish3d")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "polish3d.cli"]


def test_sigterm_in_pipeline_mode_writes_the_failure_marker(root, tmp_path):
    """SIGTERM while the run refines: exit 143, RELION_JOB_EXIT_FAILURE, the log line, no lock.

    The run is frozen (SIGSTOP) as soon as it logs its first tomogram, so that SIGTERM surely
    arrives while it is refining, however loaded the machine; if it had already finished by then
    (the log says so), the attempt is repeated.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path))
    for attempt in range(3):
        out = tmp_path / f"job{attempt}"
        out.mkdir()
        cmd = _polish3d() + ["align", "--i", "sim/optimisation_set.star", *FLAGS, "--outer", "3",
                             "--o", str(out), "--pipeline_control", str(out)]
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        log_file = out / "polish3d.log"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if log_file.exists() and "Tomogram 1 / 1" in log_file.read_text():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)
        if proc.poll() is not None or "Finished" in log_file.read_text():
            proc.send_signal(signal.SIGCONT)
            proc.communicate(timeout=120)
            continue  # too late: it had finished
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        output, _ = proc.communicate(timeout=120)
        break
    else:
        pytest.fail("the run always finished before it could be stopped")
    assert proc.returncode == 143, output
    assert "terminated by signal 15 (SIGTERM)" in output and "Traceback" not in output
    assert (out / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (out / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (out / ".polish3d.lock").exists()
    assert log_file.read_text().splitlines()[-1].endswith("ERROR terminated by signal 15 (SIGTERM)")


# ----------------------------------------------------------------------------------------------
# item 5: --only_do_unfinished reuses only what matches


def test_resume_recomputes_what_no_longer_matches(root, refined):
    def run(*extra):
        """The lines this run added to polish3d.log."""
        n = len((refined / "polish3d.log").read_text())
        res = _cli(root, "align", "--i", "sim/optimisation_set.star", *FLAGS, "--o", "Polish/job001",
                   "--only_do_unfinished", *extra)
        assert res.exit_code == 0, res.output
        return (refined / "polish3d.log").read_text()[n:]

    npz = refined / "temp/TS_01.npz"
    assert "TS_01 already finished; skipped" in run()
    npz.write_bytes(npz.read_bytes()[:100])  # truncated by a crash
    text = run()
    assert "temp/TS_01.npz is not an .npz archive (truncated or damaged); recomputing" in text
    text = run("--const_a")
    assert "temp/TS_01.npz was made with other tomogram.const_a; recomputing" in text
    assert "already finished" not in text
    assert "TS_01 already finished; skipped" in run("--const_a")
    text = run()  # back to the defaults: the stored --const_a result is not reused
    assert "was made with other tomogram.const_a" in text


def test_resume_record_follows_the_inputs(root, tmp_path):
    from polish3d.io import read_optimisation_set, read_particle_set, read_tomogram_set
    from polish3d.tomogram_jobs import result_record

    opt = read_optimisation_set(root / "sim/optimisation_set.star")
    tset = read_tomogram_set(opt.tomograms_file)
    ts = tset.tilt_series("TS_01")
    parts = read_particle_set(opt.particles_file).for_tomogram(ts)
    base = result_record({"--b": 32}, {"reference half map 1 (checksum)": "x"}, ts, parts)
    assert base == result_record({"--b": 32}, {"reference half map 1 (checksum)": "x"}, ts, parts)
    moved = parts.replace(positions_px=parts.positions_px + np.array([0.0, 0.0, 0.5]))
    rec = result_record({"--b": 32}, {"reference half map 1 (checksum)": "x"}, ts, moved)
    assert [k for k in rec if rec[k] != base[k]] == ["particles of this tomogram"]
    tilted = ts.replace(defocus_u_ang=ts.defocus_u_ang + 1.0)
    rec = result_record({"--b": 32}, {"reference half map 1 (checksum)": "x"}, tilted, parts)
    assert [k for k in rec if rec[k] != base[k]] == ["tilt series (geometry, CTF, dose, image files)"]


def test_resume_store_unit(tmp_path):
    from polish3d.io.resume import load_result, save_result
    from polish3d.model import TomogramResult

    res = TomogramResult(name="TS_01", projections=np.eye(4)[None].repeat(3, 0),
                         positions_px=np.zeros((2, 3)), metrics={"cost": 1.5})
    save_result(tmp_path, res, {"--b": 32, "particles": "abc"})
    got, why = load_result(tmp_path, "TS_01", {"--b": 32, "particles": "abc"})
    assert why == "" and got is not None and np.array_equal(got.projections, res.projections)
    assert got.metrics == {"cost": 1.5}
    got, why = load_result(tmp_path, "TS_01", {"--b": 48, "particles": "abd"})
    assert got is None and why == "temp/TS_01.npz was made with other --b, particles"
    assert load_result(tmp_path, "TS_02", {}) == (None, "")
    # a file of the old layout (no record) and one holding NaN are not reused
    np.savez(tmp_path / "temp/TS_03.npz", projections=np.eye(4)[None], metrics=np.asarray("{}"))
    assert "has no record" in load_result(tmp_path, "TS_03", {})[1]
    bad = TomogramResult(name="TS_04", projections=np.full((1, 4, 4), np.nan))
    save_result(tmp_path, bad, {})
    assert "non-finite" in load_result(tmp_path, "TS_04", {})[1]
    assert not list((tmp_path / "temp").glob("*.tmp"))


def test_io_does_not_import_jax():
    code = "import sys, polish3d.io.stacks, polish3d.io.resume; sys.exit(3 if 'jax' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_stack_view_masks_non_finite(tmp_path):
    from polish3d.io import write_stack
    from polish3d.io.stacks import StackView

    s = np.arange(3 * 6 * 5, dtype=np.float32).reshape(3, 6, 5)
    s[1, 2, 3] = np.nan
    s[1, 0, 0] = np.inf
    s[2] = np.nan
    with pytest.warns(RuntimeWarning):
        write_stack(tmp_path / "s.mrcs", s, 1.0)
    v = StackView([(str(tmp_path / "s.mrcs"), j) for j in range(3)])
    assert v.non_finite == {1: 2, 2: 30}
    finite = s[1][np.isfinite(s[1])]
    assert v[1][2, 3] == pytest.approx(finite.mean()) and v[1][0, 0] == pytest.approx(finite.mean())
    assert np.all(v[2] == 0.0) and np.array_equal(v[0], s[0])
    assert np.array_equal(v[np.array([0, 1]), np.array([1, 2]), np.array([1, 3])],
                          np.array([s[0, 1, 1], finite.mean()], np.float32))
    raw = StackView([(str(tmp_path / "s.mrcs"), j) for j in range(3)], mask_non_finite=False)
    assert raw.non_finite == {} and np.isnan(raw[1][2, 3])
    big = np.full((1, 6, 5), 3e38, np.float32)  # finite, but its sum overflows
    with np.errstate(over="ignore"):  # the header statistics overflow too
        write_stack(tmp_path / "big.mrcs", big, 1.0)
    v = StackView([(str(tmp_path / "big.mrcs"), 0)])
    assert v.non_finite == {} and np.all(v[0] == np.float32(3e38))


def test_stack_view_usable_boxes(tmp_path):
    """Boxes mostly inside a masked patch are reported unusable; clean tilts are always usable."""
    from polish3d.io import write_stack
    from polish3d.io.stacks import StackView

    s = np.ones((2, 64, 80), np.float32)
    s[1, 0:32, 0:40] = np.nan  # top-left quarter of tilt 2
    with pytest.warns(RuntimeWarning):
        write_stack(tmp_path / "s.mrcs", s, 1.0)
    v = StackView([(str(tmp_path / "s.mrcs"), j) for j in range(2)])
    u = np.array([[[16.0, 16.0], [16.0, 16.0]],  # inside the patch on tilt 2
                  [[60.0, 48.0], [60.0, 48.0]],  # clear of it
                  [[40.0, 32.0], [40.0, 32.0]]])  # a quarter of the box in it
    assert v.usable(u, 16).tolist() == [[True, False], [True, True], [True, True]]
    assert v.usable(u, 16, max_masked=0.2).tolist() == [[True, False], [True, True], [True, False]]


def test_large_nan_patch_boxes_left_out(root, tmp_path):
    def patch(s):
        s[2, :, :70] = np.nan  # the left half of one tilt
        return s

    d = _variant(root, tmp_path, lambda d: _edit_stack(d, patch))
    res = _cli(d, "align", "--i", "optimisation_set.star", *FLAGS, "--o", "out")
    assert res.exit_code == 0, res.output
    logtext = (d / "out/polish3d.log").read_text()
    assert "8960 non-finite pixel(s) (NaN/inf) in 1 tilt image(s)" in logtext
    assert "particle–tilt box(es) lie mostly (> 50 %) in masked pixels and are left out" in logtext
    from polish3d.score import score

    s = score(d / "out/optimisation_set.star", d / "truth/optimisation_set.star")
    assert s["overall"]["rms"] < 0.5


def test_output_folder_rules(tmp_path):
    """Unit: what check_output_folder accepts (a folder holding inputs under other names) and
    refuses (an input in temp/, an output name that is an input)."""
    from polish3d.errors import OutputRefused
    from polish3d.output_folder import check_output_folder

    project = tmp_path / "project"
    (project / "Extract/job010").mkdir(parents=True)
    parts = project / "Extract/job010/particles.star"
    parts.write_text("x")
    mine = project / "my_particles.star"
    mine.write_text("y")
    check_output_folder(project, {"particle set": parts})  # a RELION project folder: fine
    check_output_folder(project, {"particle set": mine})  # another name in the same folder: fine
    check_output_folder(tmp_path / "new/deeper", {"particle set": parts})  # not created yet: fine
    with pytest.raises(OutputRefused, match="would overwrite the input particle set"):
        check_output_folder(project / "Extract/job010", {"particle set": parts})
    with pytest.raises(OutputRefused, match="tilt_series/TS_01.star would overwrite"):
        ts = project / "tilt_series/TS_01.star"
        ts.parent.mkdir()
        ts.write_text("z")
        check_output_folder(project, {"tilt-series STAR of TS_01": ts}, ["tilt_series/TS_01.star"])
    (project / "temp").mkdir()
    (project / "temp/ref.mrc").write_text("r")
    with pytest.raises(OutputRefused, match="lies in temp/ of the output folder"):
        check_output_folder(project, {"reference half map 1": project / "temp/ref.mrc"})
    assert not (project / ".polish3d.lock").exists() and not (project / "polish3d.log").exists()


# ----------------------------------------------------------------------------------------------
# score


def test_score_without_common_particles(root, tmp_path):
    from polish3d.io import read_star, write_star

    d = tmp_path / "renamed"
    shutil.copytree(root / "sim", d)
    blocks = read_star(d / "particles.star")
    t = blocks["particles"].copy()
    t["rlnTomoParticleName"] = [f"TS_01/x{k}" for k in range(len(t))]
    blocks["particles"] = t
    write_star(d / "particles.star", blocks)
    res = _cli(d, "score", "optimisation_set.star", "truth/optimisation_set.star", "--json", "s.json")
    text = _clean_message(res)
    assert res.exit_code == 2, text
    assert "no particle is in both sets" in text and "nan" not in text.lower()
    assert not (d / "s.json").exists()


def test_score_json_not_writable(root, tmp_path):
    if os.geteuid() == 0:
        target = Path("/sys/kernel/score.json")
        if not target.parent.is_dir():
            pytest.skip("no read-only folder for root here")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        target = tmp_path / "ro/score.json"
    res = _cli(root / "sim", "score", "optimisation_set.star", "truth/optimisation_set.star",
               "--json", target)
    text = _clean_message(res)
    assert res.exit_code == 2, text
    assert f"--json {target}: cannot write it" in text


def test_score_json_is_strict(root, tmp_path):
    res = _cli(root / "sim", "score", "optimisation_set.star", "truth/optimisation_set.star", "--json",
               tmp_path / "s.json")
    assert res.exit_code == 0, res.output

    data = json.loads((tmp_path / "s.json").read_text(), parse_constant=_no_constants)
    assert data["overall"]["n"] == 8 * 7


# ----------------------------------------------------------------------------------------------
# simulate


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--n_particles", "0"], "--n_particles 0: expected at least 1 particle"),
        (["--n_particles", "-2"], "--n_particles -2"),
        (["--n_tomograms", "0"], "--n_tomograms 0"),
        (["--tilt_step", "0"], "--tilt_step 0"),
        (["--tilt_min", "30", "--tilt_max", "-30"], "--tilt_min <= --tilt_max"),
        (["--tilt_min", "-90"], "strictly between -90 and 90"),
        (["--angpix", "0"], "--angpix 0"),
        (["--box", "33"], "--box 33: expected an even box size"),
        (["--image_size", "32"], "--image_size 32: expected tilt images larger than the box (32 px)"),
        (["--thickness", "0"], "--thickness 0"),
        (["--snr", "-1"], "--snr -1"),
        (["--dose", "-1"], "--dose -1"),
        (["--shift_err", "-1"], "--shift_err -1"),
        (["--s_div", "0"], "--s_div 0"),
    ],
)
def test_simulate_bad_values(tmp_path, flags, needle):
    base = ["simulate", "--n_tomograms", "1", "--n_particles", "4", "--image_size", "96", "--box", "32"]
    res = _cli(tmp_path, *base, *flags, "--o", "sim")
    _refused(res, tmp_path, "sim", needle)


def test_simulate_over_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    res = _cli(tmp_path, "simulate", "--o", "f")
    text = _clean_message(res)
    assert res.exit_code == 2 and "--o f: is an existing file" in text
    assert (tmp_path / "f").read_text() == "x"
