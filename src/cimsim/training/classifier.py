"""``AnalogClassifier``: the LightningModule that trains an analog network with HA-SGD."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from cimsim.chip.adc import adcs, calibrate_adc
from cimsim.chip.config import AnalogConfig
from cimsim.chip.convert import analog_layers, build_network, convert_to_analog, systematic_chip
from cimsim.chip.noise import derive_seed, training_stream
from cimsim.robustness.calibration import fixed_batches
from cimsim.robustness.grid import EvalSettings, RobustnessGrid
from cimsim.robustness.measure import evaluate_robustness
from cimsim.training.hasgd import ddp_grad_sync, hasgd_backward, sync_buffers
from cimsim.training.methods import Step, TrainingMethods
from cimsim.validation import check_choice, check_int, check_number, config_scope

# The same validation chips every epoch, so the val/acc_noisy curve reflects the weights; drawn
# from the "val" stream, disjoint from the chips of every reported (test) curve.
VAL_CHIP_SEED = 0


class AnalogClassifier(pl.LightningModule):
    """An image classifier whose network runs on a simulated analog chip, trained by HA-SGD.

    Args:
        net: how to build the digital network: ``{"_target_": "pkg.Class", **kwargs}``. Kept as a
            spec (not a module) so a checkpoint reloads with ``load_from_checkpoint(path)`` alone.
        chip: the training perturbation q (and ADC, when trained in the loop), as an
            ``AnalogConfig`` or its fields. Override it when loading to run on another chip.
        L: the perturbation samples per HA-SGD step (1 = plain noise injection).
        optimizer: ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler``, or ``None``; a ``functools.partial`` with
            ``T_max=None`` gets the whole run (its optimizer steps or epochs).
        scheduler_interval: ``epoch`` (step the scheduler after each epoch) or ``step`` (after
            each optimizer step: a cosine then ends at 0 with the run's last step).
        val_chips: programmed chips at the training noise averaged into ``val/acc_noisy``.
        calib_batches: validation batches that calibrate ADC ranges in validation (``None`` =
            the whole split; validation data only, never test).
        calib_momentum: moving-average weight of each calibration batch after the first.
        methods: the training methods' settings (``cimsim.training.methods``: antithetic
            pairs, the noise schedule, SAM, distillation, plug-ins; ``TrainingMethods`` or its
            fields; default: plain HA-SGD).
    """

    def __init__(
        self,
        net: dict[str, Any],
        chip: AnalogConfig | dict[str, Any] | None = None,
        L: int = 1,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        scheduler_interval: str = "epoch",
        val_chips: int = 3,
        calib_batches: int | None = None,
        calib_momentum: float = 0.01,
        methods: TrainingMethods | dict[str, Any] | None = None,
    ):
        super().__init__()
        check_int("L", L, minimum=1)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_int("val_chips", val_chips, minimum=0)
        if calib_batches is not None:
            check_int("val_calib_batches", calib_batches, minimum=1)
        check_number("val_calib_momentum", calib_momentum, minimum=0.0, maximum=1.0)
        chip = chip if chip is not None else AnalogConfig()
        chip = chip if isinstance(chip, AnalogConfig) else AnalogConfig(**chip)
        methods = methods if methods is not None else TrainingMethods()
        if not isinstance(methods, TrainingMethods):
            with config_scope("methods"):
                methods = TrainingMethods(**methods)
        methods.check(chip, L)
        self.save_hyperparameters(
            {
                "net": dict(net),
                "chip": chip.as_dict(),  # the record every checkpoint keeps (pcm: {...})
                "L": L,
                "val_chips": val_chips,
                "methods": methods.asdict(),
            }
        )
        self.methods = methods
        self.chip, self.L, self.val_chips = chip, L, val_chips
        self.calib_batches, self.calib_momentum = calib_batches, calib_momentum
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        with config_scope("model"):
            network = build_network(net)
        self.net = convert_to_analog(network, chip, inplace=True)
        # Per-sample means (exact over uneven last batches, synchronized across DDP ranks).
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": MeanMetric()
                for stage in ("val", "test")
                for name in ("acc", "loss")
            }
        )
        # L backward passes per step: Lightning's automatic loop would step after each one.
        self.automatic_optimization = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, num_classes) logits

    def _ddp(self) -> DistributedDataParallel | None:
        model = self.trainer.strategy.model if self._trainer is not None else None
        return model if isinstance(model, DistributedDataParallel) else None

    def on_train_start(self):
        if self.trainer.world_size > 1:
            # ranks calibrated ADCs on their own validation shards in the sanity check
            sync_buffers(self.net)

    @contextmanager
    def _step_streams(self) -> Iterator[None]:
        """The random streams of one training step, each derived from (run seed, rank, step)
        alone: the relative weight noise from a generator of its own (``training_stream``);
        dropout, PCM and periphery draws from the global RNG inside a fork of it. Nothing a
        step draws moves the global RNG that orders the data, so runs that differ only in
        sigma, L or the method see the same batches; data-parallel ranks draw distinct noise
        (L x world_size samples per step); a resumed run redraws the noise it would have drawn."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # pl.seed_everything's (train.py: seed)
        where = (seed, f"rank{self.global_rank}", f"step{self.global_step}")
        device = self.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type=device.type):
            torch.manual_seed(derive_seed("train-dropout", *where))
            noise = torch.Generator(device=device).manual_seed(derive_seed("train-noise", *where))
            with training_stream(noise):
                yield

    def on_fit_start(self):
        self.methods.on_fit_start(self)  # a distillation teacher

    def _train_sigma(self, batch_idx: int) -> float:
        """This step's training sigma (``methods.sigma``: the schedule), set on every analog
        layer."""
        epoch = self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)
        sigma = self.methods.sigma(self.chip.sigma, epoch)
        for _, layer in analog_layers(self.net):  # not set_noise: in-loop ADC ranges stay
            if layer.config.sigma != sigma:  # a constant schedule changes nothing after step 1
                layer.config = dataclasses.replace(layer.config, sigma=sigma)
        return sigma

    def training_step(self, batch, batch_idx):
        with self._step_streams():
            return self._training_step(batch, batch_idx)

    def _training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        sigma = self._train_sigma(batch_idx)
        m = self.methods
        loss_fn = m.loss(self, x, y, lambda logits: F.cross_entropy(logits, y))  # distillation
        correct = []

        def closure():  # one forward at w + dw_l: the analog layers draw dw_l in train mode
            logits = self.net(x)
            correct.append((logits.detach().argmax(1) == y).float().mean())
            return loss_fn(logits)

        grad_sync = ddp_grad_sync(self._ddp())  # one all-reduce per step, by the L-th backward
        step = Step(self.net, opt, closure, self.manual_backward, grad_sync, correct)
        with m.around_samples(step):  # SAM's ascent
            loss = hasgd_backward(
                closure, self.L, self.manual_backward, grad_sync, self.net, sample=m.sample
            )
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.scheduler_interval == "step":
            scheduler.step()
        if self._ddp() is not None:  # every rank then holds rank 0's statistics (BN, ADC)
            sync_buffers(self.net)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", torch.stack(correct).mean(), on_epoch=True, prog_bar=True)
        self.log("train/sigma", sigma, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self):
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.scheduler_interval == "epoch":
            scheduler.step()

    def _clean_step(self, batch, stage: str):
        """``{stage}/acc``, ``{stage}/loss``: the noise-free chip (sigma 0) at the training mean
        shift, which is the clean network unless the model was trained for a drifted chip."""
        x, y = batch
        with systematic_chip(self.net):  # eval mode, no chip programmed
            logits = self.net(x)
        acc, loss = self.metrics[f"{stage}_acc"], self.metrics[f"{stage}_loss"]
        acc.update((logits.argmax(1) == y).float())
        loss.update(F.cross_entropy(logits, y, reduction="none"))
        self.log(f"{stage}/acc", acc, prog_bar=True)
        self.log(f"{stage}/loss", loss)

    def validation_step(self, batch, batch_idx):
        self._clean_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._clean_step(batch, "test")

    def on_validation_epoch_start(self):
        # ADCs trained in the loop track their range; before the first step (Lightning's sanity
        # check) they have none yet: calibrate them on validation data (never test data).
        if any(a.enabled and not a.calibrated for a in adcs(self.net)):
            calibrate_adc(
                self.net,
                self.trainer.val_dataloaders,
                max_batches=self.calib_batches,
                momentum=self.calib_momentum,
            )

    def on_validation_epoch_end(self):
        """``val/acc_noisy``: mean accuracy over ``val_chips`` programmed chips at the training
        noise (the clean accuracy when ``val_chips=0`` or the chip is noise-free)."""
        if self.trainer.sanity_checking:
            return
        if self.val_chips == 0 or not (
            self.chip.noisy
            or self.chip.device_model.stateful
            or self.chip.periphery
            or self.chip.faults.active
        ):
            self.log("val/acc_noisy", self.metrics["val_acc"].compute(), prog_bar=True)
            return
        grid = RobustnessGrid(
            sigmas=[self.chip.sigma],
            mean_shifts=[self.chip.mean_shift],
            adc_levels=[self.chip.adc_levels],
            chips=self.val_chips,
            # a timed chip (PCM) is read at the time training targets, not right after programming
            times=[self.chip.t_train] if self.chip.device_model.timed else [None],
        )
        limit = self.trainer.limit_val_batches
        settings = EvalSettings(
            seed=VAL_CHIP_SEED,
            stream="val",
            calib_loader=self.trainer.val_dataloaders if self.chip.needs_calibration else None,
            max_batches=limit if isinstance(limit, int) else None,
            calib_batches=self.calib_batches,
            calib_momentum=self.calib_momentum,
            progress=False,
            calib_fixed=fixed_batches(self.trainer.val_dataloaders, "val"),
        )
        result = evaluate_robustness(self.net, self.trainer.val_dataloaders, grid, settings)
        self.log(
            "val/acc_noisy", float(result.summary[0]["acc_mean"]), prog_bar=True, sync_dist=True
        )

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("AnalogClassifier needs an optimizer factory to train")
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        factory, keywords = self.scheduler_factory, {}
        if getattr(factory, "keywords", {}).get("T_max", 0) is None:  # T_max: null = the run
            step = self.scheduler_interval == "step"
            keywords["T_max"] = (
                self.trainer.estimated_stepping_batches if step else self.trainer.max_epochs
            )
        return {"optimizer": optimizer, "lr_scheduler": factory(optimizer, **keywords)}
