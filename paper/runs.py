"""The plan's trainings: every ``Run`` (``train.py`` overrides), its training seeds, in order."""

from __future__ import annotations

from dataclasses import dataclass

MEAN_SHIFT = 0.01  # Fig. 8's middle training mean shift (the report's headline pair: +-0.01)
MEAN_SHIFTS = (0.005, 0.01, 0.02)  # Fig. 8's trained shifts: -m and +m each (at sigma 0.05)
FIG7_SIGMAS = (0.02, 0.05, 0.1, 0.15, 0.2)  # the authors' training-sigma range (HA-SGD, L = 4)
FIG9_SIGMAS = (0.05, 0.1, 0.15)  # Fig. 9's HA-SGD models (each against the digital one)
SCALES = ("half_range", "abs_max")  # noise.scale: the authors' range, aihwkit's
BIASES = ("separate", "unscaled", "per_tensor", "shared", "digital")  # noise.bias / chip.bias
BIAS_SIGMA = 0.1  # the bi-scale models' training sigma (HA-SGD, L = 4)
L_VALUES = (1, 2, 4, 8)  # the L study: cosine schedule, at equal steps and at equal passes
L_PASSES = 4  # the equal-passes arm: L x epochs_factor = L_PASSES (the L = 4 run's passes)
SEED0 = 42  # training seed k of every run is SEED0 + k (train.yaml's default seed is 42)
FAULT_TRAIN = 0.005  # the faults-in-the-loop model: 0.5 % of devices stuck off, 0.5 % on
RRAM_T_TRAIN = 86400.0  # the RRAM model is trained for the chip one day after programming


@dataclass(frozen=True)
class Run:
    """One training: ``train.py`` overrides, at ``epochs_factor`` x the base epochs (``{half}``
    in an override becomes half the run's epochs); ``teacher``: the run whose ``last.ckpt``
    this one distils from (the teacher of the same training seed)."""

    name: str
    title: str
    overrides: tuple[str, ...]
    epochs_factor: float = 1.0
    teacher: str | None = None

    def epochs(self, base: int) -> int:
        return max(1, round(base * self.epochs_factor))

    def resolved(self, base: int) -> list[str]:
        """The overrides with the run's epochs (``trainer.max_epochs``) filled in."""
        epochs = self.epochs(base)
        extra = [o.format(half=epochs / 2) for o in self.overrides]
        return [*extra, f"trainer.max_epochs={epochs}"]

    def seeded(self, k: int) -> Run:
        """Training seed ``k`` of this run (seed ``SEED0 + k``): named ``<name>`` for k = 0 and
        ``<name>.s<k>`` after, its teacher the teacher's seed ``k``."""
        return Run(
            seed_name(self.name, k),
            self.title,
            (*self.overrides, f"seed={SEED0 + k}"),
            self.epochs_factor,
            None if self.teacher is None else seed_name(self.teacher, k),
        )


def seed_name(run: str, k: int) -> str:
    """The folder of training seed ``k`` of ``run``."""
    return run if k == 0 else f"{run}.s{k}"


def base_of(name: str) -> tuple[str, int]:
    """(the plan's run, the training seed index) of a training folder name."""
    run, dot, k = name.rpartition(".s")
    if dot and k.isdigit() and run in RUN:
        return run, int(k)
    return name, 0


def _hasgd(sigma: float, L: int, factor: float = 1.0, **kw) -> Run:
    ep = "" if factor == 1 else f", {factor:g}x epochs"
    return Run(
        f"sigma{sigma:g}_L{L}" + ("" if factor == 1 else f"_x{factor:g}ep"),
        f"HA-SGD sigma={sigma:g}, L={L}{ep}",
        (f"noise.sigma={sigma}", f"hasgd.L={L}"),
        factor,
        **kw,
    )


def _method(name: str, title: str, **kw) -> Run:
    return Run(name, title, ("noise.sigma=0.1", f"method={name}"), **kw)


def _shift(mu: float) -> Run:
    sign, name = ("-", f"mu_neg{-mu:g}") if mu < 0 else ("+", f"mu_pos{mu:g}")
    return Run(
        name,
        f"HA-SGD sigma=0.05, mu={sign}{abs(mu):g}, L=4",
        ("noise.sigma=0.05", f"noise.mean_shift={mu}", "hasgd.L=4"),
    )


