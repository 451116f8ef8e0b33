"""The report: its provenance header, then every section of the plan, into ``<name>.md``."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import HydraException

from cimsim.cli.evaluate import load_datamodule
from cimsim.files import atomic_write
from cimsim.validation import ConfigError
from paper.configs import ROOT
from paper.evidence import Context, Facts, identity_shortcuts
from paper.excerpt import update_readme
from paper.markdown import cell
from paper.plan import RUN, base_of
from paper.publish import EVIDENCE, publish, read_published

LOADER_KEYS = ("batch_size", "num_workers", "download")  # a datamodule's keys that load, not define


def git_commit(root: Path) -> str:
    """The repository's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """This machine, as the markers record it: platform, CPUs, GPU (or none)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.platform()}, {os.cpu_count()} CPUs, {gpu}"


def _compute_line(records: dict[str, dict], what: str) -> tuple[str, set[str], set[str]]:
    """``X s`` summed over records with a recorded wall time (and which lack one), their
    machines and commits."""
    timed = [r for r in records.values() if r.get("wall_s") is not None and not r.get("resumed")]
    missing = sorted(n for n, r in records.items() if r.get("wall_s") is None or r.get("resumed"))
    text = f"{what} {sum(r['wall_s'] for r in timed):.0f} s"
    if missing:
        text += f" (not recorded for {len(missing)} of {len(records)}: {', '.join(missing)})"
    machines = {r.get("machine") or "not recorded" for r in records.values()}
    commits = {r.get("commit") or "not recorded" for r in records.values()}
    return text, machines, commits


def dataset_name(spec: dict) -> str:
    """A datamodule's dataset as its config names it: sklearn digits, cifar10 / cifar100, or an
    image folder by its root's folder name."""
    target = str(spec.get("_target_", "?")).rsplit(".", 1)[-1]
    if target == "DigitsDataModule":
        return "sklearn digits"
    if target == "CIFARDataModule":
        return str(spec.get("name"))
    if target == "ImageFolderDataModule":
        folder = f"image folder `{Path(str(spec.get('root'))).name}`"
        return f"{spec['name']} ({folder})" if spec.get("name") else folder
    return target


def data_facts(spec: dict) -> dict:
    """The dataset of a checkpoint's datamodule spec: its name, split seed, image size,
    channels, classes and train/val/test images (the splits built as evaluate.py builds them;
    without the data on this machine, ``missing`` says why)."""
    facts = {"dataset": dataset_name(spec), "split_seed": spec.get("seed")}
    try:
        dm = load_datamodule(spec)
    except (ConfigError, HydraException, OSError, RuntimeError, ValueError) as err:
        return {**facts, "missing": str(err).splitlines()[0] if str(err) else type(err).__name__}
    sizes = {k: len(getattr(dm, f"{k}_set")) for k in ("train", "val", "test")}
    if getattr(dm, "carve_test", True) is False:  # an image folder's own test/: no split drawn
        facts["split_seed"] = None
    return {**facts, "image_size": dm.image_size, "channels": dm.in_channels,
            "classes": dm.num_classes, **sizes}  # fmt: skip


def model_facts(net: dict, ckpt: str) -> dict:
    """A checkpoint's network (its stored ``net`` hyper-parameters) and its identity shortcuts."""
    name = str(net.get("_target_", "?")).rsplit(".", 1)[-1]
    if name == "WideResNet":
        name = f"WRN-{net.get('depth')}-{net.get('widen_factor')}"
    return {"model": name, "identity_shortcuts": identity_shortcuts(ckpt)}


def _ran_on(manifest: dict) -> dict:
    """What every training of ``manifest`` ran on, from its checkpoint: the datasets and models,
    each with its number of trainings (one entry each when all agree)."""
    data: dict[str, dict] = {}
    models: dict[str, dict] = {}
    for run in manifest.get("runs", {}).values():
        path = run.get("best", "")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError):
            ckpt = None
        spec = None if ckpt is None else ckpt.get("datamodule") or {}
        spec = spec and {k: v for k, v in spec.items() if k not in LOADER_KEYS}
        net = None if ckpt is None else ckpt.get("hyper_parameters", {}).get("net", {})
        key = json.dumps(spec, sort_keys=True)
        if key not in data:
            data[key] = {"missing": f"{path} not readable"} if not spec else data_facts(spec)
            data[key]["runs"] = 0
        data[key]["runs"] += 1
        key = json.dumps(net, sort_keys=True)
        if key not in models:
            models[key] = {"missing": f"{path} not readable"} if not net else model_facts(net, path)
            models[key]["runs"] = 0
        models[key]["runs"] += 1
    return {"data": list(data.values()), "models": list(models.values())}


