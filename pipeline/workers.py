"""Where studies are screened: in this process, in N worker processes, or on a Dask cluster.

The batch (batch.py) claims a study, hands it to a pool, and takes back an ``Outcome``:
the screening result and the result objects, not yet written (the batch writes them,
records the worklist row and moves the state on).  Every pool loads the models once per
process, and every pool reports the ``retrieved`` and ``analysed`` transitions into the
same state store as the batch.

- ``InProcessPool`` (``--workers 0``): here, one study at a time; no time or memory limit.
- ``ProcessPool`` (``--workers N``, N >= 1, the default N = 1): N worker processes under
  supervision.  A study that runs longer than ``batch.max_study_seconds`` or whose worker
  grows by more than ``batch.max_study_memory_mb`` is stopped (its worker killed and
  started afresh) and becomes "not analysed: limit-exceeded:time|memory".  A worker that
  dies otherwise gives "failed: worker-died:<exit code>", retried by the next run.
  Workers die with the batch (``PR_SET_PDEATHSIG``).
- ``DaskPool`` (``--scheduler ADDRESS``): tasks on an existing Dask distributed cluster;
  each Dask worker process loads the models once (cached by configuration).  Dask itself
  re-runs the task of a worker that died.  The time limit is enforced by the batch: the
  study becomes "limit-exceeded:time" and its task is cancelled (a running task runs on
  until it returns, its outcome ignored); memory is Dask's own worker memory limit.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Protocol

from pydicom.dataset import Dataset

from .artefacts import ScreeningResult, Status, StudyRef
from .errors import ArchiveError, ConfigError
from .state import StateStore

if TYPE_CHECKING:
    from .archive import Archive
    from .config import Config
    from .run import Stages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One study to screen: the lease holder, the study's site ('' for a plain run; it
    decides the selection rules and the state it moves) and the archive its pixels come from
    (a name under archives:, or a folder's path)."""

    study: StudyRef
    owner: str
    site: str = ""
    source: str = ""


@dataclass(frozen=True)
class Outcome:
    """One study's screening, back from a pool: nothing written yet."""

    study_uid: str
    result: ScreeningResult
    objects: list[tuple[str, Dataset]] = field(default_factory=list)
    lease_lost: bool = False  # the worker found the study taken over by another run
    site: str = ""


class Pool(Protocol):
    @property
    def capacity(self) -> int:
        """Studies it can work on at once."""
        ...

    def submit(self, job: Job) -> None: ...

    def next_done(self) -> Outcome:
        """Block until a submitted study is finished (or stopped at a limit)."""
        ...

    def close(self) -> None: ...


def refused(study: StudyRef, status: Status, code: str, algorithm_version: str) -> ScreeningResult:
    """The result of a study stopped or failed outside the stages."""
    return ScreeningResult(
        study_uid=study.study_uid,
        accession_number=study.accession_number,
        study_date=study.study_date,
        status=status,
        reasons=(code,),
        algorithm_version=algorithm_version,
        patient_name=study.patient_name,
        patient_id=study.patient_id,
    )


