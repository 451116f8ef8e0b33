"""The ranges behind the bi-scale result: per layer of a trained network, the noise scales that
the bias mappings give its stored weight and bias (section 4's per-layer table and its reading).

Every scale comes from cimsim's own mapping, ``cimsim.chip.noise.noise_scales``, the function
the chip perturbs with: ``per_tensor`` gives ``r(W)`` and ``r(b)``, ``separate`` (bi-scale)
``R`` and ``R f``, ``unscaled`` the naive ``[W b]`` mapping's ``R_u`` (docs/model.md, "Bi-scale
bias mapping"). A BatchNorm's stored pair is its fold on the running statistics, the pair a
programmed chip perturbs; its output noise ``nu_w x + nu_b`` has the variance
``sigma^2 (r_w^2 E[x^2] + r_b^2)`` per channel, with ``E[x^2] = var + mean^2`` of its input
(the running statistics), so the checkpoint alone says which term dominates there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cimsim.chip.convert import analog_layers
from cimsim.chip.noise import noise_scales
from cimsim.training.checkpoint import load_module
from cimsim.training.classifier import AnalogClassifier
from paper.markdown import md_table

TOLERANCE = 1e-6  # a ratio within this of 1 is 1 (float64 extremes of the same tensors)


def _ratio(a: float, b: float) -> float:
    """``a / b``, NaN where ``b`` is 0 (a range of 0: nothing stored to compare with)."""
    return a / b if b else math.nan


@dataclass(frozen=True)
class LayerRanges:
    """One layer's ranges under one range convention: ``r_w = r(W)``, ``r_b = r(b)``; bi-scale's
    noise scales ``big_r = R`` (of W) and ``big_rf = R f`` (of b); the unscaled ``[W b]``
    mapping's ``r_u = R_u`` (of both); ``x2``: a BatchNorm's mean input second moment over its
    channels (None for a conv or linear layer, whose inputs the checkpoint does not hold)."""

    layer: str
    kind: str
    r_w: float
    r_b: float
    big_r: float
    big_rf: float
    r_u: float
    x2: float | None = None

    @property
    def widen_w(self) -> float:
        """``R / r(W)``: bi-scale's weight noise over the weights' own range."""
        return _ratio(self.big_r, self.r_w)

    @property
    def widen_b(self) -> float:
        """``R f / r(b)``: bi-scale's bias noise over the bias's own range."""
        return _ratio(self.big_rf, self.r_b)

    @property
    def w_vs_unscaled(self) -> float:
        """``R / R_u``: bi-scale's weight noise over the unscaled mapping's."""
        return _ratio(self.big_r, self.r_u)

    @property
    def b_vs_unscaled(self) -> float:
        """``R f / R_u``: bi-scale's bias noise over the unscaled mapping's."""
        return _ratio(self.big_rf, self.r_u)

    @property
    def bias_share(self) -> float | None:
        """The bias term's share of a BatchNorm's output noise variance under bi-scale."""
        if self.x2 is None:
            return None
        return _ratio(self.big_rf**2, self.big_r**2 * self.x2 + self.big_rf**2)

    @property
    def out_vs_unscaled(self) -> float | None:
        """A BatchNorm's output noise std under bi-scale over unscaled's."""
        if self.x2 is None:
            return None
        return math.sqrt(
            _ratio(self.big_r**2 * self.x2 + self.big_rf**2, self.r_u**2 * (self.x2 + 1.0))
        )


def _is_bn(layer: nn.Module) -> bool:
    return getattr(layer, "_affine", None) is not None and layer.running_mean is not None


def stored_pair(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) an analog layer stores on a programmed chip: a BatchNorm's fold on its
    running statistics (its own ``_affine``), else its parameters."""
    if _is_bn(layer):
        return layer._affine(layer.running_mean, layer.running_var)
    return layer.weight, layer.bias


@torch.no_grad()
def layer_ranges(net: nn.Module, scale: str) -> list[LayerRanges]:
    """Every analog layer of ``net`` that stores a weight and a bias, in module order, with its
    ranges under ``scale`` (``half_range`` or ``abs_max``; per tensor, as the plan's chips)."""
    out = []
    for name, layer in analog_layers(net):
        if "weight" not in layer.analog_tensors() or getattr(layer, "bias", None) is None:
            continue
        w, b = (t.detach().double() for t in stored_pair(layer))
        r_w, r_b = noise_scales(w, b, scale, False, "per_tensor")
        big_r, big_rf = noise_scales(w, b, scale, False, "separate")
        r_u, _ = noise_scales(w, b, scale, False, "unscaled")
        x2 = None
        if _is_bn(layer):
            x2 = float((layer.running_var.double() + layer.running_mean.double() ** 2).mean())
        kind = type(layer).__name__.removeprefix("Analog")
        scales = (float(v) for v in (r_w, r_b, big_r, big_rf, r_u))
        out.append(LayerRanges(name, kind, *scales, x2))
    return out


@functools.lru_cache(maxsize=16)
def checkpoint_ranges(path: str, scale: str) -> tuple[LayerRanges, ...]:
    """``layer_ranges`` of a ``train.py`` checkpoint's network (loaded as evaluate.py does)."""
    model = load_module(AnalogClassifier, path, map_location="cpu", weights_only=True)
    return tuple(layer_ranges(model.net.eval(), scale))


def _g(x: float | None) -> str:
    return "–" if x is None else "n/a" if math.isnan(x) else f"{x:.3g}"


