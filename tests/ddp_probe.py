"""A callback that reports, from inside a DDP run, what the scale-out tests check: whether all
ranks hold the same weights and buffers (BN running statistics, ADC ranges), whether their
training-noise streams differ, how many gradient all-reduces ran, and which BatchNorm classes
trained. Loaded by the train.py subprocess with PYTHONPATH=tests."""

from __future__ import annotations

import json

import pytorch_lightning as pl
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from cimsim.chip.noise import standard_noise


class DDPProbe(pl.Callback):
    def __init__(self, out: str):
        self.out, self.allreduces = out, 0

    def on_train_start(self, trainer, pl_module):
        def counting_allreduce(state, bucket):
            self.allreduces += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(state=None, hook=counting_allreduce)

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        params = trainer.strategy.all_gather(flat)  # (world, n)
        bufs = torch.cat([b.detach().double().flatten() for b in pl_module.buffers()])
        buffers = trainer.strategy.all_gather(bufs)  # (world, m)
        with pl_module._step_streams():  # each rank's training noise at the same step
            noise = standard_noise((8,), "gaussian")
        draws = trainer.strategy.all_gather(noise)
        if trainer.is_global_zero:
            report = {
                "world_size": trainer.world_size,
                "steps": trainer.global_step,
                "allreduces": self.allreduces,
                "max_param_diff": (params - params[0]).abs().max().item(),
                "max_buffer_diff": (buffers - buffers[0]).abs().max().item(),
                "batches_tracked": [
                    int(m.num_batches_tracked)
                    for m in pl_module.modules()
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                ][:1],
                "bn_types": sorted(
                    {
                        type(m).__name__
                        for m in pl_module.modules()
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                    }
                ),
                "draws_differ": not torch.equal(draws[0], draws[1]),
            }
            with open(self.out, "w") as f:
                json.dump(report, f)