def screen_one(
    job: Job, stages: Stages, archive: Archive, states: StateStore | None
) -> Outcome:
    """Screen one study in this process (``stages`` and ``states`` those of the job's site);
    every failure becomes an outcome, never raises."""
    from .run import screen_study
    from .state import LeaseLost

    study, owner = job.study, job.owner

    def progress(state: Any) -> None:
        if states is not None:
            states.advance(study.study_uid, state, owner)

    version = stages.algorithm_version
    try:
        result, objects = screen_study(study, archive, stages, progress)
        return Outcome(study.study_uid, result, [(kind, _plain(ds)) for kind, ds in objects],
                       site=job.site)
    except LeaseLost:
        log.warning("study %s: taken over by another run; dropped here", study.study_uid)
        return Outcome(
            study.study_uid, refused(study, Status.FAILED, "lease-lost", version), [], True,
            site=job.site,
        )
    except MemoryError:
        log.error("study %s: over its memory limit", study.study_uid)
        code, status = "limit-exceeded:memory", Status.NOT_ANALYSED
    except ArchiveError as e:
        log.error("study %s: archive error: %s", study.study_uid, e)
        code, status = "archive-error", Status.FAILED
    except Exception as e:  # one study's defect must not stop the night
        if "bad_alloc" in str(e) or "Failed to allocate" in str(e):  # C++ libraries
            log.error("study %s: over its memory limit (%s)", study.study_uid, type(e).__name__)
            code, status = "limit-exceeded:memory", Status.NOT_ANALYSED
        else:
            log.exception("study %s: unexpected %s", study.study_uid, type(e).__name__)
            code, status = f"internal-error:{type(e).__name__}", Status.FAILED
    return Outcome(study.study_uid, refused(study, status, code, version), site=job.site)


class Workshop:
    """What one process screens with: the stages loaded once (``base``; each site's view of
    them made on first use, the models shared), the archives opened once by name, the
    state store (each site's view of it)."""

    def __init__(self, base: Stages, config: Config, states: StateStore | None,
                 archives: dict[str, Archive] | None = None,
                 by_site: dict[str, Stages] | None = None) -> None:
        self._base, self._config, self._states = base, config, states
        self._archives: dict[str, Archive] = dict(archives or {})
        self._stages: dict[str, Stages] = {"": base, **(by_site or {})}

    def screen(self, job: Job) -> Outcome:
        if job.site not in self._stages:
            self._stages[job.site] = self._base.for_site(job.site)
        if job.source not in self._archives:
            from .archive import open_named

            self._archives[job.source] = open_named(job.source, self._config)
        states = None if self._states is None else self._states.for_site(job.site)
        return screen_one(job, self._stages[job.site], self._archives[job.source], states)


def _plain(ds: Dataset) -> Dataset:
    """The same elements in a plain pydicom Dataset: highdicom's objects carry an in-memory
    SQLite database that cannot be pickled outside the thread that made it (Dask
    serialises results on another thread)."""
    out = Dataset(ds)
    out.file_meta = ds.file_meta
    out.preamble = ds.preamble
    return out


class InProcessPool:
    """Screens in this process, one study at a time (no time or memory limits), with the
    archives already open (by the name a job gives as its source)."""

    capacity = 1

    def __init__(self, stages: Stages, archives: dict[str, Archive],
                 states: StateStore | None, by_site: dict[str, Stages] | None = None) -> None:
        self._shop = Workshop(stages, stages.config, states, archives, by_site)
        self._done: deque[Outcome] = deque()

    def submit(self, job: Job) -> None:
        self._done.append(self._shop.screen(job))

    def next_done(self) -> Outcome:
        return self._done.popleft()

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ worker processes


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when the process that started it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() == 1:  # the parent died before the request was made
        os._exit(1)


def _worker_main(conn: Connection, config: Config, state_target: str, log_level: int) -> None:
    _die_with_parent()
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)-7s %(name)s[w{os.getpid()}]: %(message)s",
    )
    logging.getLogger("highdicom").setLevel(max(log_level, logging.WARNING))
    from .api import configured_views
    from .run import Stages

    stages = Stages.load(config, configured_views(config))
    shop = Workshop(stages, config, StateStore(state_target) if state_target else None)
    _limit_data(config.batch.max_study_memory_mb)
    conn.send(("ready", tree_rss(os.getpid())))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(shop.screen(job))


