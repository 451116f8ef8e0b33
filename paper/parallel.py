"""``reproduce.py --jobs N``: the plan's trainings, then its studies, in N worker processes.

Each worker is a fresh (spawned) Python process with ``torch.set_num_threads(threads)``; the
trainings and studies do exactly what they do in one process (``paper.run``): their own folders,
markers and resumption. Small networks use two cores better as two one-thread processes than as
one two-thread process (the step is mostly Python and small kernels), so a 2-core machine runs
the plan faster with ``--jobs 2``.

Order: the costliest first (a training's epochs x L, a study's checkpoints x grid points x
chips; a task others wait for counts their cost too, so a teacher starts early), so the last to
start are the short ones; a distillation run starts after its teacher. If one fails, the others
running finish (their folders resume on the next call), none starts, and its error is raised.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Task:
    """One training or study: ``call(*args)`` in a worker; ``needs`` the tasks it waits for
    (a teacher); ``cost`` orders the ready tasks (the costliest first)."""

    name: str
    call: Callable
    args: tuple
    cost: float = 0.0
    needs: tuple[str, ...] = ()


def _ranks(tasks: list[Task]) -> dict[str, float]:
    """Each task's cost plus the largest rank of the tasks that need it (the work it holds up);
    a cycle of needs is refused."""
    needed_by: dict[str, list[Task]] = {t.name: [] for t in tasks}
    for t in tasks:
        for n in t.needs:
            needed_by[n].append(t)
    rank: dict[str, float] = {}

    def of(t: Task, path: tuple[str, ...]) -> float:
        if t.name in path:
            raise ValueError(f"tasks need each other: {' -> '.join((*path, t.name))}")
        if t.name not in rank:
            after = [of(d, (*path, t.name)) for d in needed_by[t.name]]
            rank[t.name] = t.cost + max(after, default=0.0)
        return rank[t.name]

    for t in tasks:
        of(t, ())
    return rank


@contextlib.contextmanager
def _environ(**values: str):
    """``os.environ`` with ``values`` set (the workers inherit them at spawn), then restored."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def threads_per_job(jobs: int) -> int:
    """Torch threads in each of ``jobs`` workers: this process's threads shared out, >= 1."""
    return max(1, torch.get_num_threads() // jobs)


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("WANDB_MODE", "offline")


class Line:
    """A worker's progress: one line per stage, named by the worker (``paper.run`` calls it as
    it calls ``paper.run.Progress``)."""

    def __call__(self, what: str) -> None:
        print(f"[reproduce worker {os.getpid()}] {what}", flush=True)


def run_tasks(tasks: list[Task], jobs: int, progress: Callable[[str], None]) -> dict[str, object]:
    """Run ``tasks`` in ``jobs`` workers, a task once every task it ``needs`` has finished;
    returns each task's result by name. The first task to fail stops the rest from starting
    (those running finish) and its error is raised."""
    names = {t.name for t in tasks}
    for t in tasks:
        missing = [n for n in t.needs if n not in names]
        if missing:
            raise ValueError(f"task {t.name} needs {missing}, which are not planned")
    rank = _ranks(tasks)
    waiting = sorted(tasks, key=lambda t: -rank[t.name])
    results: dict[str, object] = {}
    running: dict[cf.Future, tuple[Task, float]] = {}
    context = multiprocessing.get_context("spawn")  # no forked torch threads or locks
    threads = threads_per_job(jobs)
    with (
        _environ(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)),
        cf.ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_start_worker, initargs=(threads,)
        ) as pool,
    ):

        def submit_ready() -> None:
            for t in [t for t in waiting if all(n in results for n in t.needs)]:
                if len(running) >= jobs:
                    return
                waiting.remove(t)
                running[pool.submit(t.call, *t.args)] = (t, time.time())

        submit_ready()
        while running:
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                task, start = running.pop(future)
                try:
                    results[task.name] = future.result()
                except BaseException:
                    waiting.clear()
                    others = ", ".join(t.name for t, _ in running.values())
                    if others:
                        progress(f"{task.name} failed: waiting for {others} to finish")
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
                progress(f"{task.name}: finished in {time.time() - start:.0f} s")
            submit_ready()
        if waiting:  # cannot happen: every need is planned and finishes or raises
            raise RuntimeError(f"tasks never ready: {[t.name for t in waiting]}")
    return results
