"""Monte Carlo robustness of trained checkpoints (Wan et al. 2022, Figs. 7-9).

    python evaluate.py ckpt=PATH.ckpt                            # accuracy vs. test sigma
    python evaluate.py 'ckpt=[A.ckpt,B.ckpt]'                    # several models, one figure
    python evaluate.py ckpt_glob='outputs/train/runs/*/checkpoints/epoch_*.ckpt'
    python evaluate.py ckpt=A.ckpt robustness=mean_shift_sweep   # or robustness=adc_sweep
    python evaluate.py ckpt=A.ckpt robustness=drift_sweep        # PCM: accuracy vs time
    python evaluate.py ckpt=A.ckpt chip.bias=shared              # on another chip than trained
    python evaluate.py sweep_dir=outputs/train/multiruns/<date>  # every job of a train.py -m sweep
    python evaluate.py ckpt=A.ckpt devices=4                     # chips split over 4 processes

Writes robustness_rows.csv (one row per chip and grid point), robustness_summary.csv,
robustness.json and robustness.png into outputs/evaluate/<run_name>/, logs them to W&B, and
prints a summary table. A sweep's study goes to <sweep_dir>/evaluate/<run_name>/.

A folder holds one evaluation: evaluation.json records the call (checkpoints and their SHA-256,
test chip, grid and measurement settings, data, seed, hessian). Rerunning the same call resumes
from the rows already written and says how many chips were read back; another call into the
folder is refused (pass run_name=NAME, or overwrite=true to delete the old evaluation's files
first), and so is a second process while one writes there (an OS lock on <folder>/.lock).

The file is over 350 lines because the command line is one recipe plus its checks: checkpoint
selection, test-chip overrides, split checks and PCM compensation subjects, each a short function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from cimsim import AnalogConfig, ConfigError
from cimsim.chip.devices.pcm import DRIFT_COMPENSATIONS
from cimsim.robustness.measure import (
    SWEEPS,
    TRAIN,
    EvalSettings,
    RobustnessGrid,
    check_limits,
    check_time_sweep,
    format_summary,
    is_pcm,
)
from cimsim.robustness.rows import hold_folder, plot_compute, plot_loss_prediction
from cimsim.robustness.study import (
    Evaluation,
    Subject,
    calibration_loader,
    check_calib_split,
    data_settings,
    recipe_label,
    run_study,
    subject_label,
    training_passes,
)
from cimsim.tracking import default_wandb_mode, log_robustness
from cimsim.training.classifier import AnalogClassifier
from cimsim.training.hessian import hessian_traces
from cimsim.validation import check_choice, check_int, config_scope

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
TILE_STANDIN = 2  # tile ADC levels a tile sweep converts with; each grid point sets its own


def output_dir(sweep_dir: str | None, task_name: str, run_name: str) -> str:
    """Where a study writes: next to the sweep it evaluates, else outputs/<task>/<run_name>."""
    return f"{sweep_dir}/evaluate/{run_name}" if sweep_dir else f"outputs/{task_name}/{run_name}"


OmegaConf.register_new_resolver("eval_dir", output_dir, replace=True)
# The test chip, `chip.<field>=VALUE`: an open node, so an override needs no '+' (Hydra closes a
# `chip: {}` written in YAML).
_open = OmegaConf.create({})
OmegaConf.set_struct(_open, False)
ConfigStore.instance().store(group="chip", name="checkpoint", node=_open)


def checkpoint_paths(cfg: DictConfig) -> list[Path]:
    """The checkpoints named by ``ckpt`` (a path or a list), ``ckpt_glob``, or ``sweep_dir`` (the
    best checkpoint of every job of a ``train.py -m`` sweep); all must exist."""
    if cfg.get("sweep_dir"):
        if not Path(cfg.sweep_dir).is_dir():
            raise ConfigError("sweep_dir", cfg.sweep_dir, "no such directory")
        paths = sorted(glob.glob(f"{cfg.sweep_dir}/**/checkpoints/epoch_*.ckpt", recursive=True))
        if not paths:
            raise ConfigError("sweep_dir", cfg.sweep_dir, "holds no */checkpoints/epoch_*.ckpt")
    elif cfg.get("ckpt_glob"):
        paths = sorted(glob.glob(cfg.ckpt_glob, recursive=True))
        if not paths:
            raise ConfigError("ckpt_glob", cfg.ckpt_glob, "matches no file")
    elif cfg.get("ckpt"):
        paths = [cfg.ckpt] if isinstance(cfg.ckpt, str) else list(cfg.ckpt)
    else:
        raise ConfigError("ckpt", None, "give ckpt=PATH, 'ckpt=[A,B]' or ckpt_glob=PATTERN")
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError("ckpt", str(path), "no such checkpoint file")
    return [Path(p) for p in paths]


def grid_for(cfg: DictConfig) -> RobustnessGrid:
    """The preset's grid; ``train`` in ``sigmas`` and ``adc_levels`` stands for each model's own
    training value (``RobustnessGrid.for_chip``). Presets without ``times`` are no time sweep."""
    r = cfg.robustness
    times = r.get("times")
    with config_scope("robustness"):
        return RobustnessGrid(
            sigmas=list(r.sigmas),
            mean_shifts=list(r.mean_shifts),
            adc_levels=list(r.adc_levels),
            chips=r.chips,
            times=[None] if times is None else list(times),
            repetitions=r.get("repetitions", 1),
            adc_kind=r.get("adc_kind", "chip"),
        )


def chip_overrides(cfg: DictConfig) -> dict:
    """The ``chip.<field>=VALUE`` settings that replace the training chip's on the test chip."""
    overrides = OmegaConf.to_container(cfg.chip) if cfg.get("chip") else {}
    names = [f.name for f in dataclasses.fields(AnalogConfig) if f.name not in SWEEPS]
    for key, value in overrides.items():
        if key in SWEEPS:
            axis = {"sigma": "sigmas", "mean_shift": "mean_shifts", "t_inference": "times"}
            axis = axis.get(key, key)
            raise ConfigError(f"chip.{key}", value, f"is swept by the grid: set robustness.{axis}")
        if key not in names:
            allowed = "unknown chip field; allowed fields are " + ", ".join(names)
            raise ConfigError(f"chip.{key}", value, allowed)
    try:
        AnalogConfig(**overrides)  # each value checked before any checkpoint is loaded
    except ConfigError as err:  # nested keys too: chip.pcm.drift_compensation
        raise ConfigError(f"chip.{err.key}", err.value, err.allowed) from None
    return overrides


