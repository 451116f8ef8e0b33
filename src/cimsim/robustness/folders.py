"""An evaluation's output folder: its file names, its lock and its claim (``evaluation.json``).

``evaluation.json`` records the call whose files the folder holds, and ``.lock`` is held while a
process writes there (``hold_folder``): one evaluation per folder, one process at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from cimsim.files import atomic_write
from cimsim.robustness.fingerprints import describe_changes, fingerprint
from cimsim.validation import ConfigError

SUMMARY_FILE = "robustness_summary.csv"
JSON_FILE = "robustness.json"
PLOT_FILE = "robustness.png"
COMPUTE_TABLE = "robustness_compute.csv"
COMPUTE_PLOT = "robustness_compute.png"
LOSS_TABLE = "hessian.csv"
LOSS_PLOT = "robustness_loss_prediction.png"
EVALUATION_FILE = "evaluation.json"  # the call whose files the folder holds
LOCK_FILE = ".lock"
# Every file an evaluation writes into its folder (the rows file's shares, sidecar and stale rows
# included), which ``overwrite`` deletes. W&B's and Hydra's folders log calls; they stay.
EVALUATION_FILES = (
    "robustness_rows.*",
    SUMMARY_FILE,
    JSON_FILE,
    PLOT_FILE,
    COMPUTE_TABLE,
    COMPUTE_PLOT,
    LOSS_TABLE,
    LOSS_PLOT,
)

# ----------------------------------------------------------------------------- the folder


@contextlib.contextmanager
def hold_folder(out: str | os.PathLike, call: Mapping, overwrite: bool = False) -> Iterator[Path]:
    """Hold the output folder ``out`` for the evaluation ``call`` while the block runs: no other
    process may write there (``lock_folder``), and the folder holds this call's files only
    (``claim_folder``). Yields the folder."""
    with lock_folder(out) as folder:
        claim_folder(folder, call, overwrite)
        yield folder


@contextlib.contextmanager
def lock_folder(out: str | os.PathLike) -> Iterator[Path]:
    """An exclusive ``flock`` on ``<out>/.lock`` while the block runs; a second process is
    refused at once. The OS drops the lock when its process ends, even by ``kill -9``, so a lock
    is never stale; the file stays (deleting a lock file lets two processes hold two locks)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 100, 0).decode(errors="replace").strip()
            why = f"another evaluation{f' ({holder})' if holder else ''} is writing to it: wait"
            why += " for it to end, or pass run_name=NAME to write to another folder"
            raise ConfigError("output folder", str(folder), why) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)  # for the message above
        yield folder
    finally:
        os.close(fd)  # releases the lock


def evaluation_files(out: str | os.PathLike) -> list[Path]:
    """The files of an evaluation in ``out`` (``EVALUATION_FILES``, and the temporary files of a
    write that was killed), not ``evaluation.json``."""
    folder = Path(out)
    found = {p for pattern in EVALUATION_FILES for p in folder.glob(pattern)}
    found |= {p for pattern in EVALUATION_FILES for p in folder.glob(f".{pattern}.*")}
    return sorted(p for p in found if p.is_file())


def claim_folder(out: str | os.PathLike, call: Mapping, overwrite: bool = False) -> Path:
    """Record in ``<out>/evaluation.json`` that ``out`` holds the evaluation ``call`` (what its
    files depend on, JSON-able). The same call resumes. A folder that holds another evaluation's
    files is refused with what differs, unless ``overwrite``: its files are then deleted first,
    so none of them (e.g. an earlier call's ``hessian.csv``) stays beside this call's."""
    folder = Path(out)
    call = json.loads(json.dumps(call, default=str))  # as it reads back
    record = {"fingerprint": fingerprint(call), "call": call}
    path = folder / EVALUATION_FILE
    held = _read_json(path)
    if held.get("fingerprint") == record["fingerprint"]:
        return path
    files = evaluation_files(folder)
    if files and not overwrite:
        raise ConfigError("output folder", str(folder), _refusal(held, call, files))
    for file in files:
        file.unlink()

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.write("\n")

    return atomic_write(path, write)


def _read_json(path: Path) -> dict:
    """A JSON file's object; ``{}`` when it is missing or unreadable (nothing recorded)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _refusal(held: dict, call: dict, files: list[Path]) -> str:
    """Why a folder is not this call's to write to, and the two ways on."""
    ways = "pass run_name=NAME to write to another folder, or overwrite=true to delete"
    if "call" not in held:
        names = ", ".join(p.name for p in files[:4]) + (", ..." if len(files) > 4 else "")
        what = f"files of an evaluation ({names}) but no {EVALUATION_FILE} saying which"
        return f"it holds {what}: {ways} them and run this one"
    changes = describe_changes(held["call"], call, limit=4)
    what = f"another evaluation ({EVALUATION_FILE}: {changes})"
    return f"it holds {what}: {ways} its files and run this one"
