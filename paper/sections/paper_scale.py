"""The closing section: an estimate of the GPU time of the plan at the paper's scale."""

from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf
from torch import nn

from cimsim.wide_resnet import WideResNet
from paper.configs import CONF
from paper.evidence import Context
from paper.markdown import md_table
from paper.plan import RUN, SECTIONS

# NVIDIA H200 (SXM) dense tensor-core peaks, TFLOP/s (the datasheet's figures are with
# sparsity, twice these): BF16/FP16 for mixed or half precision, TF32 for 32-bit training.
H200_DENSE_TFLOPS = {"bf16": 989.5, "16": 989.5, "32": 494.7}
PEAK_NAME = {"bf16": "BF16", "16": "FP16", "32": "TF32"}
ASSUMED_UTILIZATION = 0.40
# CIFAR-100 with the data config's 5000-image validation split: train, val, test images.
CIFAR100_IMAGES = (45_000, 5_000, 10_000)
PAPER_EXPERIMENT = "paper_wrn28_10_cifar100"


def forward_flops(net: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs (2 per multiply-add) of the convolutions and linear layers of one forward pass of
    one input of ``shape`` (C, H, W), counted from each layer's output size with hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            per_out = module.in_features
        total += 2 * per_out * output.numel()

    handles = [
        m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return total


def paper_experiment() -> dict:
    """The paper-scale experiment's precision, batch size, learning rate and epochs."""
    path = CONF / "experiment" / f"{PAPER_EXPERIMENT}.yaml"
    cfg = OmegaConf.load(path) if path.is_file() else OmegaConf.create({})
    return {
        "precision": str(OmegaConf.select(cfg, "trainer.precision", default="32-true")),
        "batch_size": OmegaConf.select(cfg, "data.batch_size", default="not set"),
        "lr": OmegaConf.select(cfg, "hasgd.optimizer.lr", default="not set"),
        "epochs": int(OmegaConf.select(cfg, "trainer.max_epochs", default=200)),
    }


def render(ctx: Context) -> str:
    exp = paper_experiment()
    kind = exp["precision"].split("-")[0]
    peak = H200_DENSE_TFLOPS.get(kind, H200_DENSE_TFLOPS["32"])
    peak_name = PEAK_NAME.get(kind, "TF32")
    epochs = exp["epochs"]
    fwd = forward_flops(WideResNet(depth=28, widen_factor=10, num_classes=100), (3, 32, 32))
    rate = peak * 1e12 * ASSUMED_UTILIZATION
    train_imgs, val_imgs, test_imgs = CIFAR100_IMAGES
    seen: set[str] = set()
    body, total = [], 0.0
    for section in (s for s in ctx.sections if s.studies):
        new = [r for s in section.studies for r in s.runs if r not in seen]
        new = list(dict.fromkeys(new))
        seen.update(new)
        train = ctx.seeds * sum(
            3 * fwd * train_imgs * epochs * RUN[r].epochs_factor * ctx.compute_per_step(r)
            for r in new
        )
        evals = 0.0
        for s in section.studies:
            rows = ctx.rows(s.name)
            calib = sum(1 for r in rows if r.adc_levels is not None)
            evals += fwd * (len(rows) * test_imgs + calib * val_imgs)
        hours = (train + evals) / rate / 3600
        total += hours
        body.append(
            [
                section.title,
                str(len(new) * ctx.seeds),
                f"{train / 1e18:.1f}",
                f"{evals / 1e18:.2f}",
                f"{hours:.1f}",
            ]
        )
    body.append(["total", str(len(seen) * ctx.seeds), "", "", f"{total:.1f}"])
    gpu = ctx.meta.get("gpu")
    if gpu:
        why = (
            f"A GPU ({gpu}) was visible when this report was written, but the trainings and "
            "studies above did not time GPU steps, so the times below are still estimates"
        )
    else:
        why = (
            "No GPU was available when this report was written (`torch.cuda.is_available()` "
            "was false), so these times are NOT from measured GPU step times: they are estimates"
        )
    Ls = ", ".join(f"{r} {ctx.run_L(r)}" for r in RUN if r in seen)
    return "\n\n".join(
        [
            "## Paper scale: an ESTIMATE of GPU time (not a measurement)",
            f"`python reproduce.py experiment={PAPER_EXPERIMENT} data.download=true --epochs "
            f"{epochs}{_plan_options(ctx)}` runs the same plan at the paper's scale "
            f"(`conf/experiment/{PAPER_EXPERIMENT}.yaml`: WRN-28-10 on CIFAR-100, precision "
            f"`{exp['precision']}`, batch size {exp['batch_size']}, learning rate {exp['lr']}). "
            f"{why}: FLOPs counted, divided by an assumed sustained rate.",
            f"* WRN-28-10 forward pass, one 32x32 image: {fwd / 1e9:.2f} GFLOP (convolutions and "
            "linear layers, 2 FLOPs per multiply-add, counted with forward hooks); a training pass "
            "(forward + backward) is taken as 3 forwards; HA-SGD with L samples costs L passes per "
            "image, SAM one more, distillation a third more (the teacher's forward). L per run, "
            f"as its training recorded it: {Ls}.",
            f"* {epochs} epochs x the plan's epoch factors, over {train_imgs} training "
            f"images, each model at {ctx.seeds} training seed(s); "
            "every evaluated row (chip x grid point x training seed, as measured here) is one "
            f"pass over {test_imgs} test images, plus one over {val_imgs} validation "
            "images to calibrate ADCs where a row has them.",
            f"* Assumed sustained rate: {100 * ASSUMED_UTILIZATION:.0f} % of one H200's dense "
            f"{peak_name} peak ({peak:g} TFLOP/s, the peak of precision `{exp['precision']}`), "
            f"i.e. {rate / 1e12:.0f} TFLOP/s. Each training is counted in the first section that "
            "uses it.",
            "* Not counted: the validation chips evaluated during training (every epoch), data "
            "loading and augmentation, BatchNorm and other element-wise work, the noise draws "
            "and chip programming, checkpointing. Real utilization of WRN-28-10 at batch "
            f"{exp['batch_size']} may well be lower: read these as lower bounds.",
            md_table(
                [
                    "section",
                    "new trainings",
                    "training EFLOP",
                    "evaluation EFLOP",
                    "GPU hours (estimate)",
                ],
                body,
            ),
        ]
    )


def _plan_options(ctx: Context) -> str:
    """The options that cut this report's plan (``--sections``, ``--models``), as typed."""
    names = [s.name for s in ctx.sections if s.studies]
    every = [s.name for s in SECTIONS if s.studies]
    out = "" if names == every else f" --sections {','.join(names)}"
    models = ctx.meta.get("models")
    return out + ("" if models is None else f" --models {','.join(models)}")
