"""evaluate.py's library code: the study's settings checked, its processes, folder and report."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from cimsim import ConfigError
from cimsim.chip.devices import load_plugins
from cimsim.cli.checkpoints import checkpoint_paths, load_subjects
from cimsim.cli.chip import check_variant_lists, check_variants, chip_overrides
from cimsim.robustness.calibration import (
    calibration_loader,
    check_calib_split,
    data_settings,
    fixed_batches,
)
from cimsim.robustness.folders import hold_folder
from cimsim.robustness.grid import SWEEPS, TRAIN, EvalSettings, RobustnessGrid, check_limits
from cimsim.robustness.plots import plot_compute, plot_loss_prediction
from cimsim.robustness.study import Evaluation, Subject, run_study
from cimsim.robustness.summary import format_summary
from cimsim.tracking import default_wandb_mode, log_robustness
from cimsim.training.hessian import clean_hessian_traces
from cimsim.validation import check_choice, check_int, config_scope

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# Keys of a datamodule spec that decide which images are held out for testing.
SPLIT_KEYS = ("_target_", "name", "seed", "val_fraction", "test_fraction", "val_size")


def grid_for(cfg: DictConfig) -> RobustnessGrid:
    """The preset's grid; ``train`` in ``sigmas`` and ``adc_levels`` stands for each model's own
    training value (``RobustnessGrid.for_chip``). Presets without ``times`` are no time sweep."""
    r = cfg.robustness
    times, rates = r.get("times"), r.get("fault_rates")
    with config_scope("robustness"):
        return RobustnessGrid(
            sigmas=list(r.sigmas),
            mean_shifts=list(r.mean_shifts),
            adc_levels=list(r.adc_levels),
            chips=r.chips,
            times=[None] if times is None else list(times),
            repetitions=r.get("repetitions", 1),
            adc_kind=r.get("adc_kind", "chip"),
            fault_rates=[None] if rates is None else rates,
            fault_kind=r.get("fault_kind", "both"),
        )


def check_same_split(spec: dict, trained_on: list[dict | None], paths: list[Path]) -> None:
    """Every model must be tested on images it never trained on: the split being tested must be
    the one each checkpoint was trained with (e.g. ``data.seed=0`` holds out other digits than
    the checkpoint's ``data.seed=42``)."""
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
        if r.x == "fault_rate" and not grid.faulted:
            raise ConfigError("x", r.x, "needs robustness.fault_rates (fractions stuck)")
        check_variant_lists(r)  # robustness.compensations
        check_variants(r.get("variants"))
        check_calib_split(r.calib_split)
        check_choice("outcomes", r.get("outcomes", False), (False, True))
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
    calib = calibration_loader(datamodule, r.calib_split)
    settings = EvalSettings(
        seed=cfg.seed,
        calib_loader=calib,
        max_batches=r.max_batches,
        calib_batches=r.calib_batches,
        calib_momentum=r.calib_momentum,
        progress=cfg.progress,
        calib_fixed=fixed_batches(calib, r.calib_split),
    )
    return Evaluation(
        datamodule.test_dataloader(),
        settings,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        calib_split=r.calib_split,
        data_spec=spec,
        outcomes=bool(r.get("outcomes", False)),
    )


def evaluate(cfg: DictConfig):
    """Run the study and write its files; returns the ``RobustnessResult`` (on every rank)."""
    load_plugins(cfg.get("plugins"))  # plug-in devices, before any chip is built
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
    the seed and the Hessian analysis when asked for; not where it runs or how it reports, nor
    ``robustness.outcomes``: it adds a file that a resume fills in and changes no row."""
    robustness = OmegaConf.to_container(cfg.robustness, resolve=True)
    robustness.pop("outcomes", None)
    call = {
        "checkpoints": {s.ckpt: {"sha256": s.ckpt_sha256} for s in subjects},
        "robustness": robustness,
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
    (``cimsim.robustness.folders.hold_folder``); when it is busy or holds another evaluation,
    every rank fails with the same ``ConfigError``, before any chip is measured."""
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
        _, (total, se) = clean_hessian_traces(s.net, data, probes, seed=0)
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
