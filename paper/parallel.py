"""``reproduce.py --jobs N``: the plan's trainings, then its studies, in N worker processes.

Each worker is a fresh (spawned) Python process with ``torch.set_num_threads(threads)``; the
trainings and studies do exactly what they do in one process (``paper.run``): their own folders,
markers and resumption. Small networks use two cores better as two one-thread processes than as
one two-thread process (the step is mostly Python and small kernels), so a 2-core machine runs
the plan faster with ``--jobs 2``.

Order: the costliest first (a training's epochs x L, a study's checkpoints x grid points x
chips), so the last to start are the short ones; a distillation run starts after its teacher.
"""

from __future__ import annotations

import concurrent.futures as cf
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
    waiting = sorted(tasks, key=lambda t: -t.cost)
    results: dict[str, object] = {}
    running: dict[cf.Future, tuple[Task, float]] = {}
    context = multiprocessing.get_context("spawn")  # no forked torch threads or locks
    with cf.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_start_worker, initargs=(threads_per_job(jobs),)
    ) as pool:

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
                    for other in running:
                        other.cancel()
                    raise
                progress(f"{task.name}: finished in {time.time() - start:.0f} s")
            submit_ready()
        if waiting:  # cannot happen: every need is planned and finishes or raises
            raise RuntimeError(f"tasks never ready: {[t.name for t in waiting]}")
    return results
