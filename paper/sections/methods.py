"""Section 7b: the training methods against HA-SGD, on the same chips."""

from __future__ import annotations

from cimsim.robustness.stats import mean_ci, paired
from paper.evidence import Context, ckpt_info, same_model_text, same_models, study_checkpoints
from paper.markdown import acc_text, cell, gain_text, md_table, sigmas_of
from paper.plan import RUN, STUDY, base_of, seed_name


def seed_checkpoints(ctx: Context, study: str) -> dict[int, dict[str, str]]:
    """The checkpoint ``study`` evaluated per training seed and plan's run:
    ``{seed: {run: path}}``."""
    out: dict[int, dict[str, str]] = {}
    for folder, path in study_checkpoints(ctx.eval_dir, STUDY[study], ctx.manifest).items():
        run, k = base_of(folder)
        out.setdefault(k, {})[run] = path
    return dict(sorted(out.items()))


def _schedule(ctx: Context, run: str, ckpts: dict[int, dict[str, str]]) -> tuple[str, str]:
    """(epoch of the run's maximum, forward-backward passes) of ``run``'s evaluated checkpoint
    at each training seed, comma-separated in seed order."""
    epochs, passes = [], []
    for k, paths in ckpts.items():
        info = ckpt_info(paths[run])
        top = ctx.manifest.get("runs", {}).get(seed_name(run, k), {}).get("epochs")
        epochs.append(f"{info.get('epochs')} of {top or 'not recorded'}")
        step = info.get("global_step")
        passes.append(str(None if step is None else ctx.passes(run, step)))
    return ", ".join(epochs), ", ".join(passes)


def _same_models(ckpts: dict[int, dict[str, str]]) -> str:
    """Which evaluated checkpoints are byte-identical, training seed by training seed."""
    if len(ckpts) == 1:
        return same_model_text(next(iter(ckpts.values())))
    found = [f"Training seed {k}: {same_model_text(p)}" for k, p in ckpts.items() if same_models(p)]
    return " ".join(found) or (
        "No two evaluated checkpoints of the same training seed are the same file (sha256)."
    )


def render(ctx: Context) -> str:
    rows = ctx.rows("methods")
    runs = STUDY["methods"].runs
    sigmas = sigmas_of(rows)
    ckpts = seed_checkpoints(ctx, "methods")
    several = len(ckpts) > 1
    body = [
        [
            RUN[r].title,
            *_schedule(ctx, r, ckpts),
            *(acc_text(cell(rows, r, sigma=s)) for s in sigmas),
        ]
        for r in runs
    ]
    ref = "sigma0.1_L4"
    base = mean_ci(list(cell(rows, ref, sigma=0.1).values()))[0]
    verdicts = []
    for r in runs:
        if r == ref:
            continue
        diff = paired(cell(rows, r, sigma=0.1), cell(rows, ref, sigma=0.1))
        verdicts.append(f"* {RUN[r].title}: {gain_text(diff, base)} ({diff.verdict})")
    fig = ctx.figure("methods", rows, "sigma", "training methods: accuracy vs test sigma")
    ckpt = (
        "its last checkpoint (`last.ckpt`)"
        if STUDY["methods"].last
        else "the checkpoint chosen on validation (noisy validation accuracy)"
    )
    per_seed = " (per training seed, in seed order)" if several else ""
    paired_by = (
        "paired by training seed, each seed's mean over the same chips"
        if several
        else "paired over the same chips"
    )
    return "\n\n".join(
        [
            "## 7b. Training methods on the same chips",
            "**Claim.** The paper proposes HA-SGD (L samples per step); the other methods are "
            "cimsim's extensions, compared here with it at the same epochs. Each model is "
            f"evaluated at {ckpt}; \"epoch\" is the evaluated checkpoint's epoch of the run's "
            f'maximum, "passes" its forward-backward passes{per_seed}. Accuracy in %, on the same '
            f"{ctx.study_chips('methods')} chips per point and the whole test set, "
            f"{ctx.ci_text('methods')}.",
            md_table(["method", "epoch", "passes", *(f"sigma {s:g}" for s in sigmas)], body, 1),
            fig,
            _same_models(ckpts),
            "**Rule.** Each method minus HA-SGD (sigma 0.1, L = 4) at test sigma 0.1, paired 95 % "
            f"CI ({paired_by}); in % of HA-SGD's mean.",
            "\n".join(verdicts),
        ]
    )
