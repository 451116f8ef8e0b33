"""GPU check of the analog layers: the same programmed chip gives the same outputs on the CPU and
on CUDA, the counter-based read-out draws are the same numbers on both, and bf16 autocast runs
the chip and an HA-SGD step on CUDA close to fp32.

    python benchmarks/gpu_check.py --out check.json   # needs a CUDA device; a few seconds
    python benchmarks/gpu_check.py --device cpu        # the script's own smoke test (CPU twice)

Every chip is programmed on the CPU (chip seed 0) and then moved, so both devices hold the same
stored weights; the tile periphery (``TILES`` of benchmarks/run.py, aihwkit's definitions) runs
with its output noise off where outputs are compared value by value (its draws are compared on
their own). Prints and writes the measured differences; exits 1 when one is over its bound.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import cimsim
from cimsim.chip.draws import normal_like, stream
from cimsim.training.hasgd import hasgd_backward
from cimsim.wide_resnet import WideResNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SIGMA, TILES  # noqa: E402  (the benchmark's chip settings)

# Bounds: fp32 on two devices (different kernels and summation orders: relative error of the
# logits ~1e-6 to 1e-5, an ADC code may flip where a value sits on a level boundary); bf16 keeps
# 8 bits of mantissa (relative error ~1e-2).
FP32_REL = 1e-3
FP32_FLIPS = 0.01  # at most this fraction of predicted classes may differ (ADC boundary flips)
DRAWS_ABS = 1e-4
BF16_REL = 0.1
BF16_AGREE = 0.9


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, on the CPU in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def chips(digital: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    """Programmed chips (on the CPU): relative weight noise alone, and with the tile periphery
    (output noise off, so that outputs compare value by value)."""
    plain = cimsim.program_chip(
        cimsim.convert_to_analog(digital, cimsim.AnalogConfig(sigma=SIGMA)), 0
    )
    tiles = cimsim.AnalogConfig(sigma=SIGMA, **{**TILES, "out_noise": 0.0})
    tiled = cimsim.program_chip(cimsim.convert_to_analog(digital, tiles), 0)
    cimsim.calibrate_adc(tiled, [x])
    return {"chip": plain.eval(), "tiled chip": tiled.eval()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda", help="the device compared with the CPU")
    args = p.parse_args(argv)
    cuda = torch.device(args.device)
    if cuda.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    digital = WideResNet(16, 4, 100, 3)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 100, (64,))
    found: dict[str, float] = {}
    bounds: dict[str, tuple[str, float]] = {}

    a = normal_like(torch.empty(1 << 22), stream(12345))
    b = normal_like(torch.empty(1 << 22, device=cuda), stream(12345))
    found["draws: max |cpu - cuda|"] = float((a - b.cpu()).abs().max())
    bounds["draws: max |cpu - cuda|"] = ("<=", DRAWS_ABS)

    with torch.no_grad():
        for name, chip in chips(digital, x).items():
            on_cpu = chip(x)
            gpu = copy.deepcopy(chip).to(cuda)
            on_gpu = gpu(x.to(cuda))
            found[f"{name}: fp32 logits, rel. error cuda vs cpu"] = rel(on_gpu, on_cpu)
            bounds[f"{name}: fp32 logits, rel. error cuda vs cpu"] = ("<=", FP32_REL)
            flips = float((on_gpu.argmax(1).cpu() != on_cpu.argmax(1)).float().mean())
            found[f"{name}: fp32 predictions differing"] = flips
            bounds[f"{name}: fp32 predictions differing"] = ("<=", FP32_FLIPS)
            with torch.autocast(cuda.type, dtype=torch.bfloat16):
                half = gpu(x.to(cuda))
            found[f"{name}: bf16 logits, rel. error vs fp32"] = rel(half.float(), on_gpu)
            bounds[f"{name}: bf16 logits, rel. error vs fp32"] = ("<=", BF16_REL)
            agree = float((half.argmax(1) == on_gpu.argmax(1)).float().mean())
            found[f"{name}: bf16 predictions agreeing with fp32"] = agree
            bounds[f"{name}: bf16 predictions agreeing with fp32"] = (">=", BF16_AGREE)

    # programmed on the device itself: the draws depend on the chip seed and names only
    plain = cimsim.convert_to_analog(digital, cimsim.AnalogConfig(sigma=SIGMA)).to(cuda)
    with torch.no_grad():
        there = cimsim.program_chip(plain, 0).eval()(x.to(cuda))
        here = chips(digital, x)["chip"](x)
    found["chip programmed on the device: rel. error vs programmed on cpu"] = rel(there, here)
    bounds["chip programmed on the device: rel. error vs programmed on cpu"] = ("<=", FP32_REL)

    model = cimsim.convert_to_analog(digital, cimsim.AnalogConfig(sigma=SIGMA, **TILES)).to(cuda)
    model.train()
    xs, ys = x.to(cuda), y.to(cuda)

    def closure():
        with torch.autocast(cuda.type, dtype=torch.bfloat16):
            return F.cross_entropy(model(xs), ys)

    loss = hasgd_backward(closure, 4)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    found["bf16 HA-SGD step (tiled, L=4): parameters with a finite gradient"] = float(
        finite and len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    )
    bounds["bf16 HA-SGD step (tiled, L=4): parameters with a finite gradient"] = (">=", 1.0)
    found["bf16 HA-SGD step (tiled, L=4): loss"] = float(loss) if loss is not None else float("nan")

    failed = []
    for key, value in found.items():
        op, bound = bounds.get(key, (None, None))
        ok = op is None or (value <= bound if op == "<=" else value >= bound)
        failed += [] if ok else [key]
        print(
            f"{'ok  ' if ok else 'FAIL'} {key}: {value:.3g}" + (f" ({op} {bound:g})" if op else "")
        )
    doc = {
        "device": torch.cuda.get_device_name(0) if cuda.type == "cuda" else str(cuda),
        "torch": torch.__version__,
        "found": found,
        "bounds": {k: list(v) for k, v in bounds.items()},
        "failed": failed,
    }
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
