"""Where a pack's tasks run: this machine's processes (``local``) or a Ray cluster (``ray``).

An engine is given ``call`` (a picklable ``call(task, progress=None) -> entry``: the same
``run_task`` bound to the plan's destination whatever the engine, so an ``s3://`` output's
storage options travel with it to every worker) and the tasks to run; it runs each once and
reports each finished task to ``progress``. Task outputs are pure functions of the plan, so every engine
writes the same bytes. A failure stops the engine: tasks already finished keep their
fragments, running ones are cancelled (their temporaries are swept by the next run).

Array jobs under a scheduler (``pack --tasks N --task-index I``) need no engine: each array
task runs its share with ``local``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

log = logging.getLogger("wdsrefresh")

ENGINES = ("local", "ray")


class Progress(Protocol):
    def bytes_done(self, nbytes: int) -> None: ...

    def task_done(self, task: Any) -> None: ...


def run_tasks(engine: str, call: Callable, tasks: Sequence, jobs: int, progress: Progress) -> None:
    """Runs ``call(task)`` for every task on ``engine``, ``jobs`` at a time (for ``ray``: the
    CPUs of the local cluster it starts when none is running and ``RAY_ADDRESS`` is unset)."""
    if engine == "local":
        run_local(call, tasks, jobs, progress)
    elif engine == "ray":
        run_ray(call, tasks, jobs, progress)
    else:
        raise ValueError(f"unknown engine {engine!r} (expected one of {', '.join(ENGINES)})")


def run_local(call: Callable, tasks: Sequence, jobs: int, progress: Progress) -> None:
    """In this process (``jobs`` 1), or in ``jobs`` spawned processes that die with it."""
    if jobs == 1 or len(tasks) < 2:
        for task in tasks:
            call(task, progress.bytes_done)
            progress.task_done(task)
        return
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context, initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(call, task): task for task in tasks}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    future.result()
                    _finished(progress, futures[future])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # finished tasks keep their fragments
            raise


def _finished(progress: Progress, task: Any) -> None:
    progress.bytes_done(task.size)  # the shard's bytes, as write_shard reports them in process
    progress.task_done(task)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: a pack killed with -9 leaves no worker writing behind it (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _ray_call(call: Callable, task: Any) -> Any:
    return call(task)


def run_ray(call: Callable, tasks: Sequence, jobs: int, progress: Progress) -> None:
    """As Ray tasks: on the cluster at ``RAY_ADDRESS``, on the one this process already joined,
    or on a local one started here with ``jobs`` CPUs and shut down at the end. Every node must
    see the inputs at the same paths, and OUT: a shared file system, or an object store that
    ``call``'s destination (with its storage options) reaches."""
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'wdsrefresh[ray]'") from None
    started = not ray.is_initialized()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=jobs, include_dashboard=False, logging_level=logging.WARNING)
    try:
        remote = ray.remote(max_retries=0, num_cpus=1)(_ray_call)
        futures = {remote.remote(call, task): task for task in tasks}
        pending = list(futures)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done[0])  # a task's error is raised here, as its own exception class too
                _finished(progress, futures[done[0]])
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()
