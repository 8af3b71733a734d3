"""Pieces of the latent-predictive zero-shot models (TD-JEPA, FB) and their common base class.

TD-JEPA (``world_models/td_jepa.py``) and FB (``world_models/fb.py``) share their building blocks, as
in the reference code ``facebookresearch/td_jepa`` (``metamotivo/nn_models.py``): encoders that are
a trunk (the DrQ-v2 conv net with a Linear-LayerNorm-Tanh projection for pixels, nothing for
states) followed by an MLP head ending on the sphere, policy-conditioned ensemble predictors
(:class:`ForwardMap`), and the orthonormality regulariser. :class:`ZeroShotModel` is what the
z-conditioned agents (``latentrl.agents.zero_shot``) rely on: a *state encoder* (the policy's
input), a *task encoder* (the space of task vectors ``z``), observation handling and augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel
from latentrl.world_models.encoders import DrQEncoder, RandomShiftsAug, make_encoder, read_key
from latentrl.world_models.sphere import SphereNorm

__all__ = [
    "EmbeddingHead",
    "ForwardMap",
    "LatentEncoder",
    "NextAction",
    "ParallelLayerNorm",
    "ParallelLinear",
    "PixelTrunk",
    "ZeroShotModel",
    "make_latent_encoder",
    "mlp_embedding",
    "orthonormality_loss",
]

NextAction = Callable[[Tensor, Tensor], Tensor]
"""``(latent [B, D], z [B, d]) -> action [B, A]``: the policy ``pi_z`` a policy-conditioned TD target
follows at ``s'`` (the agent's actor, sampled with its clipped noise)."""


class ParallelLinear(nn.Module):
    """``E`` independent linear layers applied in one batched matmul: ``[E, B, in] -> [E, B, out]``.

    Each member's weight is orthogonal with ReLU gain and its bias zero (the reference code's
    ``DenseParallel`` under ``weight_init``).
    """

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        self.in_features, self.out_features, self.ensemble_size = in_features, out_features, ensemble_size
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, out_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        gain = nn.init.calculate_gain("relu")
        for member in self.weight:  # [in, out]: orthogonal as the [out, in] weight of an nn.Linear
            member.copy_(nn.init.orthogonal_(torch.empty(self.out_features, self.in_features), gain).T)
        self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ensemble_size={self.ensemble_size}"


class ParallelLayerNorm(nn.Module):
    """LayerNorm over the last dim with a separate affine map per ensemble member: ``[E, B, D]``."""

    def __init__(self, dim: int, ensemble_size: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(ensemble_size, 1, dim))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x, (self.dim,), None, None, self.eps) * self.weight + self.bias


def mlp_embedding(in_dim: int, hidden_dim: int, num_layers: int, ensemble_size: int | None = None) -> nn.Sequential:
    """Linear-LayerNorm-Tanh, ``num_layers - 2`` x Linear-ReLU, then Linear(hidden -> hidden / 2)-ReLU.

    The reference code's ``simple_embedding``; with ``ensemble_size`` the layers are parallel
    (inputs ``[E, B, in]``).
    """
    if num_layers < 2:
        raise ValueError(f"an embedding needs at least 2 layers, got {num_layers}")
    if ensemble_size is None:
        linear, norm = nn.Linear, nn.LayerNorm
    else:
        linear = lambda i, o: ParallelLinear(i, o, ensemble_size)
        norm = lambda d: ParallelLayerNorm(d, ensemble_size)
    layers: list[nn.Module] = [linear(in_dim, hidden_dim), norm(hidden_dim), nn.Tanh()]
    for _ in range(num_layers - 2):
        layers += [linear(hidden_dim, hidden_dim), nn.ReLU()]
    layers += [linear(hidden_dim, hidden_dim // 2), nn.ReLU()]
    return nn.Sequential(*layers)


class ForwardMap(nn.Module):
    """A policy-conditioned predictor ``T(latent, a, z) -> [E, B, out_dim]`` (the reference ``ForwardMap``).

    ``embed_z(latent || z)`` and ``embed_sa(latent || a)`` (each to ``hidden_dim / 2``) are
    concatenated and passed through ``hidden_layers`` x Linear-ReLU and a final Linear, all ``E``
    members at once. TD-JEPA's ``T_phi`` / ``T_psi`` and FB's forward map ``F``.
    """

    def __init__(self, latent_dim: int, action_dim: int, z_dim: int, out_dim: int, hidden_dim: int = 1024,
                 hidden_layers: int = 1, embedding_layers: int = 2, ensemble_size: int = 2):
        super().__init__()
        self.ensemble_size, self.out_dim = ensemble_size, out_dim
        self.embed_z = mlp_embedding(latent_dim + z_dim, hidden_dim, embedding_layers, ensemble_size)
        self.embed_sa = mlp_embedding(latent_dim + action_dim, hidden_dim, embedding_layers, ensemble_size)
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            layers += [ParallelLinear(hidden_dim, hidden_dim, ensemble_size), nn.ReLU()]
        layers.append(ParallelLinear(hidden_dim, out_dim, ensemble_size))
        self.head = nn.Sequential(*layers)

    def forward(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        """``latent`` ``[B, D]``, ``action`` ``[B, A]``, ``z`` ``[B, d_z]`` -> ``[E, B, out_dim]``."""
        e = self.ensemble_size
        latent, action, z = (x.expand(e, *x.shape) for x in (latent, action, z))
        z_embedding = self.embed_z(torch.cat([latent, z], dim=-1))
        sa_embedding = self.embed_sa(torch.cat([latent, action], dim=-1))
        return self.head(torch.cat([sa_embedding, z_embedding], dim=-1))


class EmbeddingHead(nn.Sequential):
    """The MLP head of an encoder, ending on the sphere (the reference ``BackwardMap``).

    ``hidden_layers = 0``: Linear(in -> out). Otherwise Linear(in -> hidden)-LayerNorm-Tanh,
    ``hidden_layers - 1`` x Linear-ReLU, Linear(hidden -> out). Then :class:`SphereNorm`, so the
    output has norm ``sqrt(out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 256, hidden_layers: int = 2):
        if hidden_layers == 0:
            layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.Tanh()]
            for _ in range(hidden_layers - 1):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.ReLU()]
            layers.append(nn.Linear(hidden_dim, out_dim))
        super().__init__(*layers, SphereNorm())
        self.out_dim = out_dim


