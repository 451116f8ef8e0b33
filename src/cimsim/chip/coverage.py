"""``cimsim.coverage``: how many of a model's multiply-accumulates run on the chip, and why the
others do not (docs/extending.md, "What runs on the chip").

One forward (``eval()``, no gradients, ADCs and DACs bypassed; modes restored after) with a hook
on every module and a ``TorchFunctionMode`` that sees every torch call. Counted MACs:

* a Conv: output elements x ``C_in / groups`` x kernel size (transposed: input elements x
  ``C_out / groups`` x kernel size); a Linear: output elements x ``in_features``;
* a normalization's affine: one per output element (its statistics are not MACs);
* ``nn.MultiheadAttention`` left digital: its projections (as Linears) and its attention;
* any product a module's own ``forward`` calls (``matmul``, ``einsum``, ``F.linear``, SDPA...):
  attention (activations x activations: no crossbar holds them) or unconverted weights; digital.

Elementwise products (gating, activations) and additions (pooling, residuals) are not counted,
nor are recurrent layers (``uncounted``). A packed q/k/v crossbar read with different query and
key inputs computes all its rows for each: its count is the crossbar's work."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cimsim.chip.adc import adcs
from cimsim.chip.attention import AnalogMultiheadAttention
from cimsim.chip.convert import _ANALOG_TYPES, analog_layers, skip_reason
from cimsim.chip.layers import AnalogLayer
from cimsim.chip.text import si as _si
from cimsim.chip.text import table as _table

_ROWS = 12  # digital rows printed one per module; more are grouped by type and reason
ATTENTION = "attention scores and weighted sum (activation x activation): no stored weights"
UNCOUNTED = "an unsupported layer: neither converted nor counted (its MACs are not in the total)"
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_COUNTED = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.MultiheadAttention, *_NORMS)


def _counted(module: nn.Module) -> bool:
    """Whether a module's MACs are counted from its shapes (its internals are its own): the
    analog layers and the digital layers they come from (the analog attention's children are,
    the attention itself is counted call by call)."""
    if isinstance(module, AnalogMultiheadAttention):
        return False
    return isinstance(module, (AnalogLayer, *_COUNTED))


@dataclass(frozen=True)
class ModuleMACs:
    """The MACs one module did in the forward, on the chip or not (``reason``: why not)."""

    name: str
    kind: str
    macs: int
    analog: bool
    reason: str = ""
    calls: int = 1


@dataclass(frozen=True)
class DigitalParameter:
    """A parameter no analog layer holds, with why."""

    name: str
    numel: int
    reason: str


@dataclass(frozen=True)
class Coverage:
    """What ``coverage(model, ...)`` measured: per-module MACs and the digital parameters."""

    modules: tuple[ModuleMACs, ...]
    parameters: tuple[DigitalParameter, ...]
    parameter_count: int

    @property
    def total(self) -> int:
        return sum(m.macs for m in self.modules)

    @property
    def analog(self) -> int:
        return sum(m.macs for m in self.modules if m.analog)

    @property
    def fraction(self) -> float:
        """The fraction of the counted MACs on analog layers (nan when the forward did none);
        ``uncounted`` lists the parameters of layers whose MACs are not counted."""
        return self.analog / self.total if self.total else math.nan

    @property
    def weight_fraction(self) -> float:
        """The fraction of the MACs with stored weights (all but attention's activation x
        activation products, which no weight-stationary crossbar holds) on analog layers."""
        weights = self.total - sum(m.macs for m in self.digital if m.reason == ATTENTION)
        return self.analog / weights if weights else math.nan

    @property
    def uncounted(self) -> list[DigitalParameter]:  # recurrent layers' MACs are missed
        return [p for p in self.parameters if p.reason.endswith(UNCOUNTED)]

    @property
    def digital(self) -> list[ModuleMACs]:
        """Every module's digital MACs, with its reason."""
        return [m for m in self.modules if not m.analog and m.macs]

    def __str__(self) -> str:
        total = self.total
        share = lambda n: f"{100 * n / total:.3g} %" if total else "-"  # noqa: E731
        lines = [
            f"MAC coverage: {100 * self.fraction:.4g} % of {_si(total)} MACs on analog layers "
            f"({_si(self.analog)} analog, {_si(total - self.analog)} digital)"
        ]
        if self.uncounted:
            layers = sorted({p.name.rsplit(".", 1)[0] for p in self.uncounted})
            lines.append(f"NOT COUNTED (unsupported layers): {', '.join(layers)}")
        if self.digital:
            lines += ["", "digital MACs:", *self._digital_table(share)]
        kinds: dict[tuple[str, bool], list] = defaultdict(lambda: [set(), 0])
        for m in self.modules:
            kinds[m.kind, m.analog][0].add(m.name)
            kinds[m.kind, m.analog][1] += m.macs
        rows = [
            (kind, "analog" if analog else "digital", str(len(n)), _si(macs), share(macs))
            for (kind, analog), (n, macs) in sorted(kinds.items(), key=lambda kv: -kv[1][1])
        ]
        lines += ["", "by type:", *_table(("type", "on", "modules", "MACs", "share"), rows)]
        if self.parameters:
            groups: dict[str, list[DigitalParameter]] = defaultdict(list)
            for p in self.parameters:
                groups[p.reason].append(p)
            values = sum(p.numel for p in self.parameters)
            frac = values / self.parameter_count if self.parameter_count else math.nan
            lines += ["", f"digital parameters: {_si(values)} values ({100 * frac:.3g} %):"]
            rows = []
            for reason, ps in groups.items():
                names = ", ".join(p.name for p in ps[:2]) + (", ..." if len(ps) > 2 else "")
                rows.append((str(len(ps)), _si(sum(p.numel for p in ps)), names, reason))
            lines += _table(("tensors", "values", "e.g.", "reason"), rows)
        return "\n".join(lines)

    def _digital_table(self, share) -> list[str]:
        """One row per digital module and reason; past ``_ROWS`` rows, one per type and reason
        (``modules``: how many, ``e.g.``: the first)."""
        if len(self.digital) <= _ROWS:
            rows = [
                (m.name or "(model)", m.kind, _si(m.macs), share(m.macs), m.reason)
                for m in self.digital
            ]
            return _table(("module", "type", "MACs", "share", "reason"), rows)
        groups: dict[tuple[str, str], list[ModuleMACs]] = defaultdict(list)
        for m in self.digital:
            groups[m.kind, m.reason].append(m)
        rows = []
        for (kind, reason), ms in groups.items():
            macs = sum(m.macs for m in ms)
            first = ms[0].name or "(model)"
            rows.append((kind, str(len(ms)), _si(macs), share(macs), first, reason))
        return _table(("type", "modules", "MACs", "share", "e.g.", "reason"), rows)