def check_variants(variants) -> list[dict]:
    """``robustness.variants``: null, or distinct test-chip settings (a curve each)."""
    if variants is None:
        return []
    variants = OmegaConf.to_container(variants) if OmegaConf.is_config(variants) else variants
    if (
        not isinstance(variants, list)
        or not variants
        or not all(isinstance(v, dict) for v in variants)
    ):
        why = "must be null or a non-empty list of chip settings: [{tile_rows: 256}, ...]"
        raise ConfigError("robustness.variants", variants, why)
    for v in variants:
        try:
            AnalogConfig(**v)
        except (ConfigError, TypeError) as err:
            raise ConfigError("robustness.variants", v, f"is not a chip setting ({err})") from None
    if len({repr(sorted(v.items())) for v in variants}) != len(variants):
        raise ConfigError("robustness.variants", variants, "must not repeat a setting")
    return variants


def chip_variants(cfg: DictConfig) -> list[dict]:
    """The overrides of each test chip of every checkpoint: the ``chip.<field>`` ones, once per
    ``robustness.variants`` entry or ``robustness.compensations`` setting (a curve each), unless
    a ``chip.<field>`` override names a varied field itself (it then wins over the preset's
    list: ``chip.tile_rows=256``, ``chip.pcm.drift_compensation=none``)."""
    overrides = chip_overrides(cfg)
    variants = check_variants(cfg.robustness.get("variants"))
    if variants and not any(k in overrides for v in variants for k in v):
        return [{**v, **overrides} for v in variants]
    compensations = cfg.robustness.get("compensations")
    pcm = overrides.get("pcm") or {}
    if not compensations or "drift_compensation" in pcm:
        return [overrides]
    return [{**overrides, "pcm": {**pcm, "drift_compensation": c}} for c in compensations]


def check_compensations(compensations) -> None:
    """``robustness.compensations``: null, or distinct drift-compensation settings."""
    if compensations is None:
        return
    if isinstance(compensations, str) or not compensations:
        raise ConfigError("compensations", compensations, "must be null or a list: [global,none]")
    for c in compensations:
        check_choice("compensations", c, DRIFT_COMPENSATIONS)
    if len(set(compensations)) != len(compensations):
        raise ConfigError("compensations", list(compensations), "must not repeat a setting")


