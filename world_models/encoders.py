"""Shared observation encoders: pixel trunks, state MLPs and the DrQ-v2 random-shift augmentation.

Every encoder maps one observation tensor to a flat feature vector ``[B, repr_dim]``:

- :class:`DrQEncoder`: the DrQ-v2 conv trunk (Yarats et al., 2021) used by URLB, ExoRL and TD-JEPA;
  uint8 pixels ``[B, 3k, H, W]`` (k stacked RGB frames) -> ``[B, 32 * h' * w']``.
- :class:`DreamerEncoder`: the DreamerV2 CNN as METRA uses it; pixels -> ``[B, 8 * depth * h' * w']``.
- :class:`StateEncoder`: an MLP on proprioceptive states ``[B, D]`` (the identity with no layers).

:class:`RandomShiftsAug` is a separate module, applied by agents to training batches only.
:class:`ObservationEncoder` wraps an encoder as a :class:`WorldModel` with the ``"encode"``
capability, reading its input key (``pixels`` or ``state``) from an observation TensorDict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel

__all__ = [
    "DrQEncoder",
    "DreamerEncoder",
    "ENCODERS",
    "ObservationEncoder",
    "RandomShiftsAug",
    "StateEncoder",
    "conv_output_size",
    "make_encoder",
    "read_key",
    "set_channels_last",
]


def read_key(obs: TensorDict, key: str, reader: str) -> Tensor:
    """``obs[key]``, or a ``KeyError`` that names ``reader``, the missing key and the keys there."""
    if key not in obs.keys():
        raise KeyError(f"{reader} reads {key!r} but the observation has keys {sorted(map(str, obs.keys()))}; "
                       f"build the env (or sample the buffer) with {key!r}")
    return obs[key]


def conv_output_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Spatial size after one convolution (floor division, as ``nn.Conv2d``)."""
    return (size + 2 * padding - kernel) // stride + 1


def _check_pixel_shape(obs_shape: Sequence[int], name: str) -> tuple[int, int, int]:
    if len(obs_shape) != 3:
        raise ValueError(
            f"{name} expects a pixel shape [C, H, W] (C = 3 * frame_stack), got {list(obs_shape)}; "
            "for state vectors use make_encoder('state', ...)"
        )
    c, h, w = (int(s) for s in obs_shape)
    return c, h, w


