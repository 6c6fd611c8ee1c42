"""Scale-out on Dask: one task per tomogram, on local worker processes or an existing cluster.

``polish3d align --workers N`` starts a local Dask cluster of ``N`` worker processes;
``--scheduler ADDRESS`` connects to a running one (``dask scheduler`` + ``dask worker``, or a
``dask-jobqueue`` cluster on a batch system). Without either nothing here is imported and the
tomograms run one after another in the calling process.

The unit of work is one tomogram: a task reads its own inputs, refines, stores its result in the
resume store of the output folder and returns a small summary. The driver alone writes the final
STAR files, from the resume store, so where or in which order a tomogram ran does not change the
answer. A worker that dies mid-task (killed, out of memory) has its task re-run elsewhere by the
scheduler (up to ``distributed.scheduler.allowed-failures`` times); a task that raises (bad data)
is reported and the others go on.

Threads: every local worker is pinned to ``threads`` CPU cores of its own (XLA sizes its thread
pool from the process's CPU affinity), so that ``workers × threads`` matches the cores. Host BLAS
runs one thread per worker: the Dask nanny starts every worker process with
``OPENBLAS_NUM_THREADS=1`` (and ``OMP``/``MKL``; ``distributed.nanny.pre-spawn-environ``), before
NumPy loads — the same limit the command line sets for itself (:mod:`polish3d.cli`). Workers of
an external cluster keep the affinity their launcher gave them (``dask worker --nthreads 1`` and
the batch system's core binding).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("polish3d")

_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ClusterOptions:
    """Where tomogram tasks run.

    Attributes:
        workers: local worker processes to start (0: none).
        scheduler: address of a running Dask scheduler (``tcp://host:8786``); empty: none.
        threads_per_worker: CPU threads per worker (``--j``).
    """

    workers: int = 0
    scheduler: str = ""
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.workers and self.scheduler:
            raise ValueError("give either workers (a local cluster) or scheduler (an existing one)")

    @property
    def distributed(self) -> bool:
        """True when tasks go to Dask (a local cluster or an existing scheduler)."""
        return bool(self.workers or self.scheduler)


def limit_threads(threads: int, cores: list[int] | None = None) -> None:
    """Limit this process to ``threads`` CPU threads; call before JAX starts.

    Sets the BLAS/OpenMP thread variables (read by libraries loaded from now on; NumPy's OpenBLAS,
    already loaded in a Dask worker, keeps the nanny's limit of 1) and, when ``cores`` is given,
    pins the process to those CPU cores (XLA's CPU thread pool is sized from the affinity mask).
    """
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores))


def worker_cores(index: int, threads: int, available: list[int]) -> list[int]:
    """The ``threads`` cores of local worker ``index``: consecutive blocks, wrapping around."""
    return [available[(index * threads + k) % len(available)] for k in range(threads)]


def _pin_threads_plugin(threads: int, available: list[int]):
    """A Dask worker plugin that limits each worker's threads before its first task imports JAX."""
    from distributed import WorkerPlugin

    class PinThreads(WorkerPlugin):
        def setup(self, worker) -> None:
            try:
                index = int(worker.name)
            except (TypeError, ValueError):
                index = None
            if index is None or not available:  # a worker of an external cluster: BLAS limit only
                limit_threads(threads)
            else:
                limit_threads(threads, worker_cores(index, threads, available))
            from polish3d.api import enable_compilation_cache

            enable_compilation_cache()  # the driver's compiled programs serve the workers too

    return PinThreads()


@dataclass
class TaskOutcome:
    """What became of one task: its return value, or the error that ended it."""

    key: str
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _client(options: ClusterOptions):
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise RuntimeError("--workers/--scheduler need the 'distributed' package") from exc
    for name in ("distributed", "tornado", "bokeh"):  # their INFO lines are not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)
    if options.scheduler:
        cluster, client = None, Client(options.scheduler, timeout="30s")
        available = []  # the cores of other machines are not ours to pin
    else:
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        cluster = LocalCluster(
            n_workers=options.workers, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
    plugin = _pin_threads_plugin(options.threads_per_worker, available)
    client.register_plugin(plugin, name="polish3d-threads")
    return client, cluster


def run_tasks(
    fn: Callable[..., Any],
    arguments: Mapping[str, tuple],
    options: ClusterOptions,
    *,
    on_done: Callable[[TaskOutcome, int, int], None] | None = None,
) -> dict[str, TaskOutcome]:
    """Run ``fn(*arguments[key])`` for every key as Dask tasks; collect outcomes as they finish.

    ``fn`` and its arguments must be picklable (a module-level function). A task whose worker
    dies is re-run by the scheduler; a task that raises is reported in its outcome and the others
    go on. ``on_done(outcome, n_done, n_total)`` is called in the calling process as each task
    ends. Returns the outcomes by key (in the order of ``arguments``).
    """
    from distributed import as_completed

    client, cluster = _client(options)
    try:
        futures = {
            client.submit(fn, *args, key=f"polish3d-{key}", pure=False): key
            for key, args in arguments.items()
        }
        outcomes: dict[str, TaskOutcome] = {}
        for n_done, future in enumerate(as_completed(futures), start=1):
            key = futures[future]
            try:
                outcome = TaskOutcome(key, value=future.result())
            except Exception as exc:  # a data error, or a task killed too often (KilledWorker)
                outcome = TaskOutcome(key, error=exc)
            outcomes[key] = outcome
            if on_done is not None:
                on_done(outcome, n_done, len(futures))
        return {key: outcomes[key] for key in arguments}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
