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
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cimsim.cli import register, run
from cimsim.cli.evaluate import evaluate

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(evaluate, cfg)


if __name__ == "__main__":
    main()
