"""``AnalogMultiheadAttention``: ``nn.MultiheadAttention`` with its projections on the chip.

The projections are weights times activations, so they go on crossbars: the input projection
and ``out_proj`` become ``AnalogLinear`` layers, each with its own range, draws and periphery.
The attention itself (scores ``q k^T`` and the weighted sum of ``v``) multiplies activations by
activations, which a weight-stationary crossbar cannot hold: it stays digital (``cimsim.coverage``
counts it as such).

Layout: what the module stores is what the chip stores. A packed ``in_proj_weight`` (3E x E, the
default when key and value have the embedding's size) is one crossbar ``in_proj`` with 3E output
rows: in self-attention one read of each input vector gives q, k and v at once, the input DAC and
the tiles see that vector once, and with a per-tensor range q, k and v share the array's
conductance scale, as they would on one array (``per_channel=True`` gives each row its own). When
query and key differ (cross-attention) the crossbar is read with each input and only the rows
needed are kept (the others are computed and discarded: cost, not accuracy). Separate
``q/k/v_proj_weight`` (``kdim``/``vdim`` differ) are three crossbars ``q_proj``, ``k_proj`` and
``v_proj`` of their own widths, each with its third of ``in_proj_bias``.

The wrapper is not itself an ``AnalogLayer``: ``analog_layers``, ``program_chip`` and ``set_noise``
find its children. ``state_dict`` keeps ``nn.MultiheadAttention``'s keys (``in_proj_weight``...),
so digital and analog checkpoints load into each other. The module's own attributes
``in_proj_weight``/``in_proj_bias`` (and ``q/k/v_proj_weight``) read ``None`` afterwards, as
``nn.MultiheadAttention``'s absent ones do: torch's fused fast paths (this module's and
``nn.TransformerEncoderLayer``'s, which read those weights directly and would bypass the chip)
then decline, and the forward below always runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cimsim.chip.config import AnalogConfig
from cimsim.chip.conv_linear import AnalogLinear

# nn.MultiheadAttention's parameter -> the analog child's, per layout.
_PACKED = {"in_proj_weight": "in_proj.weight", "in_proj_bias": "in_proj.bias"}
_SEPARATE = {f"{p}_proj_weight": f"{p}_proj.weight" for p in "qkv"}
_SPLIT_BIAS = tuple(f"{p}_proj.bias" for p in "qkv")
_MOVED = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _analog_linear(weight: nn.Parameter, bias: nn.Parameter | None, config: AnalogConfig):
    """An ``AnalogLinear`` holding these very parameters (no copy)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    layer.__class__ = AnalogLinear
    layer._init_analog(config)
    return layer


def _digital_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: the children's weights under ``nn.MultiheadAttention``'s keys."""
    moved = _PACKED if module._qkv_same_embed_dim else _SEPARATE
    for digital, analog in moved.items():
        if prefix + analog in state_dict:
            state_dict[prefix + digital] = state_dict.pop(prefix + analog)
    parts = [prefix + k for k in _SPLIT_BIAS]
    if not module._qkv_same_embed_dim and all(k in state_dict for k in parts):
        state_dict[prefix + "in_proj_bias"] = torch.cat([state_dict.pop(k).detach() for k in parts])


class AnalogMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose input and output projections are ``AnalogLinear`` layers.

    Same forward signature and semantics as ``nn.MultiheadAttention`` (``batch_first`` either
    way, unbatched inputs, ``key_padding_mask``, ``attn_mask``, ``is_causal``, ``need_weights``,
    ``average_attn_weights``, dropout on the attention weights in training, ``add_bias_kv``,
    ``add_zero_attn``); with no chip programmed and no noise it computes what the digital module
    computes, up to float rounding (torch's fused path and this one order sums differently).
    ``bias_k``/``bias_v`` (learned extra keys and values) stay digital parameters.
    """

    def _init_analog(self, config: AnalogConfig) -> None:
        training = self.training
        if self._qkv_same_embed_dim:
            self.in_proj = _analog_linear(self.in_proj_weight, self.in_proj_bias, config)
        else:
            bias = self.in_proj_bias
            biases = [None] * 3
            if bias is not None:
                chunks = bias.detach().chunk(3)
                biases = [nn.Parameter(b.clone(), requires_grad=bias.requires_grad) for b in chunks]
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            for p, w, b in zip("qkv", weights, biases, strict=True):
                setattr(self, f"{p}_proj", _analog_linear(w, b, config))
        for name in _MOVED:  # now the children's: None here, as nn.MultiheadAttention's absent
            self._parameters[name] = None
        self.out_proj.__class__ = AnalogLinear  # NonDynamicallyQuantizableLinear: a plain Linear
        self.out_proj._init_analog(config)
        self.train(training)
        self.register_state_dict_post_hook(_digital_keys)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A digital (or analog) checkpoint's keys -> the children's (load_state_dict passes a copy).
        moved = _PACKED if self._qkv_same_embed_dim else _SEPARATE
        for digital, analog in moved.items():
            if prefix + digital in state_dict:
                state_dict[prefix + analog] = state_dict.pop(prefix + digital)
        if not self._qkv_same_embed_dim and prefix + "in_proj_bias" in state_dict:
            parts = state_dict.pop(prefix + "in_proj_bias").chunk(3)
            for key, part in zip(_SPLIT_BIAS, parts, strict=True):
                state_dict[prefix + key] = part
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _project(self, query, key, value, same_qk: bool, same_kv: bool):
        """``q, k, v`` through the analog input projection(s)."""
        if not self._qkv_same_embed_dim:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        e = self.embed_dim
        if same_qk and same_kv:  # self-attention: one read of the 3E-row crossbar
            proj = self.in_proj(query).unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2)
            proj = proj.squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        q = self.in_proj(query)[..., :e]
        if same_kv:
            kv = self.in_proj(key)
            return q, kv[..., e : 2 * e], kv[..., 2 * e :]
        return q, self.in_proj(key)[..., e : 2 * e], self.in_proj(value)[..., 2 * e :]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("AnalogMultiheadAttention does not take nested tensors")
        same_qk, same_kv = query is key, key is value
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attend(
            query,
            key,
            value,
            (same_qk, same_kv),
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _attend(self, query, key, value, same, kpm, need_weights, attn_mask, average, is_causal):
        """``F.multi_head_attention_forward`` (sequence first), the projections on the chip."""
        heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, kpm, attn_mask, heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            kpm = None if kpm is None else kpm.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        kpm = F._canonical_mask(
            mask=kpm,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and kpm is None and not need_weights:
            attn_mask = None  # the hint alone, to scaled_dot_product_attention
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )
            if kpm is not None:
                is_causal = False  # the merged mask is no longer causal
        if embed_dim != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}"
            )
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(
                f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                f"{value.shape[:2]}"
            )
        q, k, v = self._project(query, key, value, *same)
        head_dim = embed_dim // heads
        src_len = key.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                        f"{(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.shape != (bsz * heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(bsz * heads, tgt_len, src_len)}."
                )
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        src_len = k.size(1)
        if kpm is not None:
            F._check_key_padding_mask(kpm, src_len, bsz)
            kpm = kpm.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            kpm = kpm.reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if is_causal and attn_mask is None:
                raise AssertionError("FIXME: is_causal not implemented for need_weights")
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            q = q.view(bsz, heads, tgt_len, head_dim)
            k = k.view(bsz, heads, src_len, head_dim)
            v = v.view(bsz, heads, src_len, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            weights = None
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights
