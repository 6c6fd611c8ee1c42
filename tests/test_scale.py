"""Dask scale-out: tasks on local worker processes, worker deaths re-run, data errors reported."""

from __future__ import annotations

import os
import sys

import cloudpickle
import pytest
from _helpers import CLI_MAIN

from polish3d.scale import ClusterOptions, run_tasks, worker_cores

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


def _square_or_die(x: int, marker: str):
    """Kill the worker process the first time (marker file absent); raise for x == 3."""
    if marker and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        os._exit(1)
    if x == 3:
        raise ValueError("bad data in 3")
    return x * x, os.environ.get("OPENBLAS_NUM_THREADS"), sorted(os.sched_getaffinity(0))


def test_worker_cores_blocks_wrap():
    assert worker_cores(0, 1, [0, 1]) == [0]
    assert worker_cores(1, 1, [0, 1]) == [1]
    assert worker_cores(1, 2, [0, 1, 2, 3]) == [2, 3]
    assert worker_cores(2, 1, [4, 5]) == [4]  # more workers than cores: wrap around


def test_cluster_options_checks():
    assert not ClusterOptions().distributed
    assert ClusterOptions(workers=2).distributed
    assert ClusterOptions(scheduler="tcp://h:8786").distributed
    with pytest.raises(ValueError, match="either"):
        ClusterOptions(workers=2, scheduler="tcp://h:8786")
    with pytest.raises(ValueError, match="threads_per_worker"):
        ClusterOptions(workers=2, threads_per_worker=0)


def test_killed_worker_is_rerun_and_data_error_reported(tmp_path):
    marker = str(tmp_path / "killed_once")
    seen = []
    out = run_tasks(
        _square_or_die,
        {str(i): (i, marker if i == 1 else "") for i in range(5)},
        ClusterOptions(workers=2, threads_per_worker=1),
        on_done=lambda o, k, n: seen.append((o.key, k, n)),
    )
    assert os.path.exists(marker)  # task 1 did kill its worker once
    assert list(out) == ["0", "1", "2", "3", "4"]
    assert [o.value[0] for k, o in out.items() if k != "3"] == [0, 1, 4, 16]
    assert not out["3"].ok and "bad data in 3" in str(out["3"].error)
    assert sorted(k for k, _, _ in seen) == ["0", "1", "2", "3", "4"]
    assert [k for _, k, _ in seen] == [1, 2, 3, 4, 5] and {n for _, _, n in seen} == {5}
    for key in ("0", "1", "2", "4"):
        _, blas_threads, cores = out[key].value
        assert blas_threads == "1"
        assert len(cores) == 1  # each worker pinned to one core of its own


# ------------------------------------------------------------------------------------------------
# polish3d align --workers: the same files as the serial run, also when a worker is killed
# ------------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def two_tomograms(tmp_path_factory):
    from _helpers import tiny_simulation

    return tiny_simulation(tmp_path_factory.mktemp("scale"), n_tomograms=2, n_particles=12, image_px=160,
                           tilt_step_deg=10, seed=5).out_dir


def _align_cli(project, out, *extra, env=None):
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-c", CLI_MAIN, "align", "--i", "optimisation_set.star", "--b", "32", "--r", "8",
         "--o", out, *extra], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=None if env is None else {**os.environ, **env})


def _star_files(folder):
    """The STAR files of an output folder, with the folder's own name taken out of the paths."""
    return {p.relative_to(folder).as_posix(): p.read_text().replace(f"{folder.name}/", "OUT/")
            for p in sorted(folder.rglob("*.star")) if p.name != "RELION_OUTPUT_NODES.star"}


@pytest.fixture(scope="module")
def serial_run(two_tomograms):
    """The serial run's output folder (the result every distributed run must reproduce)."""
    serial = _align_cli(two_tomograms, "Serial/", "--j", "2")
    out = serial.communicate(timeout=600)[0]
    assert serial.returncode == 0, out[-3000:]
    return two_tomograms / "Serial"


def test_align_workers_same_as_serial_after_a_worker_is_killed(two_tomograms, serial_run):
    """Both workers are killed as soon as a worker reports (forwarded log line) that it started
    refining; the scheduler re-runs their tasks on the restarted workers."""
    import threading

    import psutil

    run = _align_cli(two_tomograms, "Dask/", "--j", "1", "--workers", "2",
                     env={"POLISH3D_WORKER_LOG": "INFO"})  # the workers' "Tomogram 1 / 2: …" lines
    watchdog = threading.Timer(600, run.kill)
    watchdog.start()
    try:
        killed, lines = [], []
        for line in run.stdout:
            lines.append(line)
            if not killed and "Tomogram " in line and " / 2: TS_0" in line:
                assert not list((two_tomograms / "Dask" / "temp").glob("*.npz"))  # mid-task
                workers = [p for p in psutil.Process(run.pid).children(recursive=True)
                           if "spawn_main" in " ".join(p.cmdline())]
                for worker in workers:
                    worker.kill()
                killed = [w.pid for w in workers]
        run.wait()
    finally:
        watchdog.cancel()
    out = "".join(lines)
    assert killed, "no worker reported a tomogram:\n" + out[-3000:]
    assert run.returncode == 0, out[-3000:]
    assert "2 / 2 finished" in out
    assert _star_files(two_tomograms / "Dask") == _star_files(serial_run)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc) -> None:
    """End a process started in its own session, and its children (the worker processes)."""
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def test_align_scheduler_of_a_separately_started_cluster_same_as_serial(two_tomograms, serial_run, tmp_path):
    """`dask scheduler` + `dask worker --nworkers 2` started apart; `--scheduler` uses them."""
    import subprocess
    from pathlib import Path

    from distributed import Client

    dask = Path(sys.executable).with_name("dask")
    if not dask.exists():
        pytest.skip("the dask command line is not installed next to this Python")
    address = f"tcp://127.0.0.1:{_free_port()}"
    common = dict(cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started = []
    try:
        started.append(subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
            **common))
        started.append(subprocess.Popen(
            [dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard"], **common))
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        run = _align_cli(two_tomograms, "External/", "--j", "1", "--scheduler", address)
        out = run.communicate(timeout=600)[0]
        assert run.returncode == 0, out[-3000:]
        assert f"as Dask tasks on {address}" in out and "2 / 2 finished" in out
        assert _star_files(two_tomograms / "External") == _star_files(serial_run)
    finally:
        for proc in reversed(started):
            _stop(proc)
