"""Dask scale-out: tasks on local worker processes, worker deaths re-run, data errors reported."""

from __future__ import annotations

import os
import sys

import cloudpickle
import pytest

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