class PixelTrunk(nn.Module):
    """The DrQ-v2 conv trunk followed by ``proj`` = Linear(-> feature_dim)-LayerNorm-Tanh.

    uint8 (or float, 0..255) stacked frames ``[B, 3k, H, W]`` -> ``[B, feature_dim]`` (``x / 255 - 0.5``
    inside :class:`~latentrl.world_models.encoders.DrQEncoder`); 64x64 frames give 32 * 25 * 25 = 20000
    conv features.
    """

    def __init__(self, obs_shape: Sequence[int], feature_dim: int = 256):
        super().__init__()
        self.convnet = DrQEncoder(obs_shape)
        self.proj = nn.Sequential(nn.Linear(self.convnet.repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())
        self.repr_dim = feature_dim

    def forward(self, pixels: Tensor) -> Tensor:
        return self.proj(self.convnet(pixels))


class LatentEncoder(nn.Module):
    """An encoder split where the targets split it: ``head(trunk(x))``.

    The trunk (conv net for pixels, the identity for states) has no target copy; the head does.
    """

    def __init__(self, trunk: nn.Module, head: EmbeddingHead):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.dim = head.out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


def make_latent_encoder(obs_type: str, obs_shape: Sequence[int], out_dim: int, *, hidden_dim: int,
                        hidden_layers: int, feature_dim: int = 256) -> LatentEncoder:
    """A :class:`LatentEncoder` for ``"pixels"`` (``obs_shape`` ``[3k, H, W]``: :class:`PixelTrunk` with
    ``feature_dim``) or ``"state"`` (``obs_shape`` ``[D]``: no trunk), with an :class:`EmbeddingHead`."""
    if obs_type == "pixels":
        trunk: nn.Module = PixelTrunk(obs_shape, feature_dim)
    elif obs_type == "state":
        trunk = make_encoder("identity", obs_shape)
    else:
        raise ValueError(f"obs_type must be 'pixels' or 'state', got {obs_type!r}")
    return LatentEncoder(trunk, EmbeddingHead(trunk.repr_dim, out_dim, hidden_dim, hidden_layers))


def orthonormality_loss(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """TD-JEPA's / FB's ``Reg(X) = 0.5 * sum_{i != j} (X X^T)_ij^2 / (B (B - 1)) - mean_i (X X^T)_ii``.

    ``x`` ``[B, d]``. Returns ``(loss, diag, offdiag)`` with ``diag = -mean_i ||x_i||^2`` (constant
    ``-d`` for sphere-normalised rows) and ``offdiag >= 0``, zero exactly when the rows are mutually
    orthogonal. [P Eq. 9; TDJ agents/td_jepa/agent.py ``_orth_loss``]
    """
    batch = x.shape[0]
    if batch < 2:
        raise ValueError(f"the orthonormality loss needs a batch of at least 2 rows, got {batch}")
    cov = x @ x.T
    diag = -cov.diagonal().mean()
    offdiag = 0.5 * (cov.square().sum() - cov.diagonal().square().sum()) / (batch * (batch - 1))
    return offdiag + diag, diag, offdiag


class ZeroShotModel(WorldModel):
    """Base of the latent-predictive zero-shot models: a state encoder and a task encoder on one input.

    Subclasses provide :attr:`state_encoder` (the policy reads its output; TD-JEPA's ``phi``, FB's
    ``L``) and :attr:`task_encoder` (rewards are regressed on it and goals mapped into it; TD-JEPA's
    ``psi``, FB's ``B``), both :class:`LatentEncoder`. ``obs_key`` is ``"pixels"`` (stacked frames
    ``[B, 3k, H, W]`` uint8) or ``"state"``; ``aug`` is the random-shift augmentation applied to
    training batches by :meth:`loss` (:meth:`augment`), never by :meth:`encode`.
    """

    capabilities = frozenset({"encode", "successor"})

    def __init__(self, obs_key: str, aug: RandomShiftsAug | None = None):
        super().__init__()
        if obs_key not in ("pixels", "state"):
            raise ValueError(f"obs_key must be 'pixels' or 'state', got {obs_key!r}")
        self.obs_key, self.aug = obs_key, aug

    @property
    def state_encoder(self) -> LatentEncoder:
        raise NotImplementedError

    @property
    def task_encoder(self) -> LatentEncoder:
        raise NotImplementedError

    @property
    def z_dim(self) -> int:
        return self.task_encoder.dim

    def observation(self, obs: TensorDict | Tensor) -> Tensor:
        """The input tensor ``[N, *event]`` of ``obs`` (flattening leading batch dims).

        Single pixel frames ``[N, 3, H, W]`` given to a model of ``k`` stacked frames are repeated ``k``
        times, which is the frame stack at an episode's first step (e.g. a goal image).
        """
        if isinstance(obs, TensorDict):
            obs = read_key(obs, self.obs_key, type(self).__name__)
        event_dims = 3 if self.obs_key == "pixels" else 1
        x = obs.reshape(-1, *obs.shape[obs.dim() - event_dims:])
        if self.obs_key == "pixels":
            channels = self.state_encoder.trunk.convnet.obs_shape[0]
            if x.shape[1] != channels:
                if channels % x.shape[1] != 0:
                    raise ValueError(f"pixels with {x.shape[1]} channels given to a model of {channels} "
                                     "(stacked frames); pass stacked frames or single RGB frames")
                x = x.repeat(1, channels // x.shape[1], 1, 1)
        return x

    def augment(self, x: Tensor) -> Tensor:
        """Random shifts on a pixel batch (identity for states)."""
        return x if self.aug is None else self.aug(x)

    def training_inputs(self, batch: TensorDict, discount: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(s, s', a, gamma_t)`` of a replay batch: inputs ``[B, *]`` (pixels shifted independently),
        actions ``[B, A]``, ``gamma_t = discount * (1 - terminated')`` ``[B, 1]``."""
        obs, next_obs = self.augment(self.observation(batch)), self.augment(self.observation(batch["next"]))
        terminated = batch["next", "terminated"].reshape(-1, 1)
        return obs, next_obs, batch["action"].float(), discount * (~terminated.bool()).float()

    def encode(self, obs: TensorDict | Tensor) -> Tensor:
        """The state embedding ``[N, d]`` (TD-JEPA's ``phi(s)``, FB's ``L(s)``)."""
        return self.state_encoder(self.observation(obs))

    def encode_task(self, obs: TensorDict | Tensor) -> Tensor:
        """The task embedding ``[N, d_z]`` (TD-JEPA's ``psi(s)``, FB's ``B(s)``): rewards are regressed on it
        and goals mapped into it."""
        return self.task_encoder(self.observation(obs))