def ran_on(ctx: Context) -> dict:
    """``{"data": [...], "models": [...]}``: the datasets (``data_facts``) and models
    (``model_facts``) the report's trainings ran on, each with its count of trainings (``runs``);
    a fact of the report (``ctx.facts``), so it renders from published evidence too."""
    return ctx.facts("ran_on", lambda: _ran_on(ctx.manifest))


def _counted(items: list[dict], text) -> str:
    """Each item's ``text``, with its count of trainings when they differ."""
    if len(items) == 1:
        return text(items[0])
    return "; ".join(f"{text(d)} ({d['runs']} trainings)" for d in items)


def _data_text(d: dict) -> str:
    if "missing" in d and "dataset" not in d:
        return f"not recorded ({d['missing']})"
    split = "its own test/ folder" if d["split_seed"] is None else f"split seed {d['split_seed']}"
    if "missing" in d:
        return f"{d['dataset']} ({split}; image counts not available here: {d['missing']})"
    colour = {1: "grayscale", 3: "RGB"}.get(d["channels"], f"{d['channels']} channels")
    return (
        f"{d['dataset']}, {d['image_size']}x{d['image_size']} {colour}, {d['classes']} classes: "
        f"{d['train']} training / {d['val']} validation / {d['test']} test images ({split})"
    )


def _model_text(m: dict) -> str:
    n = m.get("identity_shortcuts")
    shortcuts = (
        "not recorded"
        if n is None
        else "no identity shortcut (every shortcut is a 1x1 conv)"
        if n == 0
        else f"{n} identity shortcut{'s' * (n > 1)}"
    )
    return f"{m.get('model', 'not recorded')}, {shortcuts}"


def training_text(ctx: Context) -> str:
    """Base epochs, training seeds and the checkpoint each study evaluates, from the manifest and
    the plan."""
    runs = ctx.manifest.get("runs", {})
    base = sorted(
        {r["epochs"] for n, r in runs.items() if "epochs" in r and _factor(n) == 1}, key=int
    )
    seeds = sorted({o.split("=", 1)[1] for r in runs.values() for o in r.get("overrides", [])
                    if o.startswith("seed=")}, key=int)  # fmt: skip
    last = [st.name for sec in ctx.sections for st in sec.studies if st.last]
    chosen = "the validation-chosen (best) checkpoint of every model" + (
        f", except `last.ckpt` in {', '.join(last)}" if last else ""
    )
    return (
        f"base epochs {', '.join(map(str, base)) or 'not recorded'} (a run's epochs are its "
        f"epoch factor x this); {ctx.seeds} training seed{'s' * (ctx.seeds > 1)} per model "
        f"(seed {', '.join(seeds) or 'not recorded'}){_capped(ctx)}; the studies evaluate "
        f"{chosen}"
    )


def _capped(ctx: Context) -> str:
    """The sections whose studies measure fewer training seeds than ``--seeds``."""
    fewer = {
        sec.title: min(st.seeds for st in sec.studies if st.seeds)
        for sec in ctx.sections
        if any(st.seeds and st.seeds < ctx.seeds for st in sec.studies)
    }
    if not fewer:
        return ""
    return ", except " + ", ".join(f"{t} ({n} seed{'s' * (n > 1)})" for t, n in fewer.items())


def _factor(training: str) -> float | None:
    run = RUN.get(base_of(training)[0])
    return None if run is None else run.epochs_factor


def environment() -> dict:
    """This machine and the versions of what renders the report."""
    return {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }


def _threads(meta: dict, env: dict) -> str:
    """How the command ran: its torch threads, or its jobs at a time and each one's threads."""
    jobs = meta.get("jobs") or 1
    if jobs == 1:
        return f"torch threads {meta.get('threads') or env['threads']}"
    return (
        f"{jobs} trainings or studies at a time (`--jobs {jobs}`), torch threads "
        f"{meta.get('threads', '?')} each: their recorded wall times overlap, and their sum "
        "exceeds the command's"
    )


def header(ctx: Context) -> str:
    """The report's provenance: command, date, machine, wall times, versions, and what it ran on
    (data, model, epochs, seeds, chips); its published evidence."""
    meta = ctx.meta
    env = ctx.facts("environment", environment)
    trainings = ctx.manifest.get("runs", {})
    studies = {st.name: ctx.marker(st.name) for sec in ctx.sections for st in sec.studies}
    train_text, train_machines, train_commits = _compute_line(trainings, "trainings")
    study_text, study_machines, study_commits = _compute_line(studies, "studies")
    commit = meta.get("commit", "?")
    lines = [
        f"* evidence compute: {train_text} + {study_text} on "
        f"{'; '.join(sorted(train_machines | study_machines))} (wall times recorded when each "
        "training and study ran)"
    ]
    for what, commits in (("trainings", train_commits), ("studies", study_commits)):
        if commits != {commit}:
            lines.append(f"* the {what} came from commit(s) {', '.join(sorted(commits))}")
    seeds = {m.get("seed") for m in studies.values()}
    seed = str(seeds.pop()) if len(seeds) == 1 and None not in seeds else "not recorded"
    facts = ran_on(ctx)
    return "\n".join(
        [
            "# Results: the paper's claims, reproduced at CPU scale",
            "",
            "Generated by `reproduce.py` from the rows of its Monte Carlo studies; every number "
            "below is computed from those rows (`paper/`), none is typed. The "
            "paper's numbers are for WRN-28-10 / CIFAR-100 and are not expected here. Each 95 % "
            "CI and verdict stands alone: no correction for multiple comparisons is applied, "
            "except where a rule says Holm.",
            "",
            f"* data: {_counted(facts['data'], _data_text)}",
            f"* model: {_counted(facts['models'], _model_text)}",
            *_clean_line(ctx, facts),
            f"* training: {training_text(ctx)}",
            *_models_line(meta),
            f"* command: `{meta.get('command', '?')}`",
            f"* date: {meta.get('date', '?')}",
            f"* machine: {meta.get('machine') or env['machine']}, {_threads(meta, env)}",
            *lines,
            f"* wall time of this command alone: {meta.get('wall_s', 0):.0f} s (trainings run "
            f"{meta.get('trained', 0)}, reused {meta.get('skipped', 0)}; studies run "
            f"{meta.get('studied', 0)}, reused {meta.get('studies_reused', 0)})",
            f"* versions: python {env['python']}, torch {env['torch']}, "
            f"pytorch-lightning {env['lightning']}, cimsim commit {commit}",
            f"* scale: {meta.get('scale', '?')}; {meta.get('chips', '?')} chips per grid point "
            "(fewer where a section says), the same chips for every model (chip c is programmed "
            f"from seed ({seed}, c))",
            f"* published evidence: [`{ctx.link}/{EVIDENCE}/`]({ctx.link}/{EVIDENCE}/) holds "
            "every row this report uses (gzip-compressed CSV), the studies' and trainings' "
            "records and the facts read from checkpoints; `python reproduce.py --report-only "
            "--from-published <that folder> --report-dir <dir>` renders this report from them "
            "alone, and tests/paper/test_published.py checks that every verdict comes out the "
            "same",
        ]
    )


def _clean_line(ctx: Context, facts: dict) -> list[str]:
    """The header's line on how well the models learned: the digital model's accuracy at test
    sigma 0 (Fig. 7's rows) against chance, so a reader sees an undertrained plan at once."""
    if "fig7" not in {st.name for sec in ctx.sections for st in sec.studies}:
        return []
    values = cell(ctx.rows("fig7"), "digital", sigma=0.0)
    classes = {d.get("classes") for d in facts["data"]} - {None}
    if not values or len(classes) != 1:
        return []
    chance = 100 / classes.pop()
    acc = 100 * math.fsum(values.values()) / len(values)
    return [
        f"* clean accuracy: the digital model scores {acc:.1f} % at test sigma 0 (Fig. 7's "
        f"rows), against {chance:.1f} % by chance"
    ]