def _limit_data(allowance_mb: int) -> None:
    """Cap this worker's data memory at what it holds now plus ``allowance_mb``: an
    allocation beyond fails at once with MemoryError (the study becomes
    limit-exceeded:memory) instead of growing until the kernel kills something."""
    if allowance_mb <= 0:
        return
    import resource

    import numpy as np

    # OpenBLAS allocates its per-thread buffers on first use and exits the process when it
    # cannot: let it take them now, before the cap.
    a = np.ones((512, 512))
    _ = a @ a

    held = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            held = int(line.split()[1]) * 1024
    soft = held + allowance_mb * 1024**2
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (the decoding pool)."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process (spawn context)
    conn: Connection
    baseline_rss: int = 0
    study: StudyRef | None = None
    site: str = ""
    started: float = 0.0


class ProcessPool:
    """N supervised worker processes (see the module docstring)."""

    POLL_S = 0.25

    def __init__(
        self, n: int, config: Config, state_target: str, algorithm_version: str,
    ) -> None:
        if n < 1:
            raise ConfigError(f"expected at least one worker process, got {n}")
        self._config = config
        self._state_target, self._version = state_target, algorithm_version
        self._ctx = mp.get_context("spawn")
        self._workers = [self._start() for _ in range(n)]
        self._ready: deque[Outcome] = deque()
        for w in self._workers:
            self._await_ready(w)

    @property
    def capacity(self) -> int:
        return len(self._workers)

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(
            target=_worker_main,
            args=(child, self._config, self._state_target,
                  logging.getLogger("pipeline").getEffectiveLevel()),
            name="ctscreen-worker",
        )
        p.start()
        child.close()
        return _Worker(p, parent)

    def _await_ready(self, w: _Worker) -> None:
        if not w.conn.poll(300):
            raise ConfigError("a worker process did not start within 300 s")
        try:
            tag, rss = w.conn.recv()
        except EOFError:
            w.process.join()
            raise ConfigError(
                f"a worker process could not load the stages (exit code {w.process.exitcode});"
                " see the log above"
            ) from None
        assert tag == "ready"
        w.baseline_rss = int(rss)

    def submit(self, job: Job) -> None:
        w = next(w for w in self._workers if w.study is None)
        w.study, w.site, w.started = job.study, job.site, time.monotonic()
        w.conn.send(job)

    def next_done(self) -> Outcome:
        limits = self._config.batch
        while not self._ready:
            busy = [w for w in self._workers if w.study is not None]
            if not busy:
                raise RuntimeError("next_done() with nothing submitted")
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], self.POLL_S)
            now = time.monotonic()
            for w in busy:
                assert w.study is not None
                if w.conn in ready:
                    try:
                        out = w.conn.recv()
                    except (EOFError, OSError):
                        out = None
                    if out is not None:
                        self._ready.append(out)
                        w.study = None
                        continue
                if w.process.sentinel in ready or not w.process.is_alive():
                    w.process.join()
                    code = w.process.exitcode
                    log.error("study %s: its worker died (exit code %s)", w.study.study_uid, code)
                    self._replace(w, Status.FAILED, f"worker-died:{code}")
                elif limits.max_study_seconds and now - w.started > limits.max_study_seconds:
                    log.error("study %s: over batch.max_study_seconds (%.0f s); stopped",
                              w.study.study_uid, limits.max_study_seconds)
                    self._replace(w, Status.NOT_ANALYSED, "limit-exceeded:time")
                elif (
                    limits.max_study_memory_mb
                    and tree_rss(w.process.pid) - w.baseline_rss
                    > limits.max_study_memory_mb * 1024**2
                ):
                    log.error("study %s: over batch.max_study_memory_mb (%d MB); stopped",
                              w.study.study_uid, limits.max_study_memory_mb)
                    self._replace(w, Status.NOT_ANALYSED, "limit-exceeded:memory")
        return self._ready.popleft()

    def _replace(self, w: _Worker, status: Status, code: str) -> None:
        """Stop ``w`` (its study ends with ``code``) and start a fresh worker in its place."""
        assert w.study is not None
        self._ready.append(
            Outcome(w.study.study_uid, refused(w.study, status, code, self._version),
                    site=w.site)
        )
        _kill_tree(w.process.pid)
        w.process.join()
        w.conn.close()
        fresh = self._start()
        self._await_ready(fresh)
        self._workers[self._workers.index(w)] = fresh

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            w.process.join(timeout=10)
            if w.process.is_alive():
                _kill_tree(w.process.pid)
                w.process.join()
            w.conn.close()


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [*p.children(recursive=True), p]
    except psutil.Error:
        return
    for q in procs:
        try:
            q.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


