"""Side-by-side benchmark: digital PyTorch vs cimsim analog vs aihwkit-lightning.

    python benchmarks/run.py                       # WRN-16-4, batch 64, CPU, 2 threads
    python benchmarks/run.py --device cuda --bf16  # on a GPU, under bf16 autocast

Workload: a pre-activation WideResNet (``--model``), a fixed random batch of 32x32x3 images and
100 classes, SGD with momentum 0.9. Every variant starts from the same weights. On the CPU the
run is pinned to ``--threads`` (2) intra-op threads so figures compare across machines.

Variants (each one call, timed whole):

* ``digital step``: forward, cross-entropy, backward, optimizer step of the plain model.
* ``analog step L=l``: one HA-SGD step (``hasgd_backward`` with l samples, then the optimizer
  step) of the analog twin, sigma 0.05, all other ``AnalogConfig`` defaults (analog BN and
  identity noise on). Reported as a ratio to l x the digital step: the L passes are the
  algorithm, only the noise is overhead.
* ``digital eval`` / ``chip eval``: ``--eval-batches`` forward passes in ``eval()`` mode under
  ``no_grad``, of the plain model and of the analog model with a programmed chip (its layers
  compute their perturbed weights at the first pass and reuse them: the warm-up absorbs that).
* ``PCM chip eval``: the same passes on a PCM chip (``device='pcm'``, aihwkit's PCM model,
  drift compensation on, biases/BN/identity digital), programmed and moved to
  ``t_inference`` = 1 day once, outside the timed region. ``PCM set_time``: one such move
  (drift, read noise and compensation of every Conv/Linear), timed alone. A drift sweep does one
  ``set_time`` per (chip, t, repetition), then full test-set passes: a point costs one PCM eval
  pass plus one ``set_time``.
* ``RRAM chip eval``, ``faulty chip eval``, ``PCM 2-pair chip eval``: the same passes on issue
  21's devices (``DEVICES``): an RRAM chip read after a day, the relative device with 1 % of its
  devices stuck (half at 0, half at g_max), PCM on two device pairs (``f = [1, 3]``) after a day.
* ``aihwkit-lightning step``: the HA-SGD step with L = 1 on ``aihwkit_lightning``'s layers with
  additive weight noise (``WeightNoiseInjectionType.ADD_NORMAL``, std 0.05), when it imports.
* ``tiled step`` / ``tiled chip eval``: the L = 1 step and the chip evaluation with the crossbar
  periphery on (``TILES``: 256-row tiles, 255-level per-vector DACs and tile ADCs, output noise
  0.04 in aihwkit's normalized units, sigma 0.05); nothing is calibrated (calibrated ranges,
  when configured, are calibrated on one batch outside the timed region).
  ``aihwkit-lightning tiled step``: its step with the matching periphery
  (``max_input_size`` 256, 8-bit input and output resolution, ``out_noise`` 0.04, input range
  learning, additive weight noise 0.05): the peer the tiled step is measured against.

Timing: all variants run in one process. After ``--warmup`` untimed rounds, each of the
``--repeats`` rounds runs every variant once, in an order rotated by one each round, so drift in
machine load (and cache warmth left by the previous variant) spreads over all of them. The
figure is the median over rounds of ``time.perf_counter`` around the call (after a device
synchronize on CUDA).

Peak memory: the peak, during one step, of the bytes held by tensors allocated in that step
(activations, gradients, noise draws, noisy weight copies), above what was live before it
(weights, momentum; the previous gradients are freed first). It is measured once per variant,
after the timings. On CUDA it is ``torch.cuda.max_memory_allocated`` minus
``memory_allocated`` before the step. On the CPU ``tracemalloc`` cannot see torch's allocator,
so the step runs once under ``torch.profiler.profile(profile_memory=True)``: the CPU allocator
then reports every allocation and free with a running "Total Allocated", which the exported
trace carries on its ``[memory]`` events; the peak is its largest value minus its value before
the first event. With L samples the gradients of the first sample stay allocated while
the next one runs, so L > 1 costs one set of gradients more than L = 1, and no more.

Noise: the machine may be shared. Min and max are printed next to the median; a ratio that
misses its target by a few percent with a wide min-max spread is worth a second run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cimsim
from cimsim.training.hasgd import hasgd_backward
from cimsim.training.hessian import hessian_traces
from cimsim.training.schedule import NoiseSchedule
from cimsim.wide_resnet import WideResNet

ROOT = Path(__file__).resolve().parent
MODELS = {"wrn10_2": (10, 2), "wrn16_4": (16, 4), "wrn28_10": (28, 10)}
SIGMA = 0.05
NUM_CLASSES = 100
# Targets of the issue: ratios that must not be exceeded, and the minimum speed-up.
TARGETS = {
    "step": 1.10,
    "eval": 1.10,
    "pcm_eval": 1.10,
    "memory": 1.10,
    "vs_aihwkit_lightning": 2.5,
    "method": 1.05,  # antithetic pairs / a noise schedule vs HA-SGD with the same L
}
TARGETS["tiled"] = 1.5  # the crossbar periphery (issues 12, 19): tiled step / digital step
TARGETS["tiled_eval"] = 2.0  # issue 19: tiled chip evaluation / digital evaluation
TARGETS["vs_peer_tiled"] = 1.0  # issue 19: aihwkit-lightning's tiled step / cimsim's, at least
TARGETS["device_eval"] = 1.10  # issue 21: RRAM / faulty chip evaluation / digital evaluation
# The crossbar periphery of the tiled rows: crossbar=tiles, aihwkit's definitions (per-vector DAC,
# output noise and ADC range in normalized units: nothing calibrated).
TILES = dict(tile_rows=256, dac_levels=255, tile_adc_levels=255, out_noise=0.04)
METHOD_L = 4  # L of the method rows (even: antithetic pairs)
HESSIAN_PROBES = 4
DAY = 86400.0  # s: the PCM chip's t_inference
# Issue 21's devices and faults, each a programmed chip read at the given time: RRAM after a day,
# 1 % stuck devices on the relative device, PCM on two pairs (f = [1, 3]).
DEVICES = {
    "RRAM": (cimsim.AnalogConfig(device="rram"), DAY),
    "faulty": (
        cimsim.AnalogConfig(sigma=SIGMA, faults={"stuck_off": 0.005, "stuck_on": 0.005}),
        None,
    ),
    "PCM 2-pair": (cimsim.AnalogConfig(device="pcm", pairs={"f": [1, 3]}), DAY),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="wrn16_4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--L", default="1,4", help="comma-separated HA-SGD sample counts")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="run forwards under bf16 autocast")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on the CPU")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--no-aihwkit", action="store_true", help="skip aihwkit-lightning")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "latest.json")
    args = p.parse_args(argv)
    args.L = sorted({int(v) for v in args.L.split(",")})
    return args


class Bench:
    """The models, data and step functions of one run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        depth, width = MODELS[args.model]
        torch.manual_seed(0)
        self.digital = WideResNet(depth, width, NUM_CLASSES, 3).to(self.device)
        self.x = torch.randn(args.batch_size, 3, 32, 32, device=self.device)
        self.y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=self.device)
        self.eval_x = [torch.randn_like(self.x) for _ in range(args.eval_batches)]
        config = cimsim.AnalogConfig(sigma=SIGMA)
        self.analog = cimsim.convert_to_analog(self.digital, config)
        self.chip = cimsim.program_chip(cimsim.convert_to_analog(self.digital, config), 0).eval()
        pcm = cimsim.convert_to_analog(self.digital, cimsim.AnalogConfig(device="pcm"))
        self.pcm_chip = cimsim.set_time(cimsim.program_chip(pcm.eval(), 0), DAY)
        self.device_chips = {}  # issue 21's devices: programmed (and read) outside the timing
        for name, (chip, t) in DEVICES.items():
            model = cimsim.program_chip(cimsim.convert_to_analog(self.digital, chip).eval(), 0)
            self.device_chips[name] = model if t is None else cimsim.set_time(model, t)
        self.digital_eval = copy.deepcopy(self.digital).eval()
        tiles = cimsim.AnalogConfig(sigma=SIGMA, **TILES)
        self.tiled = cimsim.convert_to_analog(self.digital, tiles)
        self.tiled_chip = cimsim.program_chip(
            cimsim.convert_to_analog(self.digital, tiles), 0
        ).eval()
        cimsim.calibrate_adc(self.tiled_chip, [self.x])
        self.opt = {m: _sgd(m) for m in (self.digital, self.analog, self.tiled)}

    def autocast(self):
        if not self.args.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(
        self,
        model: nn.Module,
        samples: int,
        opt: torch.optim.Optimizer | None = None,
        antithetic: bool = False,
    ):
        """One HA-SGD step (a plain training step when ``samples`` is 1 and model is digital)."""
        opt = opt or self.opt[model]
        model.train()
        opt.zero_grad(set_to_none=True)

        def closure():
            with self.autocast():
                return F.cross_entropy(model(self.x), self.y)

        hasgd_backward(closure, samples, antithetic=antithetic)
        opt.step()

    def scheduled_step(self, samples: int):
        """A step with a noise schedule: every analog layer's sigma set (as the classifier does
        per step), then the HA-SGD step."""
        sigma = NoiseSchedule(kind="uniform").sigma(SIGMA, 0.0)
        for _, layer in cimsim.analog_layers(self.analog):
            layer.config = dataclasses.replace(layer.config, sigma=sigma)
        self.step(self.analog, samples)

    def hessian(self):
        """One Hutchinson estimate with ``HESSIAN_PROBES`` probes at the clean weights."""
        model = self.analog.eval()
        hessian_traces(model, lambda: F.cross_entropy(model(self.x), self.y), HESSIAN_PROBES)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> None:
        with self.autocast():
            for x in self.eval_x:
                model(x)

    def variants(self) -> dict[str, Callable[[], None]]:
        v = {"digital step": lambda: self.step(self.digital, 1)}
        for L in self.args.L:
            v[f"analog step L={L}"] = lambda L=L: self.step(self.analog, L)
        v[f"antithetic step L={METHOD_L}"] = lambda: self.step(
            self.analog, METHOD_L, antithetic=True
        )
        v[f"scheduled step L={METHOD_L}"] = lambda: self.scheduled_step(METHOD_L)
        v[f"Hessian estimate, {HESSIAN_PROBES} probes"] = self.hessian
        if METHOD_L not in self.args.L:
            v[f"analog step L={METHOD_L}"] = lambda: self.step(self.analog, METHOD_L)
        v["digital eval"] = lambda: self.evaluate(self.digital_eval)
        v["chip eval"] = lambda: self.evaluate(self.chip)
        v["PCM chip eval"] = lambda: self.evaluate(self.pcm_chip)
        # The same (t, repetition) again: the same weights, recomputed in full.
        v["PCM set_time"] = lambda: cimsim.set_time(self.pcm_chip, DAY)
        for name, chip in self.device_chips.items():
            v[f"{name} chip eval"] = lambda chip=chip: self.evaluate(chip)
        v["tiled step L=1"] = lambda: self.step(self.tiled, 1)
        v["tiled chip eval"] = lambda: self.evaluate(self.tiled_chip)
        return v


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def aihwkit_lightning_variant(bench: Bench) -> tuple[Callable[[], None] | None, str]:
    """The aihwkit-lightning HA-SGD step (L = 1), or None and why it cannot run."""
    try:
        from aihwkit_lightning.nn.conversion import convert_to_analog
        from aihwkit_lightning.simulator.configs import TorchInferenceRPUConfig
        from aihwkit_lightning.simulator.parameters.enums import WeightNoiseInjectionType
        from aihwkit_lightning.version import __version__
    except Exception as e:  # not installed, or built for another torch
        return None, f"not importable: {type(e).__name__}: {e}"
    rpu = TorchInferenceRPUConfig()
    rpu.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL
    rpu.modifier.std_dev = SIGMA
    try:
        model = convert_to_analog(bench.digital, rpu).to(bench.device)
        opt = _sgd(model)
        bench.step(model, 1, opt)  # fails here if its layers do not run on this torch
    except Exception as e:
        return None, f"does not run: {type(e).__name__}: {e}"
    return (lambda: bench.step(model, 1, opt)), f"aihwkit-lightning {__version__}"


