"""Training-time monitors: ``RobustnessMonitor`` (the robustness curve while training, the full
sweep at the end) and ``HessianMonitor`` (the Hessian traces HA-SGD penalizes)."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn

from cimsim.robustness.calibration import calibration_loader, check_calib_split, fixed_batches
from cimsim.robustness.grid import TRAIN, EvalSettings, RobustnessGrid, check_limits
from cimsim.robustness.measure import evaluate_robustness
from cimsim.robustness.study import Evaluation, run_study
from cimsim.robustness.summary import format_summary
from cimsim.tracking import log_robustness
from cimsim.training.checkpoint import datamodule_spec, load_module
from cimsim.training.hessian import clean_hessian_traces
from cimsim.training.methods import model_subject
from cimsim.validation import check_int


def sweep_title(grid: RobustnessGrid) -> str:
    """The end-of-fit figure's title: the chips per point and the mean shift the curve is at."""
    shifts = ", ".join(f"{m:g}" for m in grid.mean_shifts)
    return f"test accuracy vs. sigma at mean shift {shifts}, {grid.chips} chips per point"


class RobustnessMonitor(pl.Callback):
    """Monte Carlo robustness during and after ``fit``.

    Every ``every_n_epochs`` epochs: a small sweep over ``sigmas`` with ``chips`` chips on the
    first ``max_batches`` validation batches, logged as ``robust/val_acc@sigma=S`` scalars (one
    evolving line per sigma on a dashboard) and, on W&B, as a curve. Its chips come from the
    ``val`` stream of ``chip_seed``, never the chips of a reported curve. At the end of ``fit``:
    the full ``final`` grid on the test set (``test`` stream) with the best checkpoint's weights,
    written next to the checkpoints as ``robustness_*.csv/json/png`` (the files of
    ``evaluate.py``). A model trained with ADCs in the loop is swept at its training ADC levels
    (and ``final`` may say ``adc_levels=["train"]``), with the ranges calibrated per chip on
    ``calib_split`` data.

    Args:
        every_n_epochs: period of the small sweep; 0 switches it off.
        sigmas: test sigmas of the small sweep.
        chips: chips per sigma in the small sweep.
        max_batches: validation batches per chip in the small sweep (None = all).
        final: the end-of-fit grid (``train`` tokens allowed); None switches it off.
        seed: chip seed of both sweeps (the same chips every time: common random numbers).
        calib_split: ADC calibration data, ``val`` or ``train`` (never ``test``).
        calib_batches: calibration batches per chip and grid point (None = the whole split).
        calib_momentum: moving-average weight of each calibration batch (the authors: 0.01).
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        sigmas: Sequence[float] = (0.0, 0.05, 0.1, 0.15),
        chips: int = 3,
        max_batches: int | None = 4,
        final: RobustnessGrid | None = None,
        seed: int = 0,
        calib_split: str = "val",
        calib_batches: int | None = None,
        calib_momentum: float = 0.01,
    ):
        check_int("every_n_epochs", every_n_epochs, minimum=0)
        check_calib_split(calib_split)
        check_limits(max_batches, calib_batches, calib_momentum)
        self.every_n_epochs, self.max_batches, self.final, self.seed = (
            every_n_epochs,
            max_batches,
            final,
            seed,
        )
        self.calib_split, self.calib_batches, self.calib_momentum = (
            calib_split,
            calib_batches,
            calib_momentum,
        )
        self.grid = RobustnessGrid(
            sigmas=list(sigmas), mean_shifts=[TRAIN], adc_levels=[TRAIN], chips=chips
        )

    def _calib_loader(self, trainer: pl.Trainer, grid: RobustnessGrid):
        chip = getattr(getattr(trainer, "lightning_module", None), "chip", None)
        periphery = chip is not None and chip.needs_calibration
        if all(levels is None for levels in grid.adc_levels) and not periphery:
            return None
        if trainer.datamodule is not None:
            return calibration_loader(trainer.datamodule, self.calib_split)
        # fit() with bare dataloaders: calibrate on the loaders the trainer has.
        return trainer.val_dataloaders if self.calib_split == "val" else trainer.train_dataloader

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or not self.every_n_epochs or epoch % self.every_n_epochs:
            return
        grid = self.grid.for_chip(pl_module.chip)
        calib = self._calib_loader(trainer, grid)
        settings = EvalSettings(
            seed=self.seed,
            stream="val",
            calib_loader=calib,
            max_batches=self.max_batches,
            calib_batches=self.calib_batches,
            calib_momentum=self.calib_momentum,
            progress=False,
            calib_fixed=fixed_batches(calib, self.calib_split),
        )
        result = evaluate_robustness(pl_module.net, trainer.val_dataloaders, grid, settings)
        for s in result.summary:
            pl_module.log(f"robust/val_acc@sigma={s['sigma']:g}", s["acc_mean"], sync_dist=True)
        if trainer.is_global_zero:
            log_robustness(result.summary, result.rows, "sigma", plot=None, prefix="robust/val")

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.final is None or trainer.fast_dev_run:
            return
        if trainer.datamodule is None:  # fit() with bare dataloaders: no test set to sweep
            rank_zero_warn("RobustnessMonitor: no datamodule, so no end-of-fit sweep")
            return
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        module = (
            load_module(type(pl_module), best, map_location=pl_module.device, weights_only=True)
            if best
            else pl_module
        )
        datamodule = trainer.datamodule
        datamodule.setup("test")
        grid = self.final.for_chip(module.chip)
        # Every rank evaluates its share of the chips on the whole test set; rank 0 writes.
        calib = calibration_loader(datamodule, self.calib_split)
        settings = EvalSettings(
            seed=self.seed,
            calib_loader=calib,
            calib_batches=self.calib_batches,
            calib_momentum=self.calib_momentum,
            calib_fixed=fixed_batches(calib, self.calib_split),
        )
        ev = Evaluation(
            datamodule.test_dataloader(),
            settings,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            calib_split=self.calib_split,
            data_spec=datamodule_spec(datamodule),
        )
        result, files = run_study(
            [model_subject(module, grid, best)],
            ev,
            trainer.default_root_dir,
            "sigma",
            title=sweep_title(grid),
        )
        if files is not None:
            log_robustness(result.summary, result.rows, "sigma", files.plot, prefix="robust/test")
            print(format_summary(result.summary))
            print(f"robustness: {files.plot}")


class HessianMonitor(pl.Callback):
    """Every ``every_n_epochs`` epochs: Hutchinson estimates of the Hessian traces at the clean
    weights on the first ``batches`` validation batches, logged as ``hessian/trace_weighted``
    (``sum_t r_t^2 tr(H_t)``, the term HA-SGD penalizes, with ``hessian/trace_weighted_se``) and
    ``hessian/trace/<tensor>`` per analog Conv/Linear tensor. Costs about ``2 * probes`` backward
    passes per batch.

    Args:
        every_n_epochs: period; 0 switches it off.
        probes: Rademacher probes per estimate (>= 2 for a standard error).
        batches: validation batches the loss is averaged over.
        seed: seed of the probes (the same probes every time).
    """

    def __init__(self, every_n_epochs: int = 5, probes: int = 8, batches: int = 1, seed: int = 0):
        check_int("every_n_epochs", every_n_epochs, minimum=0)
        check_int("probes", probes, minimum=1)
        check_int("batches", batches, minimum=1)
        self.every_n_epochs, self.probes, self.batches, self.seed = (
            every_n_epochs,
            probes,
            batches,
            seed,
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or not self.every_n_epochs or epoch % self.every_n_epochs:
            return
        loader = trainer.val_dataloaders
        data = [b for _, b in zip(range(self.batches), loader, strict=False)]
        estimates, (total, total_se) = clean_hessian_traces(
            pl_module.net, data, self.probes, self.seed, pl_module.device
        )
        pl_module.log("hessian/trace_weighted", total)
        if total_se == total_se:  # not NaN (one probe)
            pl_module.log("hessian/trace_weighted_se", total_se)
        for e in estimates:
            pl_module.log(f"hessian/trace/{e.name}", e.trace)