# ------------------------------------------------------------------ Dask


_DASK_CACHE: dict[tuple[str, str], Workshop] = {}


def _dask_screen(job: Job, config: Config, state_target: str) -> Outcome:
    """The task run on a Dask worker: the stages are loaded once per worker process."""
    from .api import configured_views
    from .run import Stages

    key = (config.analysis_key() + repr(config.archives) + repr(config.sites)
           + config.web.view_store, state_target)
    if key not in _DASK_CACHE:
        _DASK_CACHE[key] = Workshop(
            Stages.load(config, configured_views(config)), config,
            StateStore(state_target) if state_target else None)
    return _DASK_CACHE[key].screen(job)


class DaskPool:
    """Tasks on an existing Dask distributed cluster (see the module docstring)."""

    POLL_S = 0.5

    def __init__(
        self, address: str, config: Config, state_target: str, algorithm_version: str,
    ) -> None:
        try:
            from distributed import Client
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ConfigError(
                "--scheduler needs dask and distributed (pip install 'ctscreen[cluster]')"
            ) from e
        try:
            self._client = Client(address, timeout=30)
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"cannot reach the Dask scheduler at {address}: {e}") from e
        self._config = config
        self._state_target, self._version = state_target, algorithm_version
        self._futures: dict[Any, tuple[Job, float]] = {}
        self._ready: deque[Outcome] = deque()
        # decoding in a pool of processes is not allowed inside daemonic Dask workers
        self._task_config = replace(config, volume=replace(config.volume, decode_workers=1))
        # asked once: the batch consults it before every claim, and each ask is a round trip
        # to the scheduler
        self._capacity = max(1, sum(self._client.nthreads().values()))

    @property
    def capacity(self) -> int:
        return self._capacity

    def submit(self, job: Job) -> None:
        fut = self._client.submit(
            _dask_screen, job, self._task_config, self._state_target, pure=False,
            key=f"ctscreen-{job.site}-{job.study.study_uid}-{job.owner[-12:]}",
        )
        self._futures[fut] = (job, time.monotonic())

    def next_done(self) -> Outcome:
        from distributed import wait as dask_wait

        limit = self._config.batch.max_study_seconds
        while not self._ready:
            if not self._futures:
                raise RuntimeError("next_done() with nothing submitted")
            try:
                done, _ = dask_wait(
                    list(self._futures), timeout=self.POLL_S, return_when="FIRST_COMPLETED"
                )
            except TimeoutError:
                done = set()
            now = time.monotonic()
            for fut in list(self._futures):
                job, started = self._futures[fut]
                study = job.study
                if fut in done or fut.done():
                    del self._futures[fut]
                    try:
                        self._ready.append(fut.result())
                    except Exception as e:  # noqa: BLE001 - the task failed (e.g. KilledWorker)
                        log.error("study %s: task failed on the cluster: %s",
                                  study.study_uid, type(e).__name__)
                        self._ready.append(Outcome(study.study_uid, refused(
                            study, Status.FAILED, f"worker-died:{type(e).__name__}",
                            self._version), site=job.site))
                elif limit and now - started > limit:
                    del self._futures[fut]
                    fut.cancel()
                    log.error("study %s: over batch.max_study_seconds; cancelled",
                              study.study_uid)
                    self._ready.append(Outcome(study.study_uid, refused(
                        study, Status.NOT_ANALYSED, "limit-exceeded:time", self._version),
                        site=job.site))
        return self._ready.popleft()

    def close(self) -> None:
        self._client.close()