def ranges_table(layers: Sequence[LayerRanges]) -> str:
    """The per-layer table: ranges, bi-scale's scale, its ratios, a BatchNorm's output noise."""
    header = ["layer", "kind", "r(W)", "r(b)", "R", "R/r(W)", "R f/r(b)", "R/R_u", "R f/R_u"]
    header += ["BN: bias share of the noise", "BN: output noise / unscaled's"]
    body = [
        [x.layer, x.kind]
        + [_g(getattr(x, k)) for k in ("r_w", "r_b", "big_r", "widen_w", "widen_b")]
        + [_g(getattr(x, k)) for k in ("w_vs_unscaled", "b_vs_unscaled")]
        + [_g(x.bias_share), _g(x.out_vs_unscaled)]
        for x in layers
    ]
    return md_table(header, body, 2)


def records(layers: Sequence[LayerRanges], **keys) -> list[dict]:
    """The CSV rows of a table: ``keys`` (model, scale) then every field and ratio."""
    ratios = ("widen_w", "widen_b", "w_vs_unscaled", "b_vs_unscaled", "bias_share")
    return [
        {**keys, **asdict(x), **{k: getattr(x, k) for k in (*ratios, "out_vs_unscaled")}}
        for x in layers
    ]


def _span(values: list[float]) -> str:
    """``a-b`` (``a`` when equal at 3 significant digits)."""
    lo, hi = f"{min(values):.3g}", f"{max(values):.3g}"
    return lo if lo == hi else f"{lo}-{hi}"


def _above(values: list[float]) -> int:
    return sum(v > 1 + TOLERANCE for v in values)


def reading(layers: Sequence[LayerRanges]) -> str:
    """What one table says, in numbers: R/r(W) (and that R f/r(b) equals it), bi-scale's weight
    and bias noise over unscaled's by kind of layer, and which term makes bi-scale the noisier
    mapping where it is (the larger excess over unscaled); a BatchNorm's output noise."""
    both = [x for x in layers if x.r_w > 0 and x.r_b > 0]
    if not both:
        return "No layer has both a weight and a bias range above 0: nothing to map."
    groups = {
        "BatchNorm": [x for x in both if x.x2 is not None],
        "conv/linear": [x for x in both if x.x2 is None],
    }
    gap = max(abs(x.widen_w - x.widen_b) / x.widen_w for x in both)
    parts = [f"R/r(W) = R f/r(b) (they differ by at most {gap:.1e} relatively: f = r(b)/r(W))"]
    for what, key in (("R/r(W)", "widen_w"), ("R/R_u", "w_vs_unscaled")):
        spans = [f"{_span([getattr(x, key) for x in g])} ({k})" for k, g in groups.items() if g]
        parts.append(f"{what} {', '.join(spans)}")
    spans = [f"{_span([x.b_vs_unscaled for x in g])} ({k})" for k, g in groups.items() if g]
    parts.append(f"R f/R_u {', '.join(spans)}")
    w = [x.w_vs_unscaled for x in both]
    b = [x.b_vs_unscaled for x in both]
    text = "; ".join(parts) + ". "
    if max(max(w), max(b)) <= 1 + TOLERANCE:
        text += "Neither term is noisier than unscaled's in any layer."
    else:
        term = "bias noise" if max(b) > max(w) else "weight noise"
        text += (
            f"Bi-scale is noisier than unscaled in the weights of {_above(w)} and the bias of "
            f"{_above(b)} of {len(both)} layers; the larger excess is in the {term} (R f/R_u up "
            f"to {max(b):.3g}, R/R_u up to {max(w):.3g})."
        )
    bn = groups["BatchNorm"]
    if bn:
        shares = _span([100 * x.bias_share for x in bn])
        ratio = _span([x.out_vs_unscaled for x in bn])
        text += (
            f" In the BatchNorm outputs the bias term is {shares} % of bi-scale's noise "
            f"variance, whose std is {ratio}x unscaled's."
        )
    return text


def why(scale: str, layers: Sequence[LayerRanges]) -> str:
    """The explanation the tables give under ``scale`` (``layers``: every table's at it): whether
    bi-scale is anywhere noisier than unscaled, and through which term; where a BatchNorm's
    output noise exceeds unscaled's, the bias term's share of it."""
    both = [x for x in layers if x.r_w > 0 and x.r_b > 0]
    if not both:
        return f"under `{scale}` no layer has both a weight and a bias range above 0"
    top_w = max(x.w_vs_unscaled for x in both)
    top_b = max(x.b_vs_unscaled for x in both)
    if max(top_w, top_b) <= 1 + TOLERANCE:
        return (
            f"under `{scale}` bi-scale's noise is nowhere above unscaled's, in either term (R/R_u "
            f"at most {top_w:.3g}, R f/R_u at most {top_b:.3g}): it perturbs every stored "
            "tensor at most as much as unscaled does"
        )
    term = "the bias noise" if top_b > top_w else "the weights' noise"
    text = (
        f"under `{scale}` bi-scale's larger excess over unscaled is in {term} (R f/R_u up to "
        f"{top_b:.3g}, R/R_u up to {top_w:.3g})"
    )
    bn = [x for x in both if x.out_vs_unscaled is not None]
    worse = [x for x in bn if x.out_vs_unscaled > 1]
    if worse:
        text += (
            f"; {len(worse)} of the {len(bn)} BatchNorm layers have an output noise above "
            f"unscaled's (std {_span([x.out_vs_unscaled for x in worse])}x), the bias term being "
            f"{_span([100 * x.bias_share for x in worse])} % of it"
        )
    return text