def override_chip(trained: AnalogConfig, overrides: dict) -> AnalogConfig:
    """The ``trained`` chip with ``overrides``; a nested ``pcm`` override replaces only the
    fields it names (``chip.pcm.drift_compensation=none`` keeps the checkpoint's g_max)."""
    overrides = dict(overrides)
    if isinstance(overrides.get("pcm"), dict):
        overrides["pcm"] = dataclasses.replace(trained.pcm, **overrides["pcm"])
    return dataclasses.replace(trained, **overrides)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120] if text else ''}"


def read_checkpoint(path: Path) -> tuple[bytes, dict]:
    """The file's bytes and contents, loaded with ``weights_only=True``: a downloaded checkpoint
    can hold only tensors and plain types, never code that runs on loading."""
    data = path.read_bytes()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or objects beyond tensors
        why = "is not a PyTorch checkpoint that loads with weights_only=True (truncated, another"
        why += f" format, or objects other than tensors and plain types): {_one_line(err)}"
        raise ConfigError("ckpt", str(path), why) from None
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= set(ckpt):
        raise ConfigError(
            "ckpt", str(path), "is not a checkpoint of train.py: no state_dict/hyper_parameters"
        )
    return data, ckpt


def load_subject(
    path: Path, grid: RobustnessGrid, overrides: dict, device: torch.device
) -> tuple[Subject, dict | None]:
    """One checkpoint rebuilt on its test chip (its training chip with ``overrides``), and the
    data it was trained on."""
    data, ckpt = read_checkpoint(path)

    def load(**chip) -> AnalogClassifier:
        stream = io.BytesIO(data)
        return AnalogClassifier.load_from_checkpoint(
            stream, map_location=device, weights_only=True, **chip
        )

    try:
        model = load()
    except (ConfigError, KeyError, TypeError, RuntimeError, ImportError) as err:
        raise ConfigError("ckpt", str(path), f"does not load ({_one_line(err)})") from None
    recipe, trained = recipe_label(model.chip, model.L, model.methods), model.chip
    with config_scope("chip"):
        chip = override_chip(trained, overrides)
    grid = grid.for_chip(chip)
    if grid.adc_kind == "tile" and chip.tile_adc_levels is None:
        # Tile ADCs to sweep: the grid sets their levels at each point (null turns them off); a
        # fixed stand-in, so the rows' fingerprint does not change with the grid.
        chip = dataclasses.replace(chip, tile_adc_levels=TILE_STANDIN)
    if chip != trained:
        try:
            model = load(chip=chip)
        except (ConfigError, KeyError, TypeError, RuntimeError) as err:
            why = f"does not load on the test chip (overrides {overrides}): {_one_line(err)}"
            raise ConfigError("ckpt", str(path), why) from None
    label = subject_label(recipe, chip, grid)
    sha = hashlib.sha256(data).hexdigest()
    passes = training_passes(ckpt.get("global_step", 0), model.L, model.methods)
    net = model.net.to(device).eval()
    subject = Subject(label, net, grid, str(path), ckpt_sha256=sha, passes=passes)
    return subject, ckpt.get("datamodule")


def load_subjects(
    cfg: DictConfig, paths: list[Path], grid: RobustnessGrid, device: torch.device
) -> tuple[list[Subject], list[dict | None]]:
    """Every checkpoint's subject on each test chip (``chip_variants``), and the data each one was
    trained on. A time sweep or a list of compensations on a model that is not a PCM chip fails
    here, before any chip is measured."""
    variants = chip_variants(cfg)
    loaded = [load_subject(p, grid, o, device) for p in paths for o in variants]
    subjects = [s for s, _ in loaded]
    compensations = cfg.robustness.get("compensations")
    for s in subjects:
        with config_scope("robustness"):
            check_time_sweep(s.net, s.grid)
        if compensations and not is_pcm(s.net):
            why = f"{s.ckpt} is not a PCM model (device='pcm'): it has no drift to compensate"
            raise ConfigError("robustness.compensations", list(compensations), why)
    labels = [s.label for s in subjects]
    for s in subjects:  # same recipe twice (e.g. two seeds): tell them apart by run folder
        if labels.count(s.label) > 1:
            s.label = f"{s.label} ({Path(s.ckpt).parent.parent.name})"
    return subjects, [spec for _, spec in loaded[:: len(variants)]]  # one per checkpoint