def _models_line(meta: dict) -> list[str]:
    """The header's line on ``--models``: which of the plan's models this report trained."""
    if meta.get("models") is None:
        return []
    return [
        f"* models: only {', '.join(f'`{m}`' for m in meta['models'])} of these sections' models "
        "(`--models`, this report's compute budget); each section names those it lacks"
    ]


def render_section(name: str, ctx: Context) -> str:
    """Section ``name`` of the plan, rendered by ``paper/sections/<name>.py``."""
    return importlib.import_module(f"paper.sections.{name}").render(ctx)


def render_report(ctx: Context) -> str:
    """The report's text: the header, then each of ``ctx.sections``, with ``ctx``'s facts the
    store that ``ckpt_info`` and ``identity_shortcuts`` use."""
    with ctx.store.active():
        parts = [header(ctx)]
        for section in ctx.sections:
            ctx.section = section
            text = render_section(section.name, ctx)
            ctx.section = None
            if section.studies and text.startswith("## "):  # each section says what it ran on
                heading, _, rest = text.partition("\n")
                text = f"{heading}\n\n{scope_line(ctx)}\n{rest}"
            parts.append(text)
    return "\n\n".join(parts) + "\n"


def scope_line(ctx: Context) -> str:
    """One line under each section's heading: its data, model and training seeds."""
    facts = ran_on(ctx)
    data = "; ".join(scope_data(d) for d in facts["data"])
    models = "; ".join(_model_text(m) for m in facts["models"])
    seeds = f"{ctx.seeds} training seed{'s' * (ctx.seeds > 1)} per model"
    return f"*Ran on: {data}; {models}; {seeds}.*"


def scope_data(d: dict) -> str:
    """A dataset's name and its test-image count, unless the name already gives the count."""
    name = d.get("dataset", "data not recorded")
    given = "test" not in d or any(f"{n} test" in name for n in (d["test"], f"{d['test']:,}"))
    return name if given else f"{name} ({d['test']} test images)"


def report_name(meta: dict) -> str:
    """The report's name (``--report-name``): ``<report dir>/<name>.md`` and ``<name>/``."""
    return str(meta.get("report_name") or "results")


def _save(report_dir: Path, name: str, text: str) -> Path:
    report = atomic_write(report_dir / f"{name}.md", text)
    if report_dir.resolve() == (ROOT / "docs").resolve():  # a committed report: README quotes it
        update_readme(ROOT / "README.md", report, name)
    return report


def write_report(out: Path, report_dir: Path, meta: dict) -> Path:
    """Build ``<report_dir>/<name>.md`` and ``<report_dir>/<name>/*`` (``report_name``) from the
    rows under ``<out>/evaluate``, the studies' markers, the trainings' ``<out>/manifest.json``
    and their checkpoints; publish its evidence in ``<report_dir>/<name>/evidence/``
    (``paper.publish``)."""
    manifest = json.loads((out / "manifest.json").read_text())
    meta = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **meta}
    name = report_name(meta)
    figures = report_dir / name
    ctx = Context(
        out / "evaluate", figures, int(meta["chips"]), manifest, meta, name, store=Facts(out)
    )
    report = _save(report_dir, name, render_report(ctx))
    size = publish(ctx, out, figures / EVIDENCE)
    print(f"[reproduce] published its evidence: {figures / EVIDENCE}/ ({size / 1e3:.0f} kB)")
    return report


def render_published(evidence: Path, report_dir: Path, name: str | None = None) -> Path:
    """Build ``<report_dir>/<name>.md`` (``name``: the recorded report's name unless given) and
    its figures from published evidence alone (the folder ``write_report`` published): no
    checkpoint, data or plan folder is read."""
    meta, manifest, facts = read_published(evidence)
    name = name or report_name(meta)
    ctx = Context(
        evidence / "evaluate",
        report_dir / name,
        int(meta["chips"]),
        manifest,
        meta,
        name,
        store=Facts(stored=facts),
    )
    return _save(report_dir, name, render_report(ctx))