def _module_macs(module: nn.Module, args: tuple, kwargs: dict, out) -> list[tuple[int, str]]:
    """``(MACs, part)`` of one call of a counted module; part ``attention`` is the activation x
    activation part of a digital ``nn.MultiheadAttention``, ``""`` the weights' part."""
    if isinstance(module, nn.MultiheadAttention):
        names = ("query", "key", "value")
        qkv = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
        return _attention_macs(module, *qkv)
    x = args[0] if args else next(iter(kwargs.values()))
    y = out[0] if isinstance(out, tuple) else out
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        k = math.prod(module.kernel_size)
        return [(x.numel() * module.out_channels // module.groups * k, "")]
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        return [(y.numel() * module.in_channels // module.groups * k, "")]
    if isinstance(module, nn.Linear):
        return [(y.numel() * module.in_features, "")]
    if isinstance(module, nn.Bilinear):
        return [(y.numel() * module.in1_features * module.in2_features, "")]
    has_affine = getattr(module, "weight", None) is not None  # a norm
    return [(y.numel(), "")] if has_affine else []


def _attention_macs(m: nn.MultiheadAttention, query, key, value) -> list[tuple[int, str]]:
    """A digital ``nn.MultiheadAttention``: its projections and its attention."""
    batched = query.dim() == 3
    seq = 1 if m.batch_first and batched else 0
    n = query.shape[1 - seq] if batched else 1
    tgt, src = query.shape[seq], key.shape[seq]
    e = m.embed_dim
    weights = n * (tgt * e * e + src * e * (m.kdim + m.vdim) + tgt * e * e)
    src += int(m.bias_k is not None) + int(m.add_zero_attn)
    return [(weights, ""), (2 * n * tgt * src * e, "attention")]


def _op_macs(name: str, args: tuple, kwargs: dict, out) -> int:
    """The MACs of one torch call ``name`` (0 for ops that are not products)."""
    a = lambda i, key: args[i] if i < len(args) else kwargs.get(key)  # noqa: E731
    if not isinstance(out, torch.Tensor) and name != "scaled_dot_product_attention":
        return 0
    if name in ("matmul", "__matmul__", "mm", "bmm", "mv", "inner"):
        x = a(0, "input")
        return out.numel() * (x.shape[-1] if x.dim() else 1)
    if name == "__rmatmul__":
        x = a(0, "input")
        return out.numel() * (x.shape[-2] if x.dim() > 1 else x.shape[0])
    if name in ("dot", "vdot"):
        return a(0, "input").numel()
    if name in ("addmm", "addmm_", "baddbmm", "baddbmm_", "addmv", "addmv_"):
        return out.numel() * a(1, "mat1" if "mm" in name else "batch1").shape[-1]
    if name in ("addbmm", "addbmm_"):
        b = a(1, "batch1")
        return b.shape[0] * out.numel() * b.shape[-1]
    if name == "einsum":
        return _einsum_macs(args, kwargs)
    if name == "tensordot":
        x, y = a(0, "a"), a(1, "b")
        return round(out.numel() * math.sqrt(x.numel() * y.numel() / max(out.numel(), 1)))
    if name == "linear":
        return out.numel() * a(1, "weight").shape[-1]
    if name == "bilinear":
        w = a(2, "weight")
        return out.numel() * w.shape[1] * w.shape[2]
    if name in ("conv1d", "conv2d", "conv3d"):
        w = a(1, "weight")
        return out.numel() * math.prod(w.shape[1:])
    if name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        w = a(1, "weight")
        return a(0, "input").numel() * math.prod(w.shape[1:])
    if name == "scaled_dot_product_attention":
        q, k, v = a(0, "query"), a(1, "key"), a(2, "value")
        return math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


def _einsum_macs(args: tuple, kwargs: dict) -> int:
    """A contraction's naive count: the product of every index's size (two operands or more)."""
    equation, *operands = args if args else (kwargs["equation"], *kwargs.get("operands", ()))
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = list(operands[0])
    if len(operands) < 2 or not isinstance(equation, str) or "." in equation:
        return 0
    sizes = {}
    for spec, t in zip(equation.split("->")[0].split(","), operands, strict=False):
        for index, size in zip(spec.strip(), t.shape, strict=False):
            sizes[index] = size
    return math.prod(sizes.values())


class _Counter(TorchFunctionMode):
    """The hooks' module stack and every counted call."""

    def __init__(self, names: dict[nn.Module, str], config):
        super().__init__()
        self.names, self.config = names, config
        self.stack: list[nn.Module] = []
        self.inside = 0  # counted modules open on the stack: their internals are theirs
        self.counts: dict[tuple[str, str, bool, str], list[int]] = defaultdict(lambda: [0, 0])

    def add(self, module: nn.Module, macs: int, analog: bool, reason: str) -> None:
        entry = self.counts[self.names.get(module, "?"), type(module).__name__, analog, reason]
        entry[0] += macs
        entry[1] += 1

    def pre(self, module, args, kwargs):
        self.stack.append(module)
        if _counted(module):
            self.inside += 1

    def post(self, module, args, kwargs, out):
        self.stack.pop()
        if not _counted(module):
            return
        self.inside -= 1
        if self.inside or out is None:  # inside another counted module (which counts this one)
            return
        analog = isinstance(module, AnalogLayer)
        for macs, part in _module_macs(module, args, kwargs, out):
            if part == "attention":
                self.add(module, macs, False, ATTENTION)
            else:
                self.add(module, macs, analog, "" if analog else self.reason(module))

    def reason(self, module: nn.Module) -> str:
        """Why a counted module is digital."""
        if self.config is None:
            return "not converted: the model has no analog layers (cimsim.convert_to_analog)"
        if type(module) in _ANALOG_TYPES:
            return skip_reason(module, self.config) or "not converted"
        kind = type(module).__name__
        for base in _ANALOG_TYPES:
            if isinstance(module, base):
                why = f"a subclass of nn.{base.__name__}: only exact types convert"
                return f"unsupported type {kind} ({why})"
        return f"unsupported type {kind}"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside or not self.stack:
            return out
        macs = _op_macs(getattr(func, "__name__", ""), args, kwargs, out)
        if not macs:
            return out
        module, name = self.stack[-1], getattr(func, "__name__", "?")
        why = f"activation x activation ({name}): no stored weights"
        if any(isinstance(t, nn.Parameter) for t in [*args, *kwargs.values()]):
            why = f"weights used directly in {type(module).__name__}.forward ({name})"
        elif name == "scaled_dot_product_attention" or isinstance(module, AnalogMultiheadAttention):
            why = ATTENTION
        self.add(module, macs, False, why)
        return out


def _parameters(model: nn.Module, counter: _Counter) -> list[DigitalParameter]:
    """Every parameter no analog layer holds, with its reason."""
    digital_reason, direct = {}, {}
    for name, _, analog, reason in counter.counts:
        if not analog:
            digital_reason[name] = reason
            if reason.startswith("weights used directly"):
                direct[name] = reason
    seen, out = set(), []
    for prefix, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, AnalogLayer):
                continue
            name = f"{prefix}.{pname}" if prefix else pname
            kind = type(module).__name__
            if isinstance(module, nn.Embedding | nn.EmbeddingBag):
                reason = f"{kind}: a table lookup, no MACs"
            elif isinstance(module, AnalogMultiheadAttention):
                reason = "learned extra key/value (add_bias_kv): attended to digitally"
            elif prefix in digital_reason and _counted(module):
                reason = digital_reason[prefix]
            elif isinstance(module, _NORMS):
                reason = counter.reason(module)
            elif prefix in direct:
                reason = direct[prefix]
            elif isinstance(module, nn.RNNBase):  # torch's fused recurrent kernels: not seen
                reason = f"{kind}: {UNCOUNTED}"
            else:
                reason = f"held by {kind} itself (a positional embedding, a class token...)"
            out.append(DigitalParameter(name, p.numel(), reason))
    return out


def coverage(model: nn.Module, *args, **kwargs) -> Coverage:
    """Run ``model(*args, **kwargs)`` once and count its multiply-accumulates: the fraction on
    analog layers, every module's count, and every module left digital with its reason.

    The forward runs in ``eval()`` without gradients, ADCs, DACs and torch's fused attention
    paths off (they bypass module hooks); modes and settings are restored afterwards. Works on
    a digital model too (everything digital, "not converted").
    """
    layers = analog_layers(model)
    names = {m: n for n, m in model.named_modules()}
    counter = _Counter(names, layers[0][1].config if layers else None)
    modes = [(m, m.training) for m in model.modules()]
    converters = [(a, a.active) for a in adcs(model, active_only=False)]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(counter.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(counter.post, with_kwargs=True, always_call=True))
    try:
        model.eval()
        for a, _ in converters:
            a.active = False
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), counter:
            model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
        for a, active in converters:
            a.active = active
    modules = tuple(
        ModuleMACs(name, kind, macs, analog, reason, calls)
        for (name, kind, analog, reason), (macs, calls) in counter.counts.items()
    )
    count = sum(p.numel() for p in model.parameters())
    return Coverage(modules, tuple(_parameters(model, counter)), count)
