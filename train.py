"""Train an analog-robust network with HA-SGD (Wan et al. 2022).

    python train.py                                  # digits, WRN-10-2, clean training
    python train.py noise.sigma=0.05 hasgd.L=4       # HA-SGD at 5 % relative weight noise
    python train.py -m noise.sigma=0,0.05,0.1        # a sweep, one run per value
    python train.py ckpt_path=RUN/checkpoints/last.ckpt trainer.max_epochs=20
                                                     # resume an interrupted run, train longer

The config lives in conf/ (train.yaml and one folder per concern); `python train.py --help`
prints it.

Resuming: every checkpoint stores the run's composed config and its overrides (ResumeState), so
`ckpt_path=` alone resumes the run with its own settings (sigma, L, data, ...), not the
defaults, in its own folder RUN (the checkpoint's parent's parent; Hydra's record of the resume
goes to RUN/.hydra/resume_<time>/, the run's original .hydra/ stays). An override that
contradicts the run is refused, unless `resume_overrides=allow`; ckpt_path, trainer.max_epochs
(max_steps, max_time), paths.*, hydra.* and logger.wandb.offline may always change. The W&B run
continues under its id. A checkpoint written before checkpoints stored the config resumes with
RUN/.hydra/config.yaml.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from cimsim.cli import register, run
from cimsim.cli.train import resume_in_place, train

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(train, cfg)


if __name__ == "__main__":
    sys.argv += resume_in_place(sys.argv[1:])
    main()
