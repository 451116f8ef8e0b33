"""Training draws its noise from streams of its own: the data order does not depend on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch

from cimsim import AnalogConfig
from cimsim.chip.noise import standard_noise, training_stream
from cimsim.cli.train import train
from cimsim.training.classifier import AnalogClassifier


class BatchOrder(pl.Callback):
    """Appends a fingerprint of every training batch, per epoch, to a JSON file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        seen = json.loads(self.path.read_text()) if self.path.exists() else []
        seen.append([trainer.current_epoch, y.tolist(), round(float(x.double().sum()), 6)])
        self.path.write_text(json.dumps(seen))


def batch_order(train_cfg, tmp_path: Path, name: str, overrides: list[str]) -> list:
    out = tmp_path / name
    record = out / "order.json"
    cfg = train_cfg(
        [
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=3",
            "callbacks.robustness=null",
            "callbacks.hessian=null",
            "logger=csv",
            "test=false",
            "model.dropout=0.3",
            "+callbacks.order._target_=test_random_streams.BatchOrder",
            f"+callbacks.order.path={record}",
            *overrides,
        ],
        out=out,
    )
    train(cfg)
    return json.loads(record.read_text())


def test_batch_order_is_the_same_whatever_the_training_noise(train_cfg, tmp_path):
    reference = batch_order(train_cfg, tmp_path, "clean", ["noise.sigma=0", "hasgd.L=1"])
    assert sorted({epoch for epoch, *_ in reference}) == [0, 1]
    for name, overrides in {
        "sigma": ["noise.sigma=0.1", "hasgd.L=1"],
        "L": ["noise.sigma=0.1", "hasgd.L=4"],
    }.items():
        assert batch_order(train_cfg, tmp_path, name, overrides) == reference, name


def test_training_stream_replaces_the_global_rng_and_leaves_it_alone():
    expected = torch.randn(4, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with training_stream(torch.Generator().manual_seed(5)):
        drawn = standard_noise((4,), "gaussian")
    assert torch.equal(drawn, expected)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG did not move
    torch.manual_seed(0)  # outside, unseeded draws are the global RNG's again
    outside = standard_noise((4,), "gaussian")
    assert torch.equal(outside, torch.randn(4, generator=torch.Generator().manual_seed(0)))


def test_a_steps_noise_depends_on_seed_rank_and_step_only(monkeypatch):
    """Two modules at the same (seed, rank, step) draw the same noise whatever the global RNG,
    and the step leaves the global RNG where it was."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    net = {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 3}
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = AnalogClassifier(net=net, chip=AnalogConfig(sigma=0.1))
        before = torch.get_rng_state()
        with model._step_streams():
            draws.append(standard_noise((6,), "gaussian"))
            torch.rand(3)  # dropout-like draws: from the forked global RNG
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(draws[0], draws[1])
    monkeypatch.setenv("PL_GLOBAL_SEED", "8")
    with model._step_streams():
        assert not torch.equal(standard_noise((6,), "gaussian"), draws[0])