def mapping_run(scale: str, bias: str) -> str:
    """The bi-scale study's model trained under ``noise.scale=scale noise.bias=bias`` (the
    authors' mapping is Fig. 7's sigma-0.1 model)."""
    if (scale, bias) == (SCALES[0], BIASES[0]):
        return f"sigma{BIAS_SIGMA:g}_L4"
    return f"map_{scale}_{bias}"


def _mapping(scale: str, bias: str) -> Run:
    return Run(
        mapping_run(scale, bias),
        f"HA-SGD sigma={BIAS_SIGMA:g}, L=4, trained {scale} / {bias}",
        (f"noise.sigma={BIAS_SIGMA}", "hasgd.L=4", f"noise.scale={scale}", f"noise.bias={bias}"),
    )


def l_run(L: int, factor: float = 1.0) -> str:
    """The L study's run: cosine schedule, ``factor`` x the base epochs."""
    return f"cos_L{L}" + ("" if factor == 1 else f"_x{factor:g}ep")


def _l_cosine(L: int, factor: float = 1.0) -> Run:
    ep = "" if factor == 1 else f", {factor:g}x epochs"
    return Run(
        l_run(L, factor),
        f"HA-SGD sigma=0.1, L={L}, cosine{ep}",
        ("hasgd=cosine", "noise.sigma=0.1", f"hasgd.L={L}"),
        factor,
    )


L_STEPS = tuple(l_run(L) for L in L_VALUES)  # equal optimizer steps: the base epochs each
L_EQUAL_PASSES = tuple(l_run(L, L_PASSES / L) for L in L_VALUES)  # L x epochs = L_PASSES

RUNS: tuple[Run, ...] = (  # in training order: the digital model (a distillation teacher) first
    Run("digital", "digital (sigma=0, L=1)", ("noise.sigma=0.0", "hasgd.L=1")),
    *(_hasgd(s, 4) for s in FIG7_SIGMAS),
    *(_shift(sign * mu) for mu in MEAN_SHIFTS for sign in (-1, 1)),
    *(_mapping(sc, b) for sc in SCALES for b in BIASES if (sc, b) != (SCALES[0], BIASES[0])),
    *(_l_cosine(L) for L in L_VALUES),
    *(_l_cosine(L, L_PASSES / L) for L in L_VALUES if L != L_PASSES),
    _hasgd(0.1, 1),
    # experiment=pcm_digits's settings, spelled out: a second experiment= (the paper-scale
    # command's) would replace it, and the base epochs apply as to every run.
    Run(
        "pcm",
        "PCM, t_train=1 h, L=2",
        ("noise=pcm", "noise.sigma=0.0", "noise.t_train=3600.0", "hasgd.L=2"),
    ),
    _method("antithetic", "HA-SGD L=4, antithetic pairs"),
    Run(
        "ramp",
        "HA-SGD L=4, sigma ramped over half the epochs",
        ("noise.sigma=0.1", "method=ramp", "noise.schedule.ramp_epochs={half}"),
    ),
    _method("overscaled", "HA-SGD L=4, 1.5x sigma"),
    Run(
        "distill",
        "HA-SGD L=4, distilled from the digital model",
        ("noise.sigma=0.1", "method=distill"),
        teacher="digital",
    ),
    _method("sam", "HA-SGD L=4 after a SAM ascent (rho 0.05)"),
    Run(
        "faults",
        f"HA-SGD sigma=0.1, L=4, faults {100 * FAULT_TRAIN:g} % off + {100 * FAULT_TRAIN:g} % on",
        (
            "noise.sigma=0.1",
            "hasgd.L=4",
            f"noise.faults.stuck_off={FAULT_TRAIN}",
            f"noise.faults.stuck_on={FAULT_TRAIN}",
        ),
    ),
    # noise=rram's settings spelled out as the pcm run's: trained for the chip 1 day on
    Run(
        "rram",
        "RRAM, t_train=1 d, L=2",
        ("noise=rram", "noise.sigma=0.0", f"noise.t_train={RRAM_T_TRAIN}", "hasgd.L=2"),
    ),
)
RUN = {r.name: r for r in RUNS}
