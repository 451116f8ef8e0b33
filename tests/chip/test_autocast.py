"""The analog model under bf16 autocast on the CPU: a training step and a chip evaluation run,
stay finite, and the gradients land on the fp32 weights (autocast casts copies, never them)."""

import torch
import torch.nn.functional as F

from cimsim import AnalogConfig, convert_to_analog, program_chip
from cimsim.training.hasgd import hasgd_backward
from cimsim.wide_resnet import WideResNet


def analog_wrn():
    torch.manual_seed(0)
    return convert_to_analog(WideResNet(10, 1, 10, 3), AnalogConfig(sigma=0.05, mean_shift=0.01))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


def test_hasgd_step_under_bf16_autocast_reaches_the_fp32_weights():
    model = analog_wrn().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16  # autocast is really on
        return F.cross_entropy(logits.float(), y)

    loss = hasgd_backward(closure, L=2)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name


def test_chip_evaluation_under_bf16_autocast_is_finite_and_close_to_fp32():
    model = program_chip(analog_wrn(), 3).eval()
    x, _ = batch()
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    # bf16 keeps ~3 significant digits: the same chip, up to that rounding
    torch.testing.assert_close(logits.float(), reference, rtol=0.02, atol=0.02)