class RandomShiftsAug(nn.Module):
    """DrQ-v2 random shift: replicate-pad by ``pad`` pixels, then crop back at a random offset.

    Each image of the batch gets its own integer shift in ``[-pad, pad]`` along both axes. The
    crop is done with ``grid_sample`` at the padded image's pixel centres, so values are copied,
    not interpolated. ``[B, C, H, W]`` (any dtype) -> float ``[B, C, H, W]`` on the same 0..255 scale.
    """

    def __init__(self, pad: int = 4):
        super().__init__()
        if pad < 0:
            raise ValueError(f"RandomShiftsAug pad must be >= 0, got {pad}")
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.pad == 0:
            return x
        n, _, h, w = x.shape
        pad = self.pad
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        # Pixel centres of the padded image in grid_sample's [-1, 1] coordinates (align_corners=False).
        eps_h, eps_w = 1.0 / (h + 2 * pad), 1.0 / (w + 2 * pad)
        ys = torch.linspace(-1.0 + eps_h, 1.0 - eps_h, h + 2 * pad, device=x.device, dtype=x.dtype)[:h]
        xs = torch.linspace(-1.0 + eps_w, 1.0 - eps_w, w + 2 * pad, device=x.device, dtype=x.dtype)[:w]
        base_grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [H, W, 2] as (x, y)
        shift = torch.randint(0, 2 * pad + 1, size=(n, 1, 1, 2), device=x.device).to(x.dtype)
        scale = torch.tensor([2.0 / (w + 2 * pad), 2.0 / (h + 2 * pad)], device=x.device, dtype=x.dtype)
        shift = shift * scale
        grid = base_grid.unsqueeze(0) + shift
        return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class DrQEncoder(nn.Module):
    """The DrQ-v2 conv trunk: Conv(C->32, k3, s2), then 3 x Conv(32->32, k3, s1), ReLU after each.

    Pixels are scaled by ``x / 255 - 0.5``; the output is flattened, ``32 * 35 * 35`` for 84x84 inputs
    and ``32 * 25 * 25`` for 64x64. ``[B, C, H, W]`` uint8 (or float on the 0..255 scale) ->
    ``[B, repr_dim]``.

    ``channels_last`` (off by default; :func:`set_channels_last`) runs the convolutions on NHWC activations:
    18% faster forward + backward on the CPU at batch 256, 64x64 (oneDNN), and the layout cuDNN prefers, but
    rounded differently (about 1e-7), so it is an opt-in.
    """

    channels_last = False

    def __init__(self, obs_shape: Sequence[int], channels: int = 32, num_layers: int = 4):
        super().__init__()
        c, h, w = _check_pixel_shape(obs_shape, "DrQEncoder")
        layers: list[nn.Module] = []
        for i in range(num_layers):
            stride = 2 if i == 0 else 1
            layers += [nn.Conv2d(c if i == 0 else channels, channels, 3, stride=stride), nn.ReLU()]
            h, w = conv_output_size(h, 3, stride), conv_output_size(w, 3, stride)
        if h < 1 or w < 1:
            raise ValueError(f"DrQEncoder: images {list(obs_shape)} are too small for {num_layers} layers")
        self.convnet = nn.Sequential(*layers)
        self.obs_shape = (c, *obs_shape[1:])
        self.output_shape = (channels, h, w)
        self.repr_dim = channels * h * w

    def forward(self, pixels: Tensor) -> Tensor:
        x = pixels.float() / 255.0 - 0.5
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.convnet(x).flatten(1)


class DreamerEncoder(nn.Module):
    """The DreamerV2 CNN as METRA uses it: 4 x Conv(k4, s2, no padding), ELU, then flatten.

    Depths are ``depth * (1, 2, 4, 8)`` (48 -> 96 -> 192 -> 384 by default); pixels are scaled by
    ``x / 255``; a 64x64 input gives ``384 * 2 * 2 = 1536`` features.

    ``channels_last`` (on by default since it was measured; :func:`set_channels_last` turns it off): oneDNN's
    strided 4x4 convolutions are faster on NHWC activations on the CPU (a whole METRA small_pixels update took 12%
    less time on the 2-core VM); the values agree with the NCHW ones to rounding, and the flatten below is in
    ``[C, H, W]`` order either way.
    """

    channels_last = True

    def __init__(self, obs_shape: Sequence[int], depth: int = 48, num_layers: int = 4):
        super().__init__()
        c, h, w = _check_pixel_shape(obs_shape, "DreamerEncoder")
        layers: list[nn.Module] = []
        in_ch = c
        for i in range(num_layers):
            out_ch = depth * 2**i
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2), nn.ELU()]
            in_ch = out_ch
            h, w = conv_output_size(h, 4, 2), conv_output_size(w, 4, 2)
        if h < 1 or w < 1:
            raise ValueError(f"DreamerEncoder: images {list(obs_shape)} too small for {num_layers} layers")
        self.convnet = nn.Sequential(*layers)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.output_shape = (in_ch, h, w)
        self.repr_dim = in_ch * h * w

    def forward(self, pixels: Tensor) -> Tensor:
        x = pixels.float() / 255.0
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.convnet(x).flatten(1)


