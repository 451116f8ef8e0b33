"""``reproduce.py --jobs N``: tasks in worker processes, a teacher before its student, the
costliest first, a failure raised; the plan's records and rows the same as in one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cimsim import ConfigError
from cimsim.data import CIFARDataModule
from paper.driver import prepare_data_once
from paper.parallel import Task, run_tasks, threads_per_job
from paper.plan import RUN
from reproduce import parse, reproduce


def test_a_task_starts_after_what_it_needs_and_the_costliest_first(tmp_path):
    """``b`` reads the file ``a`` writes: it fails unless ``a`` finished first, though ``b`` is
    the costliest (without its need it would start first). With one worker the order is the
    ranks': ``a`` holds up ``b`` (cost 1 + 9), so it starts before ``c`` (5), then ``d`` (2)."""
    a, c, d = tmp_path / "a.txt", tmp_path / "c.txt", tmp_path / "d.txt"
    tasks = [
        Task("a", Path.write_text, (a, "from a"), cost=1.0),
        Task("b", Path.read_text, (a,), cost=9.0, needs=("a",)),
        Task("c", Path.write_text, (c, "from c"), cost=5.0),
        Task("d", Path.write_text, (d, "d"), cost=2.0),
    ]
    said = []
    results = run_tasks(tasks, 1, said.append)
    assert results == {"a": 6, "b": "from a", "c": 6, "d": 1}
    assert [s.split(":")[0] for s in said] == ["a", "b", "c", "d"]
    a.unlink()
    assert run_tasks(tasks, 2, said.append)["b"] == "from a"


def test_a_failing_task_is_raised_as_itself_and_bad_needs_refused(tmp_path):
    """A worker's error comes back as the error it raised, ConfigError too (its message and
    parts intact, as reproduce.py prints it), not as a broken pool."""
    missing = tmp_path / "none.txt"
    with pytest.raises(FileNotFoundError, match="none.txt"):
        run_tasks([Task("x", Path.read_text, (missing,))], 2, lambda _: None)
    bad = ConfigError("noise.sigma", -1, "must be >= 0")
    with pytest.raises(ConfigError, match=r"^noise.sigma=-1 is invalid: must be >= 0$") as err:
        run_tasks([Task("x", _raise, (bad,))], 2, lambda _: None)
    assert (err.value.key, err.value.value, err.value.allowed) == (
        "noise.sigma",
        -1,
        "must be >= 0",
    )
    with pytest.raises(ValueError, match=r"task x needs \['y'\]"):
        run_tasks([Task("x", Path.read_text, (missing,), needs=("y",))], 2, lambda _: None)
    loop = [Task("x", Path.read_text, (missing,), needs=("y",)), Task("y", id, (1,), needs=("x",))]
    with pytest.raises(ValueError, match="tasks need each other"):
        run_tasks(loop, 2, lambda _: None)
    assert threads_per_job(10 * torch.get_num_threads()) == 1


def _raise(error: Exception):
    raise error


@pytest.mark.slow
def test_jobs_two_records_what_one_process_reuses_and_measures_the_same_rows(tmp_path):
    """A --jobs 2 tiny plan (Fig. 7 and the methods, whose distilled model needs the digital
    teacher): every training and study ran, the student after its teacher; the same command in
    one process reuses all of it; a study measured again in one process gives the same rows."""
    torch.set_num_threads(1)  # the workers' threads (2 jobs on this process's 1 thread: 1 each)
    argv = ["--tiny", "--seeds", "1", "--sections", "fig7,methods", "--out", str(tmp_path / "o")]
    argv += ["--report-dir", str(tmp_path / "docs")]
    meta = reproduce([*argv, "--jobs", "2"])
    assert (meta["jobs"], meta["threads"], meta["skipped"]) == (2, 1, 0)
    assert meta["trained"] == 12 and meta["studied"] == 2
    train = tmp_path / "o" / "train"
    teacher_done = (train / "digital" / "done.json").stat().st_mtime_ns
    assert (train / "distill" / "started.json").stat().st_mtime_ns >= teacher_done
    header = (tmp_path / "docs" / "results.md").read_text()
    assert "2 trainings or studies at a time (`--jobs 2`), torch threads 1 each" in header
    study = tmp_path / "o" / "evaluate" / "methods"
    rows = (study / "robustness_rows.csv").read_text()
    again = reproduce(argv)
    assert (again["trained"], again["studied"]) == (0, 0)
    shutil.rmtree(study)
    again = reproduce(argv)
    assert (again["trained"], again["studied"]) == (0, 1)
    assert (study / "robustness_rows.csv").read_text() == rows
    assert json.loads((study / "done.json").read_text())["chips"] == 2


def test_the_data_is_prepared_once_in_the_parent_before_the_workers(tmp_path, monkeypatch):
    """--jobs: data.download=true downloads once, in this process, with the plan's data config
    (the workers would otherwise download into the same folder at once)."""
    calls = []
    monkeypatch.setattr(CIFARDataModule, "prepare_data", lambda dm: calls.append(dm.root))
    args, _ = parse(["--tiny", "--jobs", "2", "--out", str(tmp_path)])
    over = ["data=cifar10", "data.download=true", f"data.root={tmp_path / 'cifar'}"]
    prepare_data_once(RUN["digital"].seeded(0), args, over, tmp_path)
    assert calls == [tmp_path / "cifar"]