def aihwkit_lightning_tiled_variant(bench: Bench) -> Callable[[], None] | None:
    """The aihwkit-lightning step (L = 1) with its crossbar periphery matching ``TILES``."""
    try:
        from aihwkit_lightning.nn.conversion import convert_to_analog
        from aihwkit_lightning.simulator.configs import TorchInferenceRPUConfig
        from aihwkit_lightning.simulator.parameters.enums import WeightNoiseInjectionType
    except Exception:
        return None
    rpu = TorchInferenceRPUConfig()
    rpu.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL
    rpu.modifier.std_dev = SIGMA
    rpu.mapping.max_input_size = TILES["tile_rows"]
    rpu.forward.inp_res = rpu.forward.out_res = 1 / (2**8 - 2)  # aihwkit's 8-bit converters
    rpu.forward.out_noise = TILES["out_noise"]
    rpu.forward.out_bound = 10.0
    rpu.pre_post.input_range.enable = True
    try:
        model = convert_to_analog(bench.digital, rpu).to(bench.device)
        opt = _sgd(model)
        bench.step(model, 1, opt)
    except Exception as e:
        print(f"aihwkit-lightning tiled step skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return lambda: bench.step(model, 1, opt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants: dict, device, repeats: int, warmup: int) -> dict[str, list]:
    """Seconds per call of each variant, rounds interleaved with a rotating order."""
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0 = time.perf_counter()
            variants[name]()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def peak_step_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` above those live before it (see module docstring)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    # The running total is process-wide: it starts where the last profiled region left it.
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - start


def _ratio(name: str, value: float, limit: float, at_least: bool = False) -> dict:
    met = value >= limit if at_least else value <= limit
    return {
        "ratio": name,
        "value": value,
        "target": f"{'>=' if at_least else '<='} {limit}",
        "met": met,
    }


def step_memory(bench: Bench, model: nn.Module, samples: int) -> int:
    """Peak bytes of one step; the previous step's gradients are freed first, not during it."""
    model.zero_grad(set_to_none=True)
    return peak_step_bytes(lambda: bench.step(model, samples), bench.device)


def summarize(times: dict, memory: dict, args) -> dict:
    """Medians (ms) and the ratios the targets are about."""
    ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    ratios = []
    for L in args.L:
        value = ms[f"analog step L={L}"] / (L * ms["digital step"])
        ratios.append(_ratio(f"analog step L={L} / ({L} x digital)", value, TARGETS["step"]))
    ratios.append(
        _ratio("chip eval / digital eval", ms["chip eval"] / ms["digital eval"], TARGETS["eval"])
    )
    value = ms["PCM chip eval"] / ms["digital eval"]
    ratios.append(_ratio("PCM chip eval / digital eval", value, TARGETS["pcm_eval"]))
    for method in ("antithetic", "scheduled"):
        value = ms[f"{method} step L={METHOD_L}"] / ms[f"analog step L={METHOD_L}"]
        ratios.append(_ratio(f"{method} / HA-SGD step, L={METHOD_L}", value, TARGETS["method"]))
    per_probe = ms[f"Hessian estimate, {HESSIAN_PROBES} probes"] / HESSIAN_PROBES
    ms["Hessian, per probe"] = per_probe
    ms["Hessian per probe / digital step"] = per_probe / ms["digital step"]
    if len(args.L) > 1:
        lo, hi = min(args.L), max(args.L)
        value = memory[f"analog L={hi}"] / memory[f"analog L={lo}"]
        ratios.append(_ratio(f"peak memory L={hi} / L={lo}", value, TARGETS["memory"]))
    value = ms["tiled step L=1"] / ms["digital step"]
    ratios.append(_ratio("tiled step / digital step", value, TARGETS["tiled"]))
    value = ms["tiled chip eval"] / ms["digital eval"]
    ratios.append(_ratio("tiled chip eval / digital eval", value, TARGETS["tiled_eval"]))
    for name in DEVICES:
        value = ms[f"{name} chip eval"] / ms["digital eval"]
        ratios.append(_ratio(f"{name} chip eval / digital eval", value, TARGETS["device_eval"]))
    if "aihwkit-lightning tiled step" in ms:
        value = ms["aihwkit-lightning tiled step"] / ms["tiled step L=1"]
        ms["aihwkit-lightning tiled / cimsim tiled step"] = value
        ratios.append(
            _ratio(
                "aihwkit-lightning tiled / cimsim tiled step",
                value,
                TARGETS["vs_peer_tiled"],
                at_least=True,
            )
        )
    if "aihwkit-lightning step L=1" in ms and 1 in args.L:
        value = ms["aihwkit-lightning step L=1"] / ms["analog step L=1"]
        ratios.append(
            _ratio(
                "speed-up over aihwkit-lightning",
                value,
                TARGETS["vs_aihwkit_lightning"],
                at_least=True,
            )
        )
    return {"median_ms": ms, "ratios": ratios}


def print_report(summary: dict, times: dict, memory: dict, meta: dict) -> None:
    print(f"\n{meta['workload']}")
    print(f"{'variant':<28}{'median ms':>11}{'min ms':>9}{'max ms':>9}")
    for name, t in times.items():
        med = summary["median_ms"][name]
        print(f"{name:<28}{med:>11.1f}{1e3 * min(t):>9.1f}{1e3 * max(t):>9.1f}")
    print(f"\n{'peak memory of one step':<28}{'MiB':>11}")
    for name, b in memory.items():
        print(f"{name:<28}{b / 2**20:>11.1f}")
    print(f"\n{'ratio':<36}{'value':>7}  {'target':<8} met")
    for r in summary["ratios"]:
        print(f"{r['ratio']:<36}{r['value']:>7.3f}  {r['target']:<8} {'yes' if r['met'] else 'NO'}")
    ms = summary["median_ms"]
    print(
        f"Hessian trace, per probe: {ms['Hessian, per probe']:.1f} ms = "
        f"{ms['Hessian per probe / digital step']:.2f} x a digital step"
    )
    if "aihwkit-lightning tiled / cimsim tiled step" in ms:
        value = ms["aihwkit-lightning tiled / cimsim tiled step"]
        print(f"aihwkit-lightning tiled step / cimsim tiled step: {value:.2f}")
    print(f"\naihwkit-lightning: {meta['aihwkit_lightning']}\ncimsim measured: {meta['cimsim']}")


def _commit(where: Path) -> str:
    """The measured checkout's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:

        def git(*a):
            return subprocess.run(["git", *a], cwd=where, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()  # fmt: skip

        return git("rev-parse", "--short", "HEAD") + (
            "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe(args, ahl_status: str) -> dict:
    """The workload in words and the environment, for the table and the JSON."""
    threads = f", torch.set_num_threads({args.threads})" if args.device == "cpu" else ""
    return {
        "workload": (
            f"{args.model}, batch {args.batch_size}, 32x32x3 -> {NUM_CLASSES} classes, sigma "
            f"{SIGMA}, {args.device}{threads}{', bf16 autocast' if args.bf16 else ''}; "
            f"medians of {args.repeats} interleaved rounds after {args.warmup} warm-up"
        ),
        "aihwkit_lightning": ahl_status,
        "cimsim": str(Path(cimsim.__file__).parent),  # which checkout was measured
        "commit": _commit(Path(cimsim.__file__).parent),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def main(argv=None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    variants = bench.variants()
    ahl_status = "skipped (--no-aihwkit)"
    if not args.no_aihwkit:
        ahl_step, ahl_status = aihwkit_lightning_variant(bench)
        if ahl_step is not None:
            variants["aihwkit-lightning step L=1"] = ahl_step
            tiled = aihwkit_lightning_tiled_variant(bench)
            if tiled is not None:
                variants["aihwkit-lightning tiled step"] = tiled
    meta = describe(args, ahl_status)
    times = time_interleaved(variants, bench.device, args.repeats, args.warmup)
    memory = {f"analog L={L}": step_memory(bench, bench.analog, L) for L in args.L}
    memory["digital"] = step_memory(bench, bench.digital, 1)
    summary = summarize(times, memory, args)
    print_report(summary, times, memory, meta)
    meta["wall_s"] = time.perf_counter() - start
    meta["argv"] = list(sys.argv[1:] if argv is None else argv)
    result = {**meta, **summary, "peak_step_bytes": memory, "seconds": times}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