# Keys of a datamodule spec that decide which images are held out for testing.
SPLIT_KEYS = ("_target_", "name", "seed", "val_fraction", "test_fraction", "val_size")


def check_same_split(spec: dict, trained_on: list[dict | None], paths: list[Path]) -> None:
    """Every model must be tested on images it never trained on: the split being tested must be
    the one each checkpoint was trained with (e.g. ``data=digits`` resolves ``data.seed`` to
    evaluate's chip seed, and two training seeds hold out different digits)."""
    for path, theirs in zip(paths, trained_on, strict=True):
        if theirs is None or theirs.get("_target_") != spec.get("_target_"):
            continue
        for key in SPLIT_KEYS:
            if key in theirs and spec.get(key) != theirs[key]:
                raise ConfigError(
                    f"data.{key}",
                    spec.get(key),
                    f"{path} was trained with {key}={theirs[key]!r}: with another split its test "
                    f"images may include its training images. Set data.{key}={theirs[key]!r}, "
                    "or evaluate models trained on different splits separately",
                )


def load_datamodule(spec: dict):
    """The datamodule of ``spec`` (``{"_target_": ..., **kwargs}``), set up for every split."""
    with config_scope("data"):
        datamodule = instantiate(spec)
    datamodule.setup("fit")  # train and val: ADC calibration data
    datamodule.setup("test")
    return datamodule


def check_settings(cfg: DictConfig) -> None:
    """Fail on a bad setting before anything is loaded."""
    grid = grid_for(cfg)
    chip_overrides(cfg)
    r = cfg.robustness
    with config_scope("robustness"):
        check_choice("x", r.x, SWEEPS)
        if r.x == "t_inference" and not grid.timed:
            raise ConfigError("x", r.x, "needs robustness.times (seconds after programming)")
        check_compensations(r.get("compensations"))
        check_variants(r.get("variants"))
        check_calib_split(r.calib_split)
        check_limits(r.max_batches, r.calib_batches, r.calib_momentum)
        target = r.get("target_sigma")
        if target is not None and target not in [s for s in r.sigmas if s != TRAIN]:
            raise ConfigError(
                "target_sigma", target, f"must be one of robustness.sigmas {list(r.sigmas)}"
            )
    check_choice("accelerator", cfg.accelerator, ACCELERATORS)
    check_choice("overwrite", cfg.overwrite, (False, True))
    check_int("devices", cfg.devices, minimum=1)
    check_int("num_nodes", cfg.num_nodes, minimum=1)


def evaluation(cfg: DictConfig, spec: dict, fabric: Fabric) -> Evaluation:
    """The test data of ``spec``, how ``cfg.robustness`` measures chips, and this process's share
    of them."""
    datamodule = load_datamodule(spec)
    r = cfg.robustness
    settings = EvalSettings(
        seed=cfg.seed,
        calib_loader=calibration_loader(datamodule, r.calib_split),
        max_batches=r.max_batches,
        calib_batches=r.calib_batches,
        calib_momentum=r.calib_momentum,
        progress=cfg.progress,
    )
    return Evaluation(
        datamodule.test_dataloader(),
        settings,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        calib_split=r.calib_split,
        data_spec=spec,
    )


def evaluate(cfg: DictConfig):
    """Run the study and write its files; returns the ``RobustnessResult`` (on every rank)."""
    paths = checkpoint_paths(cfg)
    check_settings(cfg)
    fabric = launch(cfg)
    subjects, trained_on = load_subjects(cfg, paths, grid_for(cfg), fabric.device)
    spec = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else trained_on[0]
    if spec is None:
        raise ConfigError("data", None, f"{paths[0]} does not record its data: pass data=NAME")
    check_same_split(spec, trained_on, paths)
    ev = evaluation(cfg, spec, fabric)  # a bad data setting fails before the folder is claimed
    with held(cfg, fabric, evaluation_call(cfg, subjects, spec)):
        return study(cfg, subjects, ev)


def evaluation_call(cfg: DictConfig, subjects: list[Subject], spec: dict) -> dict:
    """What the output folder's files depend on, as its ``evaluation.json`` records it: each
    checkpoint's contents, the test chip, the preset (grid and how chips are measured), the data,
    the seed and the Hessian analysis when asked for; not where it runs or how it reports."""
    call = {
        "checkpoints": {s.ckpt: {"sha256": s.ckpt_sha256} for s in subjects},
        "robustness": OmegaConf.to_container(cfg.robustness, resolve=True),
        "data": data_settings(spec),
        "seed": cfg.seed,
    }
    # Keys only when set, so a refusal reads "chip.bias: unset -> 'shared'".
    if chip_overrides(cfg):
        call["chip"] = chip_overrides(cfg)
    if cfg.get("hessian"):
        call["hessian"] = {"probes": cfg.hessian_probes, "batches": cfg.hessian_batches}
    return call