class StateEncoder(nn.Module):
    """An MLP on state vectors ``[B, D]`` -> ``[B, repr_dim]``.

    ``hidden_dims`` are the hidden widths (ReLU after each); with ``layer_norm_tanh`` the first
    layer is Linear -> LayerNorm -> Tanh instead, the trunk URLB / DrQ-v2 put in front of their
    actor and critic. ``out_dim`` adds a final linear layer. With no layers at all it is the
    identity (URLB's state path), returning the state as float.
    """

    def __init__(
        self,
        obs_dim: int,
        hidden_dims: Sequence[int] = (256, 256),
        out_dim: int | None = None,
        layer_norm_tanh: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        prev = int(obs_dim)
        for i, width in enumerate(hidden_dims):
            layers.append(nn.Linear(prev, width))
            layers += [nn.LayerNorm(width), nn.Tanh()] if (i == 0 and layer_norm_tanh) else [nn.ReLU()]
            prev = width
        if out_dim is not None:
            layers.append(nn.Linear(prev, out_dim))
            prev = out_dim
        self.net = nn.Sequential(*layers) if layers else nn.Identity()
        self.obs_shape = (int(obs_dim),)
        self.repr_dim = prev

    def forward(self, state: Tensor) -> Tensor:
        return self.net(state.float().flatten(1))


ENCODERS: dict[str, type[nn.Module]] = {
    "drq": DrQEncoder,
    "dreamer": DreamerEncoder,
    "state": StateEncoder,
}


def set_channels_last(module: nn.Module, enabled: bool) -> int:
    """Run every pixel encoder (:class:`DrQEncoder`, :class:`DreamerEncoder`) inside ``module`` on NHWC
    (``channels_last``) activations, or on NCHW ones with ``enabled=False``; returns how many were set.

    Only the activations change layout: parameters keep theirs, so checkpoints and model files are unchanged. The
    values agree to rounding (tests/test_learner_speed.py); the speed depends on the backend (docs/bench_learner.md).
    """
    count = 0
    for sub in module.modules():
        if isinstance(sub, (DrQEncoder, DreamerEncoder)):
            sub.channels_last = bool(enabled)
            count += 1
    return count


def make_encoder(kind: str, obs_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Build an encoder by name.

    ``kind``: ``"drq"`` / ``"dreamer"`` (``obs_shape`` = ``[C, H, W]``, C = 3 * frame_stack),
    ``"state"`` (``obs_shape`` = ``[D]``; kwargs ``hidden_dims``, ``out_dim``, ``layer_norm_tanh``) or
    ``"identity"`` (a state passed through as float). The result has ``repr_dim``.
    """
    obs_shape = tuple(int(s) for s in obs_shape)
    if kind == "identity":
        if kwargs:
            raise ValueError(f"the identity encoder takes no options, got {sorted(kwargs)}")
        kind, kwargs = "state", {"hidden_dims": ()}
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder {kind!r}; valid encoders: {', '.join([*ENCODERS, 'identity'])}")
    if kind == "state":
        if len(obs_shape) != 1:
            raise ValueError(f"a state encoder expects obs_shape [D], got {list(obs_shape)}")
        return StateEncoder(obs_shape[0], **kwargs)
    return ENCODERS[kind](obs_shape, **kwargs)


class ObservationEncoder(WorldModel):
    """The base of world models that encode one observation key: ``encode(obs)`` reads ``obs[obs_key]``
    and applies ``encoder``. It has no loss of its own; a concrete model adds it (``RNDModel``).

    ``obs_key`` is ``"pixels"`` (stacked frames ``[B, 3k, H, W]`` uint8) or ``"state"`` (``[B, D]``);
    any leading batch dims are flattened through the encoder and restored. ``aug`` (e.g.
    :class:`RandomShiftsAug`) is applied only when ``encode(..., augment=True)`` asks for it,
    which agents do on training batches, never in a policy.
    """

    capabilities = frozenset({"encode"})

    def __init__(self, encoder: nn.Module, obs_key: str = "pixels", aug: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.obs_key = obs_key
        self.aug = aug
        self.repr_dim: int = encoder.repr_dim

    def encode(self, obs: TensorDict, *, augment: bool = False) -> Tensor:
        x = read_key(obs, self.obs_key, type(self).__name__)
        event_dims = 3 if self.obs_key == "pixels" else 1
        batch_shape = x.shape[: x.dim() - event_dims]
        x = x.reshape(-1, *x.shape[x.dim() - event_dims :])
        if augment and self.aug is not None:
            x = self.aug(x)
        return self.encoder(x).reshape(*batch_shape, -1)

    def forward(self, obs: TensorDict) -> Tensor:
        return self.encode(obs)
