"""One tomogram across devices: 2 CPU host devices give the 1-device geometry (float32 sums aside)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _helpers import CLI_MAIN

_TWO_DEVICES = "--xla_force_host_platform_device_count=2"

#: reprojection difference allowed between the 2-device and the 1-device geometry (pixels): the
#: sums over particles run in another order (float32), which moves L-BFGS's path a little
TOLERANCE_PX = 0.002


def _run(code: str, env_extra: dict, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_devices_split_particles_and_replicate():
    code = """
import jax, numpy as np
from polish3d.refine import devices, stage2
assert devices.count() == 2, jax.devices()
assert stage2.pad_to_bucket(10) == 64 and devices.round_up(63) == 64
tree = {"rows": np.zeros((64, 3), np.float32), "tilts": np.zeros((41, 2)), "k": np.float32(1)}
out = devices.split_particles(tree, 64)
assert len(out["rows"].sharding.device_set) == 2
assert out["rows"].addressable_shards[0].data.shape == (32, 3)
assert out["tilts"].sharding.is_fully_replicated and out["k"].sharding.is_fully_replicated
print("ok")
"""
    proc = _run(code, {"XLA_FLAGS": _TWO_DEVICES})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    limited = "from polish3d.refine import devices; assert devices.mesh() is None and devices.count() == 1"
    proc = _run(limited, {"XLA_FLAGS": _TWO_DEVICES, "POLISH3D_DEVICES": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one_tomogram(tmp_path_factory):
    from _helpers import tiny_simulation

    return tiny_simulation(tmp_path_factory.mktemp("devices"), n_particles=40, image_px=192,
                           tilt_step_deg=6, seed=7).out_dir


def _align(project, out: str, env_extra: dict) -> str:
    args = ["align", "--i", "optimisation_set.star", "--b", "32", "--r", "8", "--j", "2", "--o", out]
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", CLI_MAIN, *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_align_on_two_host_devices_matches_one_device(one_tomogram):
    from polish3d.score import score

    _align(one_tomogram, "One/", {})  # the default: one CPU device
    log_two = _align(one_tomogram, "Two/", {"XLA_FLAGS": _TWO_DEVICES})
    assert "particles split across 2 devices" in log_two
    metrics = {name: json.loads((one_tomogram / name / "metrics.json").read_text())["tomograms"]
               for name in ("One", "Two")}
    (m_one,), (m_two,) = metrics["One"].values(), metrics["Two"].values()
    assert m_one["devices"] == 1 and m_two["devices"] == 2
    # every L-BFGS run's data really lay on both devices
    assert {st["devices"] for st in m_two["outer"]} == {2}
    assert {st["devices"] for st in m_one["outer"]} == {1}
    cwd = os.getcwd()
    os.chdir(one_tomogram)
    try:
        diff = score("Two/optimisation_set.star", "One/optimisation_set.star")["overall"]
        truth = [score(f"{n}/optimisation_set.star", "truth/optimisation_set.star")["overall"]["rms"]
                 for n in ("One", "Two")]
    finally:
        os.chdir(cwd)
    assert diff["max"] <= TOLERANCE_PX, diff
    assert np.isclose(truth[0], truth[1], atol=TOLERANCE_PX), truth