@contextlib.contextmanager
def held(cfg: DictConfig, fabric: Fabric, call: dict):
    """Rank 0 holds the output folder for ``call`` while the block runs
    (``cimsim.robustness.rows.hold_folder``); when it is busy or holds another evaluation, every
    rank     fails with the same ``ConfigError``, before any chip is measured."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if fabric.global_rank == 0:
            try:
                stack.enter_context(hold_folder(cfg.paths.output_dir, call, cfg.overwrite))
            except ConfigError as err:
                refusal = (err.key, err.value, err.allowed)
        refusal = fabric.broadcast(refusal, src=0)
        if refusal is not None:
            raise ConfigError(*refusal)
        yield


def study(cfg: DictConfig, subjects: list[Subject], ev: Evaluation):
    """Measure every subject's chips into the (held) output folder, then report: the summary
    table, W&B, and the Hessian and compute comparisons when asked for."""
    r = cfg.robustness
    reads = f" x {r.repetitions} read-outs" if r.get("repetitions", 1) > 1 else ""
    title = f"{r.name}: {r.chips} chips{reads} per point, seed {cfg.seed}"
    result, files = run_study(subjects, ev, cfg.paths.output_dir, r.x, title=title)
    if files is None:  # not rank 0
        return result
    run = start_wandb(cfg)
    if run is not None:
        log_robustness(result.summary, result.rows, r.x, files.plot)
        run.finish()
    print(format_summary(result.summary))
    for name, path in vars(files).items():
        print(f"{name:<8}: {path}")
    if cfg.get("hessian"):  # the Hessian traces HA-SGD penalizes, and what they predict
        traces = hessian_of(subjects, ev.test_loader, cfg.hessian_probes, cfg.hessian_batches)
        table, plot = plot_loss_prediction(result.summary, traces, cfg.paths.output_dir)
        print(f"hessian : {table}\nhessian : {plot}")
    if r.get("target_sigma") is not None:  # robust accuracy vs training compute
        table, plot = plot_compute(result.summary, subjects, r.target_sigma, cfg.paths.output_dir)
        print(f"compute : {table}\ncompute : {plot}")
    return result


def hessian_of(subjects, loader, probes: int, batches: int) -> dict[str, dict]:
    """Each subject's range-weighted Hessian trace (Hutchinson) at its clean weights, on the
    first ``batches`` test batches, with its standard error and the probe count."""
    data = [b for _, b in zip(range(batches), loader, strict=False)]
    out = {}
    for s in subjects:
        net = s.net.eval()
        device = next(net.parameters()).device

        def loss(net=net, device=device):
            return sum(
                torch.nn.functional.cross_entropy(net(x.to(device)), y.to(device)) for x, y in data
            ) / len(data)

        with torch.enable_grad():
            _, (total, se) = hessian_traces(net, loss, probes, torch.Generator().manual_seed(0))
        out[s.label] = {"weighted": total, "weighted_se": se, "probes": probes, "batches": batches}
    return out


def launch(cfg: DictConfig) -> Fabric:
    """One process per device (Lightning Fabric DDP); each evaluates a share of the chips."""
    accelerator = "cuda" if cfg.accelerator == "gpu" else cfg.accelerator
    processes = cfg.devices * cfg.num_nodes
    fabric = Fabric(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy="ddp" if processes > 1 else "auto",
    )
    fabric.launch()
    return fabric


def start_wandb(cfg: DictConfig):
    if not cfg.wandb.enabled:
        return None
    import wandb

    default_wandb_mode()
    return wandb.init(
        project=cfg.wandb.project,
        group=cfg.wandb.group,
        tags=list(cfg.wandb.tags),
        job_type="evaluate",
        name=f"evaluate/{cfg.run_name}",
        dir=cfg.paths.output_dir,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ConfigError as err:
        from cimsim.validation import discard_failed_run

        print(f"config error: {err}", file=sys.stderr)
        discard_failed_run()  # a study that never started leaves no empty folder behind
        sys.exit(2)


if __name__ == "__main__":
    main()
