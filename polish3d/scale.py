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

Start-up: local workers import polish3d and JAX as they start (:func:`dask_setup`, a worker
preload), and without the nanny's ``MALLOC_TRIM_THRESHOLD_`` (see :func:`_client`). The
workers' ``polish3d`` log records (WARNING and up, or ``POLISH3D_WORKER_LOG``) reach the
driver's log.
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


#: environment of local worker processes: their threads and the cores to share out (comma list)
_ENV_THREADS, _ENV_CORES = "POLISH3D_WORKER_THREADS", "POLISH3D_WORKER_CORES"
_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
#: level of the worker log records forwarded to the driver's log (default WARNING)
ENV_WORKER_LOG = "POLISH3D_WORKER_LOG"


def setup_worker(name, threads: int, available: list[int], log_level: str = "WARNING") -> None:
    """Make a worker process ready for tomogram tasks: threads limited (and pinned to cores of its
    own when ``name`` is a local worker's index and ``available`` lists the cores), the persistent
    compilation cache on, the ``polish3d`` log level set (records at or above it go to the driver).
    """
    try:
        index = int(name)
    except (TypeError, ValueError):
        index = None
    if index is None or not available:  # a worker of an external cluster: BLAS limit only
        limit_threads(threads)
    else:
        limit_threads(threads, worker_cores(index, threads, available))
    logging.getLogger("polish3d").setLevel(log_level)
    from polish3d.api import enable_compilation_cache

    enable_compilation_cache()  # the driver's compiled programs serve the workers too


def dask_setup(worker) -> None:
    """Preload of the local workers (``distributed`` calls it as a worker starts, before tasks
    arrive): :func:`setup_worker`, then JAX and the refinement imported and JAX's backend
    started, so that the first task finds them ready."""
    available = [int(c) for c in os.environ.get(_ENV_CORES, "").split(",") if c]
    setup_worker(worker.name, int(os.environ.get(_ENV_THREADS, "1")), available,
                 os.environ.get(ENV_WORKER_LOG, "WARNING"))
    import jax

    import polish3d.tomogram_jobs  # noqa: F401 - the task's module and what it imports
    from polish3d.refine import tomogram  # noqa: F401

    jax.devices()


def _setup_plugin(threads: int, log_level: str):
    """A worker plugin that sets up each worker of an external cluster (:func:`setup_worker`)."""
    from distributed import WorkerPlugin

    class SetupWorker(WorkerPlugin):
        def setup(self, worker) -> None:
            setup_worker(worker.name, threads, [], log_level)

    return SetupWorker()


@dataclass
class TaskOutcome:
    """What became of one task: its return value, or the error that ended it."""

    key: str
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Cluster:
    """A Dask client and the local cluster it started, both made in a background thread, and
    closed there too (:meth:`close` with ``wait=False``: the driver goes on writing meanwhile)."""

    def __init__(self, options: ClusterOptions):
        from concurrent.futures import ThreadPoolExecutor

        self.options = options
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="polish3d-cluster")
        self._started = self._pool.submit(_client, options)

    def client(self):
        """The connected client (waits for the start; raises what stopped it)."""
        return self._started.result()[0]

    def close(self, wait: bool = True) -> None:
        """Close the client and the local cluster (also when the start failed); ``wait=False``:
        in the background (the workers take seconds to stop; Python waits for it at exit)."""
        self._pool.submit(self._close)
        self._pool.shutdown(wait=wait)

    def _close(self) -> None:
        try:
            client, cluster = self._started.result()
        except Exception:  # noqa: BLE001 - nothing was started; the error was reported by client()
            return
        client.close()
        if cluster is not None:
            cluster.close()


def _client(options: ClusterOptions):
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - distributed is a dependency
        raise RuntimeError("--workers/--scheduler need the 'distributed' package") from exc
    for name in ("distributed", "tornado", "bokeh"):  # their INFO lines are not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)
    log_level = os.environ.get(ENV_WORKER_LOG, "WARNING").upper()
    if not isinstance(logging.getLevelName(log_level), int):
        raise ValueError(f"{ENV_WORKER_LOG} must name a log level (DEBUG, INFO, WARNING…), got {log_level!r}")
    if options.scheduler:
        cluster, client = None, Client(options.scheduler, timeout="30s")
        # the cores of other machines are not ours to pin
        client.register_plugin(_setup_plugin(options.threads_per_worker, log_level), name="polish3d-setup")
    else:
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        env = {_ENV_THREADS: str(options.threads_per_worker), _ENV_CORES: ",".join(map(str, available)),
               ENV_WORKER_LOG: log_level}
        # glibc's default memory trimming: the nanny's MALLOC_TRIM_THRESHOLD_=65536 gives every
        # freed block back to the OS, and the page faults of taking it again cost a refinement
        # ~20 % more CPU (sys time); the other variables (threads) stay
        with dask.config.set({_TRIM: None}):
            cluster = LocalCluster(
                n_workers=options.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR, preload=[__name__], env=env,
            )
        client = Client(cluster)
    client.forward_logging("polish3d", level=log_level)  # the workers' warnings reach the log
    return client, cluster


def run_tasks(
    fn: Callable[..., Any],
    arguments: Mapping[str, tuple],
    options: ClusterOptions,
    *,
    on_done: Callable[[TaskOutcome, int, int], None] | None = None,
) -> dict[str, TaskOutcome]:
    """Run ``fn(*arguments[key])`` for every key as Dask tasks; collect outcomes as they finish.

    ``fn`` and its arguments must be picklable (a module-level function). Tasks are submitted in
    the order of ``arguments`` (put the longest first), on the cluster ``options`` describe (a
    :class:`Cluster`: connected to ``options.scheduler`` or started locally). A task whose worker
    dies is re-run by the scheduler; a task that raises is reported in its outcome and the others
    go on.
    ``on_done(outcome, n_done, n_total)`` is called in the calling process as each task ends.
    Returns the outcomes by key (in the order of ``arguments``) once all have ended; the cluster
    is then closed in the background.
    """
    from distributed import as_completed

    cluster = Cluster(options)
    try:
        client = cluster.client()
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
        cluster.close(wait=False)  # the driver goes on writing the outputs meanwhile
