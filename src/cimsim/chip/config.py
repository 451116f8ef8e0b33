"""``AnalogConfig``: what the chip does to a network (see docs/model.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any

from cimsim.chip.devices import Device, device_names, get_device, reserve_names
from cimsim.chip.devices.conductance import PairsConfig
from cimsim.chip.devices.faults import FaultsConfig
from cimsim.validation import ConfigError, check_choice, check_int, check_number

DISTRIBUTIONS = ("gaussian", "uniform")
SCALES = ("half_range", "abs_max")
BIAS_MODES = ("separate", "unscaled", "per_tensor", "shared", "digital")
IDENTITY_DRAWS = ("element", "channel")
ADC_PLACEMENTS = ("block", "layer")
DAC_RANGES = ("per_vector", "calibrated", "learned")
OUT_REFS = ("normalized", "calibrated")
# A relative std or mean shift beyond 100 % of a tensor's range leaves the stored weights with no
# signal (the paper's largest test sigma is 0.2): such a value is a typo (5 for 0.05), not a study.
MAX_LEVEL = 1.0
# Settings added after rows and checkpoints first recorded chips: ``as_dict`` leaves each out at
# its default, so the fingerprints of rows measured before it existed stay valid (a new setting
# joins this set, with its default meaning "off").
LATER_SETTINGS: frozenset[str] = frozenset(
    {"ir_drop", "ir_drop_g_ratio", "faults", "pairs", "analog_norm"}
)


# The Hydra group of ``train.py`` each setting comes from (conf/<group>/; tests/test_configs.py
# checks the tree against it): the device and its perturbation, the layer ADCs, the crossbar
# periphery. A device's own settings (``noise.pcm.*``) are noise's.
GROUPS = {
    "noise": (
        "sigma", "mean_shift", "distribution", "scale", "per_channel", "bias", "analog_bn",
        "analog_norm",
        "identity_noise", "identity_draws", "identity_mean_shift", "device", "t_train",
        "faults", "pairs",
    ),
    "quant": ("adc_levels", "adc_placement"),
    "crossbar": (
        "tile_rows", "dac_levels", "dac_range", "out_ref", "tile_adc_levels", "out_bound",
        "out_noise", "w_read_noise", "ir_drop", "ir_drop_g_ratio",
    ),
}  # fmt: skip


def check_relative(key: str, value, *, signed: bool = False) -> None:
    """A relative noise level: ``0 <= sigma <= 1`` or ``-1 <= mean_shift <= 1`` (the range)."""
    check_number(key, value, minimum=None if signed else 0.0)
    if abs(value) > MAX_LEVEL:
        bound = f"-{MAX_LEVEL:g} <= {key} <= {MAX_LEVEL:g}" if signed else f"0 <= {key} <= 1"
        why = "a fraction of the weight range (0.05 = 5 %); beyond 1 no signal is left"
        raise ConfigError(key, value, f"must be {bound}: {why}")


@dataclass(frozen=True, init=False)
class AnalogConfig:
    """A typed, validated description of an analog compute-in-memory chip.

    Attributes:
        sigma: relative std of the programming/drift perturbation, as a fraction of each tensor's
            range (``0.05`` = 5 % of the range), in ``[0, 1]``.
        mean_shift: relative mean of the perturbation (systematic drift), same units, any sign,
            in ``[-1, 1]``.
        distribution: ``gaussian`` (default) or ``uniform`` with the same std.
        scale: the range ``r`` noise is relative to: ``half_range`` = (max - min) / 2 (default,
            the authors'), or ``abs_max`` = max |p| (aihwkit, Joshi et al. 2020).
        per_channel: one range per output channel (row of the crossbar) instead of per tensor
            (Conv/Linear; BatchNorm's affine, one value per channel, stays per tensor).
        bias: how the bias is stored. ``separate`` (default, the authors' bi-scale mapping,
            Wan et al. 2022): the augmented row ``[W, b/f]`` with ``f = r(b) / r(W)`` lives on one
            conductance scale, so the noise scale is the range of the union
            ``R = r(concat(W, b/f))``: W is perturbed relative to ``R`` and b relative to ``R f``
            (their ``match_range``). ``per_tensor``: W relative to ``r(W)``, b relative to
            ``r(b)`` (each tensor on its own scale; equals ``separate`` only when both tensors
            are centred). ``unscaled``: the naive physical mapping ``[W, b]`` (``s = 1``): the
            bias on the weights' scale, so both are relative to ``R = r(concat(W, b))``.
            ``shared``: b relative to ``r(W)`` and W to ``r(W)`` (the bias noise at the weights'
            scale as if the bias fitted in it: optimistic when ``|b|`` exceeds the weights'
            range). ``digital``: the bias is not perturbed.
        analog_bn: BatchNorm runs on the chip as a per-channel affine layer (default true).
        analog_norm: LayerNorm, GroupNorm and BatchNorm1d run their affine ``gamma x_hat + beta``
            on the chip, perturbed as BatchNorm's (``cimsim.chip.norm``); off by default: they
            stay digital (their statistics always are).
        identity_noise: identity shortcuts get multiplicative noise ``x * (1 + sigma*eps)``.
        identity_draws: ``element`` (default): one draw per activation element (C, H, W), as
            the authors' ``NoisyIdentity`` (which also drew per sample); ``channel``: one gain
            per channel, the diagonal of an identity crossbar, shared by all spatial positions.
        identity_mean_shift: identity shortcuts also get the mean shift,
            ``x * (1 + mu + sigma*eps)`` (off by default: the authors' identity ignores mu; on
            models a drifting identity crossbar).
        adc_levels: ``None`` = no ADC; else the number of uniform ADC output levels (>= 2).
        adc_placement: ``block`` = at the points a model marks with ``ADCPoint`` (the authors'
            WRN: first conv, each residual block, before the classifier); ``layer`` = after every
            analog Conv/Linear/BatchNorm.
        device: the device model of Conv/Linear weights, a registered ``cimsim.Device``
            (``cimsim.chip.devices``). ``relative`` (default, the paper's): the relative
            perturbation above. ``pcm``: IBM aihwkit's statistical phase-change memory model
            (programming noise, drift, read noise, drift compensation; docs/model.md), moved in
            time with ``set_time``. Biases, BatchNorm and identity shortcuts keep the relative
            perturbation whatever the device (digital at the default sigma = 0).
        device_config: the device's validated config (``PCMConfig`` for ``pcm``); None = its
            defaults. Given by the device's name too: ``AnalogConfig(device="pcm", pcm={...})``
            (a config or its fields as a dict, as Hydra's ``noise.pcm.<field>`` and a
            checkpoint's hparams hold it), read back as ``chip.pcm``.
        t_train: with a timed device (``pcm``, ``rram``), the time after programming (s) whose
            weight distribution HA-SGD trains against (programming noise, the drift spread then).
        faults: stuck-at faults of Conv/Linear weights (``FaultsConfig`` or its fields): each
            device of a pair stuck at 0 (``stuck_off``) or ``g_max`` (``stuck_on``), drawn per
            chip (per training sample in HA-SGD); for devices with ``conductances``. Off.
        pairs: device pairs per Conv/Linear weight (``PairsConfig``: ``{"f": [1, 3]}``),
            aihwkit's ``NPairConductanceConverter``; one pair (``f = [1]``) by default.

    The crossbar periphery of Conv/Linear layers (``cimsim.chip.periphery``; all off by default):

    Attributes:
        tile_rows: ``None`` = the layer is one tile; else the most input rows per crossbar tile.
            The unrolled weight (``C_in*k*k`` rows of a conv) is split along its inputs; a conv
            tile holds whole input channels (``tile_rows // (k*k)`` of them). Each tile has its
            own weight range (the relative noise is relative to it) and its own output periphery.
        dac_levels: ``None`` = exact inputs; else inputs are clipped to ``[-b_in, b_in]`` and
            rounded to this many uniform levels (>= 2) before the crossbar.
        dac_range: how ``b_in`` is set. ``per_vector`` (default, aihwkit's ``noise_management =
            abs_max``): each input vector's own max ``|x|`` over the tile's inputs (a Linear's
            sample; a conv's sample over the tile's channels, see docs/model.md), so nothing
            is calibrated. ``calibrated`` on data per layer (like the ADC), or ``learned`` in
            training with a straight-through gradient (aihwkit-lightning's input ranges),
            initialized from the max ``|x|`` of the first batch it sees.
        out_ref: the unit of ``out_noise`` and of the tile ADC's range. ``normalized`` (default,
            aihwkit's): ``w_max * s_x``, the tile's largest ``|w|`` (of the clean weights it was
            mapped from) times the input vector's scale (``b_in``; per vector, a conv's per
            output position), so the ADC's range ``out_bound`` is fixed at programming.
            ``calibrated``: ``b_out``, each tile's calibrated max ``|partial sum|`` (moving max
            on data after programming, tracked in training), cimsim's earlier unit.
        tile_adc_levels: ``None`` = no tile ADC; else each tile digitizes its partial sums to this
            many levels over ``[-out_bound, out_bound]`` (normalized) or ``[-b_out, b_out]``
            (calibrated); aihwkit's ``out_res = 1 / (levels - 1)``.
        out_bound: the tile ADC's bound in normalized units (> 0; aihwkit's ``out_bound``, 12 by
            default); outputs beyond it clip, with or without ``tile_adc_levels``.
        out_noise: Gaussian output noise of each tile, ``out_noise * unit * xi`` (``out_ref``),
            added before the tile ADC, fresh at every matrix-vector product (>= 0; aihwkit's
            ``out_noise``, 0.06 by default, in the same units).
        w_read_noise: short-term weight read noise, fresh at every matrix-vector product:
            ``y_i += w_read_noise * sqrt(sum_j |w_ij| x_j^2 / w_max) * w_max * xi_i`` per tile,
            weights in units of the tile's ``w_max = max |w|`` (aihwkit's PCM_READ) (>= 0).
        ir_drop: aihwkit's IR drop along each tile's output wires (a scale of the wire
            resistance, >= 0; 0 = none), before read noise, output noise and the tile ADC
            (``cimsim.chip.ir_drop``; the formula in docs/model.md).
        ir_drop_g_ratio: the wire's conductance per cell over the device's max conductance
            (> 0; aihwkit's ``ir_drop_g_ratio``, ``1 / 0.35 Ohm / 5e-6 S``).
    """

    sigma: float = 0.0
    mean_shift: float = 0.0
    distribution: str = "gaussian"
    scale: str = "half_range"
    per_channel: bool = False
    bias: str = "separate"
    analog_bn: bool = True
    analog_norm: bool = False
    identity_noise: bool = True
    identity_draws: str = "element"
    identity_mean_shift: bool = False
    adc_levels: int | None = None
    adc_placement: str = "block"
    device: str = "relative"
    device_config: Any = None
    t_train: float = 0.0
    faults: FaultsConfig = FaultsConfig()
    pairs: PairsConfig = PairsConfig()
    tile_rows: int | None = None
    dac_levels: int | None = None
    dac_range: str = "per_vector"
    out_ref: str = "normalized"
    tile_adc_levels: int | None = None
    out_bound: float = 12.0
    out_noise: float = 0.0
    w_read_noise: float = 0.0
    ir_drop: float = 0.0
    ir_drop_g_ratio: float = 1.0 / 0.35 / 5e-6

    def __init__(self, **settings: Any):
        """Keyword arguments only: the fields, and ``<device>=`` a registered device's config
        (its config class, or its fields as a dict); the selected device's is kept, the others'
        only validated (a checkpoint records ``pcm`` for every chip)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        configs = {k: settings.pop(k) for k in list(settings) if k not in fields}
        for key, value in configs.items():
            if key not in device_names():
                why = (
                    "is neither a chip setting nor a registered device's settings: a plug-in "
                    "device? load its module with plugins=[module]"
                )
                raise ConfigError(key, value, why)
        for name, f in fields.items():
            default = f.default_factory() if f.default is MISSING else f.default
            object.__setattr__(self, name, settings.get(name, default))
        self._validate(configs)

    def _validate(self, configs: dict[str, Any]) -> None:
        check_relative("sigma", self.sigma)
        check_relative("mean_shift", self.mean_shift, signed=True)
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        check_choice("scale", self.scale, SCALES)
        check_choice("per_channel", self.per_channel, (True, False))
        check_choice("bias", self.bias, BIAS_MODES)
        check_choice("analog_bn", self.analog_bn, (True, False))
        check_choice("analog_norm", self.analog_norm, (True, False))
        check_choice("identity_noise", self.identity_noise, (True, False))
        check_choice("identity_draws", self.identity_draws, IDENTITY_DRAWS)
        check_choice("identity_mean_shift", self.identity_mean_shift, (True, False))
        if self.adc_levels is not None:
            check_int("adc_levels", self.adc_levels, minimum=2)
        check_choice("adc_placement", self.adc_placement, ADC_PLACEMENTS)
        get_device(self.device)  # a registered device, else ConfigError naming the choices
        check_number("t_train", self.t_train, minimum=0.0)
        if self.tile_rows is not None:
            check_int("tile_rows", self.tile_rows, minimum=1)
        for key in ("dac_levels", "tile_adc_levels"):
            if getattr(self, key) is not None:
                check_int(key, getattr(self, key), minimum=2)
        check_choice("dac_range", self.dac_range, DAC_RANGES)
        check_choice("out_ref", self.out_ref, OUT_REFS)
        check_number("out_bound", self.out_bound)
        if self.out_bound <= 0:
            raise ConfigError("out_bound", self.out_bound, "must be > 0 (normalized units)")
        check_number("out_noise", self.out_noise, minimum=0.0)
        check_number("w_read_noise", self.w_read_noise, minimum=0.0)
        check_number("ir_drop", self.ir_drop, minimum=0.0, finite=True)
        check_number("ir_drop_g_ratio", self.ir_drop_g_ratio, finite=True)
        if self.ir_drop_g_ratio <= 0:
            why = "must be > 0 (wire over max device conductance; aihwkit's 1/0.35/5e-6)"
            raise ConfigError("ir_drop_g_ratio", self.ir_drop_g_ratio, why)
        own = None
        for name, value in configs.items():  # each validated; errors name the key: pcm.t0
            config = _device_config(name, value)
            own = config if name == self.device else own
        if own is None:
            own = self._own_config()
        object.__setattr__(self, "device_config", own)
        model = get_device(self.device).device_cls(own)
        for key, cls in (("faults", FaultsConfig), ("pairs", PairsConfig)):  # from dicts too
            object.__setattr__(self, key, _nested(key, cls, getattr(self, key)))
        if self.cells_active and not model.conductances:
            key = "faults.stuck_off" if self.faults.active else "pairs.f"
            why = f"device {self.device!r} has no conductance pairs (Device.conductances)"
            raise ConfigError(key, getattr(self, key.split(".")[0]), why)
        model.faults, model.pairs = self.faults, self.pairs
        model.check_cells(self.faults, self.pairs)
        object.__setattr__(self, "_device_model", model)

    def _own_config(self):
        """``device_config`` as given: None or another device's (``dataclasses.replace`` of a
        chip with another ``device``) is the device's defaults; a dict is its fields."""
        entry, given = get_device(self.device), self.device_config
        stale = not entry.owns(given) and any(get_device(n).owns(given) for n in device_names())
        if given is None or stale:
            return entry.config_cls()
        return _device_config(self.device, given, key="device_config")

    def __getattr__(self, name: str):
        """``chip.<device>``: that device's config (its defaults unless it is selected)."""
        if name.startswith("_") or name not in device_names():
            raise AttributeError(f"'AnalogConfig' object has no attribute {name!r}")
        return self.device_config if name == self.device else get_device(name).config_cls()

    @property
    def device_model(self) -> Device:
        """The selected ``Device``, bound to ``device_config``: its capabilities and methods."""
        return self._device_model

    def as_dict(self) -> dict[str, Any]:
        """The chip as plain values, as checkpoints and row fingerprints record it: the fields in
        order, with each recorded device config under its name (``pcm: {...}``) in place of
        ``device_config``; ``AnalogConfig(**chip.as_dict()) == chip``."""
        plain, out = dataclasses.asdict(self), {}
        for key in self.setting_keys():
            if key in LATER_SETTINGS and plain[key] == _plain_default(key):
                continue
            if key in plain:
                out[key] = plain[key]
                continue
            entry = get_device(key)
            if (
                key == self.device and dataclasses.fields(entry.config_cls)
            ) or entry.device_cls.recorded:
                out[key] = dataclasses.asdict(getattr(self, key))
        return out

    def override(self, overrides: dict[str, Any]) -> AnalogConfig:
        """This chip with ``overrides`` (field -> value); a device's nested settings
        (``{"pcm": {"drift_compensation": "none"}}``) replace only the fields they name."""
        overrides = dict(overrides)
        for key in ("faults", "pairs"):  # {"faults": {"stuck_on": 0.01}} keeps stuck_off
            if isinstance(overrides.get(key), dict):
                overrides[key] = {**dataclasses.asdict(getattr(self, key)), **overrides[key]}
        for name in device_names():
            if isinstance(overrides.get(name), dict):
                try:
                    overrides[name] = dataclasses.replace(getattr(self, name), **overrides[name])
                except ConfigError as err:
                    raise err.with_prefix(name) from None
        return dataclasses.replace(self, **overrides)

    @classmethod
    def setting_keys(cls) -> list[str]:
        """What a chip setting may name: the fields, with the names of the devices that have
        settings in place of ``device_config`` (``chip.<field>``, ``chip.pcm.<field>``)."""
        keys = []
        for f in dataclasses.fields(cls):
            if f.name != "device_config":
                keys.append(f.name)
                continue
            keys += [n for n in device_names() if dataclasses.fields(get_device(n).config_cls)]
        return keys

    @property
    def cells_active(self) -> bool:
        """Whether Conv/Linear weights have stuck-at faults or more than one device pair."""
        return self.faults.active or self.pairs.count > 1

    @property
    def noisy(self) -> bool:
        """Whether the relative perturbation is non-zero (else those layers run digitally)."""
        return self.sigma != 0.0 or self.mean_shift != 0.0

    @property
    def tile_outputs(self) -> bool:
        """Whether each tile's partial sums are processed on their own (ADC, output or read
        noise, IR drop) before the digital periphery adds them."""
        outputs = self.tile_adc_levels is not None or self.out_noise > 0
        return outputs or self.w_read_noise > 0 or self.ir_drop > 0

    @property
    def periphery(self) -> bool:
        """Whether any crossbar periphery field is set (else Conv/Linear are today's layers)."""
        return self.tile_rows is not None or self.dac_levels is not None or self.tile_outputs

    @property
    def needs_calibration(self) -> bool:
        """Whether a programmed chip has ranges to calibrate on data (ADC, DAC, tile ADC)."""
        dac = self.dac_levels is not None and self.dac_range == "calibrated"
        tile = self.out_ref == "calibrated" and (
            self.tile_adc_levels is not None or self.out_noise > 0
        )
        return self.adc_levels is not None or dac or tile

    @property
    def normalized_outputs(self) -> bool:
        """Whether tile outputs get noise or an ADC in aihwkit's normalized units."""
        has_outputs = self.tile_adc_levels is not None or self.out_noise > 0
        return has_outputs and self.out_ref == "normalized"


def _plain_default(name: str) -> Any:
    """The default of field ``name`` as ``dataclasses.asdict`` gives it (a nested config as a
    dict)."""
    f = {f.name: f for f in dataclasses.fields(AnalogConfig)}[name]
    value = f.default_factory() if f.default is MISSING else f.default
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _nested(key: str, cls: type, value: Any):
    """``value`` (a ``cls`` or its fields) as a validated ``cls``; errors on ``key.<field>``."""
    try:
        return value if isinstance(value, cls) else cls(**value)
    except ConfigError as err:
        raise err.with_prefix(key) from None
    except TypeError as err:  # not a dict, or a field it does not have
        raise ConfigError(key, value, f"must be a {cls.__name__} or its fields ({err})") from None


def _device_config(name: str, value: Any, key: str | None = None):
    """Device ``name``'s config from ``value`` (its config class, or its fields as a dict);
    a ``ConfigError`` on ``<key or name>.<field>``."""
    entry, key = get_device(name), key or name
    cls = entry.config_cls
    if not isinstance(value, dict) and not entry.owns(value):
        why = f"must be a {cls.__module__}.{cls.__qualname__} or its fields"
        raise ConfigError(key, value, why)
    try:  # a dict: from a config file or a checkpoint's hparams; a config of a re-run plug-in
        return cls(**value) if isinstance(value, dict) else entry.current(value)
    except ConfigError as err:
        raise err.with_prefix(name) from None
    except TypeError as err:
        raise ConfigError(key, value, str(err)) from None


reserve_names([f.name for f in dataclasses.fields(AnalogConfig)] + dir(AnalogConfig))
