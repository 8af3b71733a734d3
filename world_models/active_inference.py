"""A Gaussian state-space model for deep active inference (``shared/algorithms/active_inference.md`` §7-8).

- **Encoder** q(s|o): the DreamerV2 CNN (:func:`make_encoder` ``"dreamer"``) on a frame stack for
  pixels, an MLP for states, then a linear head to a diagonal Gaussian belief ``N(mean, std^2)`` of
  ``latent_dim`` dims. The belief is amortised: ``q(s_t|o_t)`` reads the current (frame-stacked)
  observation only, so :meth:`observe` does not depend on the previous belief (the frame stack
  carries velocity, as the spec's CPU configuration does).
- **Transition** p(s'|s,a): an ensemble of ``ensemble_size`` MLPs, each with a Gaussian head. A
  prior step (:meth:`predict`) samples ``s ~ N(mean, std)`` from the current belief, picks one member
  uniformly per row and returns that member's Gaussian ``p_e(s'|s,a)``; its ``epistemic`` entry is the
  members' disagreement ``1/2 sum_d log(1 + Var_e[mu_e] / E_e[sigma_e^2])`` (the information a
  Gaussian ensemble's parameters carry about s', a stand-in for the spec's parameter information gain).
- **Decoder** p(o|s): to the newest 64x64 frame (pixels scaled to ``x / 255 - 0.5``), by the spec's
  transposed convolutions from a 1x1 map (``decoder="conv"``, :class:`PixelDecoder`) or a spatial broadcast
  decoder (``decoder="broadcast"``, :class:`BroadcastDecoder`, the agent's default), or an MLP to the state;
  a Gaussian with the fixed std ``obs_std``, so the ambiguity ``E[H p(o|s)]`` is the constant :meth:`ambiguity`.
- **Loss** (:meth:`loss`): the variational free energy of ``[B, L]`` slices (``L`` transitions and
  ``L + 1`` observations), per observation and summed over dims:
  ``-log p(o_t|s_t) + kl_transition_weight * KL(q(s_{t+1}|o_{t+1}) || p(s_{t+1}|s_t, a_t)) +
  kl_prior_weight * KL(q(s_t|o_t) || N(0, I))`` with ``s_t ~ q`` (reparameterised), the transition
  KL averaged over ensemble members and counted on recorded actions only. With ``free_nats > 0`` the
  minimised objective clamps the batch-mean transition KL from below at ``free_nats`` (Dreamer's free
  nats, against posterior collapse); the reported ``free_energy`` is always the unclamped bound.
- **Latent overshooting** (``overshooting = D > 1``; the spec's optional "3-step latent overshooting", PlaNet's
  form, Hafner et al. 2019 eq. 7): each member's prior is also rolled ``d = 2..D`` steps from ``s_t`` with the
  recorded actions (sampled, reparameterised) and compared with the posterior there,
  ``KL(sg q(s_{t+d}|o_{t+d}) || p^d(s_{t+d}|s_t, a_{t:t+d}))`` (the posterior held fixed, as PlaNet's default);
  the minimised transition term is the mean over ``d = 1..D`` of the per-distance KLs, each clamped at the free
  nats, weighted by ``kl_transition_weight`` (``D = 1``: the one-step term above). Positions in d steps depend on
  the velocity, so the belief is asked to carry it more sharply than the one-step KL asks.
- **Inverse-dynamics term** (``inverse_weight > 0``; not in the spec, not part of the free energy, off by
  default): an MLP reads a_t from the belief means ``(mu_t, mu_{t+1})`` and ``inverse_weight * ||a_hat - a_t||^2``
  (summed over action dims, averaged over recorded actions) is added to the minimised objective, its gradient
  reaching the encoder. On point_mass the free energy alone left the belief without velocity, and with it check 2
  without the action (docs/bench_active_inference.md, "Check 2: the belief carries no velocity"); this term asks
  the encoder for the motion directly, as a test of that diagnosis.
- **Frame differences** (``frame_difference > 0``; not in the spec, off by default): the encoder reads the stacked
  frames and, scaled, each consecutive pair's difference (:class:`FrameDifferences`). A sixth of a pixel's motion
  is a few grey levels on the mass's edge; the inverse term above learnt nothing from the frames alone, and with
  these channels it did.

The belief state is a TensorDict ``[B]`` with ``mean``, ``std`` ``[B, D]`` and ``epistemic`` ``[B]``
(0 for a posterior).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel
from latentrl.world_models.encoders import make_encoder, read_key
from latentrl.world_models.layers import LOG_2PI, gather_batch, gaussian_fuse, gaussian_kl, gaussian_log_prob, mlp

__all__ = ["ActiveInferenceModel", "BroadcastDecoder", "GaussianHead", "LOSS_METRICS", "PIXEL_DECODERS",
           "PixelDecoder", "ensemble_epistemic"]

# the scalar terms of ``ActiveInferenceModel.loss_terms`` that the loss and the agent's update report
LOSS_METRICS = ("free_energy", "recon", "kl_transition", "kl_prior", "kl_overshooting", "inverse", "posterior_std",
                "epistemic")


class GaussianHead(nn.Module):
    """``features -> (mean, std)`` with ``std = min_std + softplus(raw)``."""

    def __init__(self, in_dim: int, out_dim: int, min_std: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, 2 * out_dim)
        self.min_std = float(min_std)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.linear(h).chunk(2, dim=-1)
        return mean, self.min_std + F.softplus(raw)


class PixelDecoder(nn.Module):
    """DreamerV2-style transposed-conv decoder: ``[N, D] -> [N, 3, 64, 64]`` (other sizes are resized).

    ``canvas`` (off by default: the spec's decoder has none): ``"add"`` adds a learned image to the output, as
    :class:`BroadcastDecoder` always does; ``"mask"`` also gates the network's image with a per-pixel ``a`` in
    (0, 1) it predicts from the same features, ``a * net + canvas``. An added canvas only removes the mean error of
    the static scene; where the network's output there varies with the latent (the conv decoder's on reacher), the
    gate lets it switch itself off and leave those pixels to the canvas (docs/bench_active_inference.md, "A canvas
    for the conv decoder"). The gate starts near 1 (zero weights, bias 4: ``a = 0.982``), so a decoder that gains
    it decodes almost as before, and its canvas learns from the first update as an added one does.
    """

    CANVAS_CHOICES = ("none", "add", "mask")
    MASK_BIAS = 4.0  # sigmoid(4) = 0.982

    def __init__(self, latent_dim: int, depth: int, image_size: tuple[int, int], canvas: str = "none",
                 channels: int = 3):
        super().__init__()
        if canvas not in self.CANVAS_CHOICES:
            raise ValueError(f"canvas must be one of {self.CANVAS_CHOICES}, got {canvas!r}")
        self.depth, self.image_size = int(depth), tuple(int(s) for s in image_size)
        self.linear = nn.Linear(latent_dim, 32 * depth)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32 * depth, 4 * depth, 5, stride=2), nn.ELU(),   # 1 -> 5
            nn.ConvTranspose2d(4 * depth, 2 * depth, 5, stride=2), nn.ELU(),    # 5 -> 13
            nn.ConvTranspose2d(2 * depth, depth, 6, stride=2), nn.ELU(),        # 13 -> 30
            nn.ConvTranspose2d(depth, channels, 6, stride=2),                   # 30 -> 64
        )
        self.canvas = nn.Parameter(torch.zeros(1, channels, *self.image_size)) if canvas != "none" else None
        self.mask = nn.ConvTranspose2d(depth, 1, 6, stride=2) if canvas == "mask" else None
        if self.mask is not None:
            nn.init.zeros_(self.mask.weight)
            nn.init.constant_(self.mask.bias, self.MASK_BIAS)

    def _resize(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return x

    def forward(self, s: Tensor) -> Tensor:
        h = self.net[:-1](self.linear(s).reshape(-1, 32 * self.depth, 1, 1))
        x = self._resize(self.net[-1](h))
        if self.canvas is None:
            return x
        if self.mask is None:
            return x + self.canvas
        return torch.sigmoid(self._resize(self.mask(h))) * x + self.canvas

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a model file saved without a canvas (or mask) loads with a zero canvas (and the initial mask)
        if self.canvas is not None:
            state_dict.setdefault(prefix + "canvas", torch.zeros_like(self.canvas))
        if self.mask is not None:
            state_dict.setdefault(prefix + "mask.weight", torch.zeros_like(self.mask.weight))
            state_dict.setdefault(prefix + "mask.bias", torch.full_like(self.mask.bias, self.MASK_BIAS))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BroadcastDecoder(nn.Module):
    """Spatial broadcast decoder (Watters et al. 2019, arXiv:1901.07017): ``[N, D] -> [N, 3, H, W]``.

    The latent is tiled over a ``grid x grid`` map with two coordinate channels (x, y in [-1, 1]), two 3x3
    convolutions read it, and two stride-2 transposed convolutions upsample to ``4 grid`` pixels (other sizes
    are resized), and a learned ``canvas`` image is added to the output. A deconvolution from a 1x1 map must
    learn where to draw from the latent alone; with the coordinate channels the decoder can compare the latent
    with the position, so a latent that codes an object's position smoothly is the easy solution. On
    point_mass the belief KL to a goal then grows with the distance to the goal
    (docs/bench_active_inference.md, "Check 3 met on point_mass").
    Not the spec's symmetric decoder: ``ActiveInferenceConfig.decoder = "broadcast"`` selects it.
    """

    def __init__(self, latent_dim: int, depth: int, image_size: tuple[int, int], grid: int = 16, channels: int = 3):
        super().__init__()
        self.image_size, self.grid = tuple(int(s) for s in image_size), int(grid)
        axis = torch.linspace(-1.0, 1.0, self.grid)
        ys, xs = torch.meshgrid(axis, axis, indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)  # [1, 2, g, g]
        self.net = nn.Sequential(
            nn.Conv2d(latent_dim + 2, 4 * depth, 3, padding=1), nn.ELU(),
            nn.Conv2d(4 * depth, 4 * depth, 3, padding=1), nn.ELU(),
            nn.ConvTranspose2d(4 * depth, 2 * depth, 4, stride=2, padding=1), nn.ELU(),   # g -> 2g
            nn.ConvTranspose2d(2 * depth, channels, 4, stride=2, padding=1),              # 2g -> 4g
        )
        # A learned image added to every output: the static scene (arena, grid lines) is drawn once here, and the
        # latent and the network draw what moves. Without it the broadcast decoder redrew the scene from the
        # coordinates, and 73% of its held-out reconstruction error was on pixels that never change.
        self.canvas = nn.Parameter(torch.zeros(1, channels, *self.image_size))

    def forward(self, s: Tensor) -> Tensor:
        n, g = s.shape[0], self.grid
        tiled = s[:, :, None, None].expand(n, s.shape[1], g, g)
        x = self.net(torch.cat([tiled, self.coords.expand(n, 2, g, g)], dim=1))
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return x + self.canvas

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # model files saved before the canvas existed decode exactly as before with a zero canvas
        state_dict.setdefault(prefix + "canvas", torch.zeros_like(self.canvas))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ``decoder=`` name -> pixel decoder class (``ActiveInferenceModel``, ``ActiveInferenceConfig.decoder``)
PIXEL_DECODERS: dict[str, type[nn.Module]] = {"conv": PixelDecoder, "broadcast": BroadcastDecoder}


def decoder_choice_error(owner: str, decoder: object) -> str | None:
    """The message refusing an unknown ``decoder`` name, or None when it is one of :data:`PIXEL_DECODERS`."""
    if decoder in PIXEL_DECODERS:
        return None
    return f"{owner} must be {' or '.join(map(repr, PIXEL_DECODERS))}, got {decoder!r}"


def ensemble_epistemic(means: Tensor, stds: Tensor) -> Tensor:
    """Ensemble disagreement ``[...]`` of members' Gaussians ``means``, ``stds`` ``[E, ..., D]``:
    ``1/2 sum_d log(1 + Var_e[mu_e,d] / E_e[sigma_e,d^2])`` (0 when the members agree)."""
    spread = means.var(dim=0, unbiased=False)
    noise = stds.square().mean(dim=0)
    return 0.5 * torch.log1p(spread / noise).sum(-1)


class FrameDifferences(nn.Module):
    """Stacked frames ``[N, k*c, H, W]`` (0-255) -> the frames followed by ``scale`` times each consecutive pair's
    difference ``[N, (2k-1)*c, H, W]``, in the same 0-255 units (the encoder divides by 255 after it). A motion of
    a fraction of a pixel changes edge pixels by a few levels; scaled, it reaches the first convolution at the
    size of the frames themselves (as in ``docs/bench_active_inference/inverse_ceiling.py``)."""

    def __init__(self, frame_channels: int, scale: float):
        super().__init__()
        self.frame_channels, self.scale = int(frame_channels), float(scale)

    def forward(self, pixels: Tensor) -> Tensor:
        x, c = pixels.float(), self.frame_channels
        return torch.cat([x, self.scale * (x[:, c:] - x[:, :-c])], dim=1)


def still_stack(x: Tensor, frame_channels: int, frame_stack: int) -> Tensor:
    """Stacked pixels ``[N, k*c, H, W]`` -> the newest frame tiled ``frame_stack`` times: the same place at rest
    (how a single goal frame is stacked)."""
    return x[:, -frame_channels:].repeat(1, frame_stack, 1, 1)


class MotionStatistics(nn.Module):
    """What motion does to the belief, tracked over training observations: running means ``mean`` and ``var``
    ``[D]`` of ``mu(o) - mu(o's newest frame tiled)``, the belief of a stack against that of the same place at rest.

    A goal image is one frame, tiled over the stack: a body at rest. Once the belief reads the velocity,
    q(s|o_goal) asks for rest as well as for the place. :meth:`widen` turns it into a preference for the place
    whatever the motion, ``N(mu_g + mean, sqrt(sigma_g^2 + var))``, the moment-matched belief of the goal frame
    reached with the data's motions (``ActiveInferenceConfig.goal_motion = "any"``; not the spec's). Exponential
    moving averages over batches (``momentum``; the first batch sets them), as batch norm keeps its statistics,
    since the encoder moves during training. Files saved without them load with none seen."""

    def __init__(self, latent_dim: int, momentum: float = 0.01):
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("var", torch.zeros(latent_dim))
        self.register_buffer("batches", torch.zeros(()))

    @torch.no_grad()
    def update(self, change: Tensor) -> None:
        """Fold in one batch of belief changes ``[N, D]`` (without a host read: no sync per training step)."""
        weight = torch.where(self.batches > 0, self.momentum, 1.0)
        self.mean.lerp_(change.mean(0), weight)
        self.var.lerp_(change.var(0, unbiased=False), weight)
        self.batches += 1

    def widen(self, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """A still goal's belief ``(mean, std)`` ``[N, D]`` -> the preference for its place at any motion."""
        if not self.batches > 0:
            raise RuntimeError("goal_motion='any' needs the model's motion statistics, and this model has seen no "
                               "training batch since they were added: train it (each update tracks them)")
        return mean + self.mean, (std.square() + self.var).sqrt()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a model file saved without them loads with none seen (widen refuses until training has tracked some)
        for name in ("mean", "var", "batches"):
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ActiveInferenceModel(WorldModel):
    """Encoder q(s|o), ensemble transition p(s'|s,a), decoder p(o|s); trained by variational free energy.

    ``obs_key`` is ``"pixels"`` (``obs_shape`` one frame ``[3, H, W]``; the encoder reads
    ``frame_stack`` frames stacked along channels, the decoder predicts the newest, or the newest
    ``decode_frames`` of them) or ``"state"`` (``[P]``).
    """

    capabilities = frozenset({"encode", "sequence", "decode"})

    def __init__(self, obs_key: str, obs_shape: tuple[int, ...], action_dim: int, *, latent_dim: int = 16,
                 frame_stack: int = 2, encoder_depth: int = 16, hidden_dim: int = 256, transition_hidden: int = 128,
                 transition_layers: int = 2, ensemble_size: int = 5, decoder_depth: int = 16,
                 decoder: str = "conv", decoder_canvas: str = "none", obs_std: float = 1.0, min_std: float = 0.01,
                 prior_min_std: float | None = None, kl_transition_weight: float = 1.0, kl_prior_weight: float = 0.1,
                 free_nats: float = 0.0, decode_frames: int = 1, overshooting: int = 1,
                 inverse_weight: float = 0.0, frame_difference: float = 0.0, motion_statistics: bool = False):
        super().__init__()
        if obs_key not in ("pixels", "state"):
            raise ValueError(f"ActiveInferenceModel reads 'pixels' or 'state', got {obs_key!r}")
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if (message := decoder_choice_error("decoder", decoder)) is not None:
            raise ValueError(message)
        self.obs_key, self.obs_shape = obs_key, tuple(int(s) for s in obs_shape)
        self.action_dim, self.latent_dim = int(action_dim), int(latent_dim)
        self.frame_stack = int(frame_stack) if obs_key == "pixels" else 1
        # frames the decoder draws, newest last (pixels): 1 is the spec's; with 2 or more the belief must place the
        # object in the older frames too, so the velocity is paid for in the reconstruction and not only through
        # the transition's KL (docs/bench_active_inference.md, "Check 2 against what the data lets ...")
        self.decode_frames = int(decode_frames) if obs_key == "pixels" else 1
        if not 1 <= self.decode_frames <= self.frame_stack:
            raise ValueError(f"decode_frames must be in [1, frame_stack = {self.frame_stack}], got {decode_frames}")
        self.obs_std, self.min_std = float(obs_std), float(min_std)
        # the transition prior's own floor: KL(q || p) grows as sigma_q^2 / sigma_p^2, so a floor on p alone bounds
        # the KL a broadened posterior can reach without limiting how sharply q locates the state
        self.prior_min_std = self.min_std if prior_min_std is None else float(prior_min_std)
        if self.min_std <= 0 or self.prior_min_std <= 0:
            raise ValueError(f"min_std and prior_min_std must be > 0, got {self.min_std} and {self.prior_min_std}")
        self.kl_transition_weight, self.kl_prior_weight = float(kl_transition_weight), float(kl_prior_weight)
        if free_nats < 0:
            raise ValueError(f"free_nats must be >= 0, got {free_nats}")
        self.free_nats = float(free_nats)
        if overshooting < 1:
            raise ValueError(f"overshooting must be >= 1 (1: one-step transitions only), got {overshooting}")
        self.overshooting = int(overshooting)
        if not inverse_weight >= 0:
            raise ValueError(f"inverse_weight must be >= 0 (0: no inverse-dynamics term), got {inverse_weight}")
        self.inverse_weight = float(inverse_weight)
        if not frame_difference >= 0:
            raise ValueError(f"frame_difference must be >= 0 (0: the stacked frames alone), got {frame_difference}")
        if frame_difference > 0 and self.frame_stack < 2:
            raise ValueError("frame_difference needs pixels stacked 2 or more frames deep")
        self.frame_difference = float(frame_difference)
        if obs_key == "pixels":
            c, h, w = self.obs_shape
            stacked = c * self.frame_stack + (c * (self.frame_stack - 1) if self.frame_difference > 0 else 0)
            trunk = make_encoder("dreamer", (stacked, h, w), depth=encoder_depth)
            # the difference channels are put in front only when asked, so models saved without them load unchanged
            differences = [FrameDifferences(c, self.frame_difference)] if self.frame_difference > 0 else []
            self.encoder = nn.Sequential(*differences, trunk, nn.Linear(trunk.repr_dim, hidden_dim), nn.ELU())
            # the broadcast decoder always has a canvas; the conv decoder when asked (``decoder_canvas``)
            canvas = {"canvas": decoder_canvas} if decoder == "conv" else {}
            self.decoder = PIXEL_DECODERS[decoder](latent_dim, decoder_depth, (h, w), channels=c * self.decode_frames,
                                                   **canvas)
        else:
            self.encoder = nn.Sequential(make_encoder("state", self.obs_shape, hidden_dims=(hidden_dim, hidden_dim)))
            self.decoder = mlp(latent_dim, [hidden_dim, hidden_dim], self.obs_shape[0])
        self.posterior_head = GaussianHead(hidden_dim, latent_dim, min_std)
        hidden = [transition_hidden] * (transition_layers - 1)
        self.transitions = nn.ModuleList(
            nn.Sequential(mlp(latent_dim + action_dim, hidden, transition_hidden), nn.ELU(),
                          GaussianHead(transition_hidden, latent_dim, self.prior_min_std))
            for _ in range(ensemble_size))
        # a_t from (mu_t, mu_{t+1}); built only when used, so models saved without it load unchanged
        self.inverse_head = (mlp(2 * latent_dim, [transition_hidden, transition_hidden], action_dim)
                             if self.inverse_weight > 0 else None)
        # what motion does to the belief (goal_motion="any"); built only when asked, so other models are unchanged
        if motion_statistics and self.frame_stack < 2:
            raise ValueError("motion_statistics needs pixels stacked 2 or more frames deep")
        self.motion = MotionStatistics(latent_dim) if motion_statistics else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a file's motion statistics (goal_motion="any") load into a model that does not use them: left out
        if self.motion is None:
            for key in [k for k in state_dict if k.startswith(prefix + "motion.")]:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def obs_dim(self) -> int:
        """Dimensions the decoder predicts (one frame, or the state)."""
        return math.prod(self.obs_shape)

    # ------------------------------------------------------------------------------------ pieces
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(s|o): ``x`` ``[N, ...]`` (stacked pixels uint8, or states) -> ``(mean, std)`` ``[N, D]``."""
        return self.posterior_head(self.encoder(x))

    @torch.no_grad()
    def track_motion(self, x: Tensor) -> None:
        """Fold the belief changes ``mu(x) - mu(still_stack(x))`` of stacked observations ``x`` ``[N, k*c, H, W]``
        into :class:`MotionStatistics` (``motion_statistics=True``)."""
        still = still_stack(x, self.obs_shape[0], self.frame_stack)
        self.motion.update(self.posterior(x)[0] - self.posterior(still)[0])

    def transition_members(self, s: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """Every member's ``p_e(s'|s,a)``: ``(means, stds)`` ``[E, N, D]``."""
        inp = torch.cat([s, action.to(s.dtype)], dim=-1)
        outs = [member(inp) for member in self.transitions]
        return torch.stack([m for m, _ in outs]), torch.stack([s_ for _, s_ in outs])

    def decode_mean(self, s: Tensor) -> Tensor:
        """The mean of p(o|s) ``[N, *obs_shape]`` in the model's scale (pixels: ``x / 255 - 0.5``): the newest frame
        (of the ``decode_frames`` the decoder draws)."""
        return self.decoder(s)[:, -self.obs_shape[0]:].reshape(-1, *self.obs_shape)

    def target(self, x: Tensor) -> Tensor:
        """An encoder input as :meth:`decode_mean` draws it: the newest frame scaled, or the state. (The free energy
        reconstructs the newest ``decode_frames``: :meth:`reconstruction_target`.)"""
        return self._newest(x, 1)

    def reconstruction_target(self, x: Tensor) -> Tensor:
        """What the decoder reconstructs in the free energy: the newest ``decode_frames`` frames scaled, or the
        state."""
        return self._newest(x, self.decode_frames)

    def _newest(self, x: Tensor, frames: int) -> Tensor:
        """The newest ``frames`` frames of a stacked pixel input in the decoder's scale (``x / 255 - 0.5``), or
        the state."""
        if self.obs_key == "pixels":
            return x[..., -self.obs_shape[0] * frames:, :, :].float() / 255.0 - 0.5
        return x.float()

    def ambiguity(self) -> float:
        """``E[H p(o|s)]``: the entropy of the fixed-variance Gaussian decoder, ``obs_dim/2 log(2 pi e obs_std^2)``."""
        return 0.5 * self.obs_dim * (LOG_2PI + 1.0 + 2.0 * math.log(self.obs_std))

    def _read(self, obs: TensorDict | Tensor) -> Tensor:
        x = obs if isinstance(obs, Tensor) else read_key(obs, self.obs_key, type(self).__name__)
        return x.to(self.posterior_head.linear.weight.device)

    # ------------------------------------------------------------------------------ the contract
    def encode(self, obs: TensorDict | Tensor) -> Tensor:
        """The mean of q(s|o) ``[N, D]`` (the std: :meth:`posterior`)."""
        return self.posterior(self._read(obs))[0]

    def decode(self, latent: Tensor) -> TensorDict:
        """``{obs_key: mean of p(o|s)}``: pixels as uint8-scale floats in [0, 255], or states."""
        x = self.decode_mean(latent)
        if self.obs_key == "pixels":
            x = ((x + 0.5) * 255.0).clamp(0.0, 255.0)
        return TensorDict({self.obs_key: x}, batch_size=[x.shape[0]])

    def initial_state(self, batch_size: int) -> TensorDict:
        """The prior N(0, I) before any observation."""
        device = self.posterior_head.linear.weight.device
        n, d = int(batch_size), self.latent_dim
        return TensorDict({"mean": torch.zeros(n, d, device=device), "std": torch.ones(n, d, device=device),
                           "epistemic": torch.zeros(n, device=device)}, batch_size=[n])

    def observe(self, state: TensorDict, obs: TensorDict | Tensor, prev_action: Tensor, is_first: Tensor) -> TensorDict:
        """The posterior q(s_t|o_t). Amortised: it reads ``obs`` only, so ``state``, ``prev_action`` and
        ``is_first`` do not change it (rows with ``is_first`` trivially restart)."""
        del prev_action, is_first
        mean, std = self.posterior(self._read(obs))
        return TensorDict({"mean": mean, "std": std, "epistemic": torch.zeros_like(mean[:, 0])},
                          batch_size=state.batch_size)

    def predict(self, state: TensorDict, action: Tensor, noise: dict[str, Tensor] | None = None) -> TensorDict:
        """One SAMPLED prior step: ``s ~ N(mean, std)``, a member ``e`` uniform per row, ``p_e(s'|s,a)``.

        ``noise`` (optional) fixes the draws: ``eps`` ``[B, D]`` (standard normal) and ``member``
        ``[B]`` (int64 in ``[0, ensemble_size)``); the policy passes per-env draws so that one env's
        plan never depends on another's."""
        eps = torch.randn_like(state["std"]) if noise is None else noise["eps"]
        s = state["mean"] + state["std"] * eps
        means, stds = self.transition_members(s, action)
        pick = torch.randint(len(self.transitions), (s.shape[0],), device=s.device) if noise is None \
            else noise["member"]
        rows = torch.arange(s.shape[0], device=s.device)
        return TensorDict({"mean": means[pick, rows], "std": stds[pick, rows],
                           "epistemic": ensemble_epistemic(means, stds)}, batch_size=state.batch_size)

    def imagine(self, state: TensorDict, actions: Tensor, num_samples: int = 1,
                noise: dict[str, Tensor] | None = None) -> TensorDict:
        """The base class's sampled rollouts ``[B * num_samples, H]``; ``noise`` (optional) holds
        :meth:`predict`'s draws for every step: ``eps`` ``[B * num_samples, H, D]``, ``member``
        ``[B * num_samples, H]``."""
        if noise is None:
            return super().imagine(state, actions, num_samples)
        if actions.dim() != 3:
            raise ValueError(f"actions must be [B, H, A], got {list(actions.shape)}")
        actions = actions.repeat_interleave(num_samples, dim=0)
        state = state.repeat_interleave(num_samples, dim=0) if num_samples > 1 else state
        steps = []
        for t in range(actions.shape[1]):
            state = self.predict(state, actions[:, t], {"eps": noise["eps"][:, t], "member": noise["member"][:, t]})
            steps.append(state)
        return torch.stack(steps, dim=1)

    def view_epistemic(self, mean: Tensor, std: Tensor, context: Tensor | None = None) -> Tensor:
        """AV's epistemic value of imagined steps: how far the imagined view would move the belief,
        ``KL(fuse(p, q(s | dec(s))) || p)`` per step ``[M, H]``, for predicted beliefs ``p = N(mean, std)``
        ``[M, H, D]`` (spec §7, "epist_k"; the view is decoded from the predicted mean).

        Pixels: the encoder reads ``frame_stack`` frames, so each step's view is stacked with the views
        decoded before it, the first steps with the newest observed frames ``context`` ``[M, 3 (k - 1), H, W]``
        (uint8 scale; ``None``: the first decoded view repeated). Where the decoder draws what the encoder
        knows the fused belief stays near ``p`` (value ~0); a view unlike the training frames moves it.
        """
        m, h, d = mean.shape
        view = self.decode(mean.reshape(m * h, d))[self.obs_key]
        if self.obs_key == "pixels":
            frames = view.reshape(m, h, *self.obs_shape)
            k = self.frame_stack
            if k > 1:
                older = (frames[:, :1].expand(-1, k - 1, *self.obs_shape) if context is None
                         else context.float().reshape(m, k - 1, *self.obs_shape))
                frames = torch.cat([older, frames], dim=1)
                frames = torch.stack([frames[:, t:t + k] for t in range(h)], dim=1).flatten(2, 3)
            view = frames.reshape(m * h, -1, *self.obs_shape[1:])
        view_mean, view_std = self.posterior(view)
        prior_mean, prior_std = mean.reshape(m * h, d), std.reshape(m * h, d)
        post_mean, post_std = gaussian_fuse(prior_mean, prior_std, view_mean, view_std)
        return gaussian_kl(post_mean, post_std, prior_mean, prior_std).reshape(m, h)

    def observation_risk(self, mean: Tensor, goal: Tensor, goal_index: Tensor, chunk: int = 1024) -> Tensor:
        """AV's instrumental term (spec §7, ``instrum_k``) per imagined step ``[M, H]``, in nats:
        ``||dec(mean_t) - o_goal||^2 / (2 obs_std^2)``, the negative log-likelihood of the goal observation under
        the decoder's fixed-variance Gaussian at each predicted mean, less its constant (so it adds to an
        epistemic value in nats as the latent risk does).

        ``mean`` ``[M, H, D]``: predicted beliefs' means; ``goal`` ``[G, *obs_shape]`` in the decoder's scale
        (:meth:`target`: the newest frame, ``x / 255 - 0.5``); ``goal_index`` ``[M]`` (int64): the row of
        ``goal`` each rollout is compared with. Decoded ``chunk`` frames at a time, which bounds the memory of
        ``M * H`` decodes (a planning step of the paper preset decodes 20,000 frames per env)."""
        m, h, d = mean.shape
        flat = mean.reshape(m * h, d)
        index = goal_index.to(mean.device).repeat_interleave(h)
        out = []
        for i in range(0, m * h, chunk):
            error = self.decode_mean(flat[i:i + chunk]) - goal[index[i:i + chunk]]
            out.append(error.square().flatten(1).sum(-1))
        return (torch.cat(out) / (2.0 * self.obs_std ** 2)).reshape(m, h)

    # ------------------------------------------------------------------------------------- loss
    def sequence(self, batch: TensorDict) -> tuple[Tensor, Tensor, Tensor]:
        """A batch's observations ``[B, L+1, ...]``, actions ``[B, L, A]`` and action mask ``[B, L]``:
        ``[B, L]`` slices (``o_0 .. o_L`` from the slice and its last ``next``) or ``[B]`` transitions."""
        if batch.batch_dims == 1:
            batch = batch.unsqueeze(1)
        x = read_key(batch, self.obs_key, type(self).__name__)
        x_next = batch["next", self.obs_key]
        obs = torch.cat([x, x_next[:, -1:]], dim=1)
        action = batch["action"].float()
        mask = batch["has_action"].float() if "has_action" in batch.keys() else torch.ones(action.shape[:2])
        return obs, action, mask.to(action.device)

    def loss(self, batch: TensorDict) -> TensorDict:
        """Variational free energy of ``[B, L]`` slices; see the module docstring. Terms per observation."""
        terms = self.loss_terms(batch)
        return TensorDict({
            "loss": sum(terms["objective"].values()),
            **{k: terms[k].detach() for k in LOSS_METRICS},
        }, batch_size=[])

    def loss_terms(self, batch: TensorDict) -> dict[str, Any]:
        """The pieces of :meth:`loss`, with their graphs: ``free_energy`` (the bound itself, without free nats),
        ``recon``, ``kl_transition`` (before free nats), ``kl_prior`` and, under ``"objective"``, the weighted
        terms whose sum is minimised (``recon``, ``kl_transition`` clamped at the free nats and weighted,
        ``kl_prior`` weighted, and ``inverse`` weighted when ``inverse_weight > 0``). ``inverse`` is the
        inverse-dynamics error ``||a_hat - a_t||^2`` (0 without the head). What the training step backpropagates
        is ``sum(objective.values())``; one term's gradient at a time is what
        ``ActiveInferenceAgent.gradient_norms_by_term`` reports."""
        obs, action, mask, mean, std = self._beliefs(batch)
        b, t1 = obs.shape[:2]
        s = mean + std * torch.randn_like(std)
        target = self.reconstruction_target(obs.flatten(0, 1)).reshape(b * t1, -1)
        recon_rows = -gaussian_log_prob(target, self.decoder(s).reshape(b * t1, -1),
                                        torch.full_like(target, self.obs_std))
        recon = recon_rows.mean()
        kl_prior = gaussian_kl(mean, std, torch.zeros_like(mean), torch.ones_like(std)).mean()
        mean, std, s = (v.reshape(b, t1, -1) for v in (mean, std, s))
        p_means, p_stds = self.transition_members(s[:, :-1].flatten(0, 1), action.flatten(0, 1))
        kl_members = gaussian_kl(mean[:, 1:].flatten(0, 1), std[:, 1:].flatten(0, 1), p_means, p_stds)  # [E, B*L]
        kl_steps = (kl_members.mean(0) * mask.flatten()).reshape(b, -1)  # [B, L], masked
        kl_transition = self._batch_mean(kl_steps, mask)
        # Free nats (Dreamer): the batch-mean transition KL below ``free_nats`` costs nothing and gives no
        # gradient, so the posterior can carry that much information before the prior pulls on it.
        kl_term = self._free(kl_transition)
        # latent overshooting: distances 2..D, the transition term is the mean over distances 1..D (PlaNet eq. 7)
        kl_far = self._overshooting_kls(p_means, p_stds, mean, std, action, mask)
        if kl_far:
            kl_term = (kl_term + sum(self._free(kl) for kl in kl_far)) / (1 + len(kl_far))
        kl_overshooting = torch.stack(kl_far).mean() if kl_far else torch.zeros_like(kl_transition)
        objective = {"recon": recon, "kl_transition": self.kl_transition_weight * kl_term,
                     "kl_prior": self.kl_prior_weight * kl_prior}
        inverse = torch.zeros_like(kl_transition)
        if self.inverse_head is not None:
            inverse = self._inverse_error(mean, action, mask)
            objective["inverse"] = self.inverse_weight * inverse
        return {
            "free_energy": recon + self.kl_transition_weight * kl_transition + self.kl_prior_weight * kl_prior,
            "recon": recon, "kl_transition": kl_transition, "kl_prior": kl_prior,
            "kl_overshooting": kl_overshooting, "inverse": inverse, "objective": objective,
            "posterior_std": std.mean(), "epistemic": ensemble_epistemic(p_means, p_stds).mean(),
            # per slice and step, for finding the rows behind a burst (detached): the transition KL (members'
            # mean, masked) [B, L], the reconstruction NLL [B, L + 1], the smallest std of the posterior
            # [B, L + 1] and of any member's prior [B, L]
            "rows": {"kl_transition": kl_steps.detach(),
                     "recon": recon_rows.reshape(b, t1).detach(), "posterior_std_min": std.amin(-1).detach(),
                     "prior_std_min": p_stds.amin(dim=(0, 2)).reshape(b, -1).detach()},
        }

    def inverse_error(self, batch: TensorDict) -> Tensor:
        """The inverse-dynamics head's error ``||a_hat - a_t||^2`` on a batch (summed over action dims, averaged over
        recorded actions), with its graph through the head, the posterior head and the encoder, and nothing else
        computed: the term alone, for training the encoder on it before the free energy (``inverse_weight > 0``)."""
        if self.inverse_head is None:
            raise ValueError("inverse_error needs the inverse-dynamics head: build the model with inverse_weight > 0")
        obs, action, mask, mean, _ = self._beliefs(batch)
        return self._inverse_error(mean.reshape(*obs.shape[:2], -1), action, mask)

    def _beliefs(self, batch: TensorDict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """A batch's :meth:`sequence` on the model's device (observations ``[B, L+1, ...]``, actions, mask) and the
        posterior over every observation: means and stds ``[B * (L+1), D]``, with their graphs."""
        device = self.posterior_head.linear.weight.device
        obs, action, mask = (t.to(device) for t in self.sequence(batch))
        mean, std = self.posterior(obs.flatten(0, 1))
        return obs, action, mask, mean, std

    def _inverse_error(self, mean: Tensor, action: Tensor, mask: Tensor) -> Tensor:
        """The inverse head's batch-mean squared error from belief means ``[B, L+1, D]`` to actions ``[B, L, A]``."""
        guess = self.inverse_head(torch.cat([mean[:, :-1], mean[:, 1:]], dim=-1))  # [B, L, A]
        return self._batch_mean((guess - action).pow(2).sum(-1) * mask, mask)

    @staticmethod
    def _batch_mean(masked: Tensor, valid: Tensor) -> Tensor:
        """The mean of ``masked`` (values already multiplied by ``valid``) over the valid entries of the global
        batch: under data-parallel training every rank's rows gathered, the gradient flowing back to its own (the
        identity in one process), so the free-nats clamp acts on the global mean."""
        return gather_batch(masked, grad=True).sum() / gather_batch(valid).sum().clamp_min(1.0)

    def _free(self, kl: Tensor) -> Tensor:
        """A batch-mean KL as minimised: clamped from below at the free nats (none when ``free_nats`` is 0)."""
        return kl.clamp_min(self.free_nats) if self.free_nats > 0 else kl

    def _overshooting_kls(self, p_means: Tensor, p_stds: Tensor, mean: Tensor, std: Tensor, action: Tensor,
                          mask: Tensor) -> list[Tensor]:
        """Latent overshooting's batch-mean KLs for distances ``d = 2 .. overshooting`` (fewer when the slices are
        shorter): ``KL(sg q(s_{t+d}|o_{t+d}) || p_e^d(s_{t+d}|s_t, a_{t:t+d}))``, each member ``e`` rolled on its
        own chain from the one-step predictions ``p_means``, ``p_stds`` ``[E, B * L, D]`` (sampled,
        reparameterised), averaged over members and over the starts whose d actions are all recorded.
        ``mean``, ``std`` ``[B, L + 1, D]`` are the posteriors, ``action`` ``[B, L, A]``, ``mask`` ``[B, L]``."""
        b, t1, d_lat = mean.shape
        steps = t1 - 1
        members = len(self.transitions)
        m, sd = p_means.reshape(members, b, steps, d_lat), p_stds.reshape(members, b, steps, d_lat)
        target_mean, target_std = mean.detach(), std.detach()
        valid = mask  # [B, starts]: the actions from each start so far are all recorded
        kls = []
        for d in range(2, min(self.overshooting, steps) + 1):
            starts = steps - d + 1
            chain = (m + sd * torch.randn_like(sd))[:, :, :starts]  # s_{t+d-1}, drawn from each member's chain
            a = action[:, d - 1 : d - 1 + starts].to(chain.dtype)
            outs = [member(torch.cat([chain[e], a], dim=-1)) for e, member in enumerate(self.transitions)]
            m, sd = torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])  # [E, B, starts, D]
            kl = gaussian_kl(target_mean[:, d:], target_std[:, d:], m, sd).mean(0)  # [B, starts]
            valid = valid[:, :starts] * mask[:, d - 1 : d - 1 + starts]
            kls.append(self._batch_mean(kl * valid, valid))
        return kls
