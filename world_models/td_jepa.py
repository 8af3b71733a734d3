"""TD-JEPA's latent-predictive model: two sphere-normalised encoders and two policy-conditioned predictors.

Bagatella et al., "TD-JEPA" (arXiv:2510.00739), §3 and the reference code ``facebookresearch/td_jepa``
(``metamotivo/nn_models.py``, ``agents/td_jepa/model.py``); ``algorithms/td_jepa.md`` §2 lists every
layer. The model holds

- the state encoder ``phi: S -> R^{d_phi}`` and the task encoder ``psi: S -> R^{d_psi}``, each a trunk
  (the DrQ-v2 conv net with a Linear-LayerNorm-Tanh projection for pixels, nothing for states)
  followed by an MLP head ending in :class:`~latentrl.world_models.sphere.SphereNorm`;
- the predictors ``T_phi(phi(s), a, z) -> R^{d_psi}`` (the successor features of ``psi`` under the
  policy ``pi_z``) and ``T_psi(psi(s), a, z) -> R^{d_phi}``, each an ensemble of ``E`` members whose
  outputs are ``[E, B, out]``.

The symmetric variant has one encoder (``psi = phi``) and no ``T_psi``. FB (Touati & Ollivier, 2021)
is built from the same parts: its left encoder ``L`` is ``phi``, its backward map ``B`` is ``psi``
and its forward map ``F`` is ``T_phi`` (no ``T_psi``); see ``latentrl.agents.fb``.

Target (EMA) copies, optimizers and losses belong to the agents that train the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.base import WorldModel
from latentrl.world_models.encoders import DrQEncoder, RandomShiftsAug, make_encoder
from latentrl.world_models.sphere import SphereNorm

__all__ = [
    "EmbeddingHead",
    "ForwardMap",
    "LatentEncoder",
    "ParallelLayerNorm",
    "ParallelLinear",
    "PixelTrunk",
    "TDJEPAModel",
    "make_latent_encoder",
    "mlp_embedding",
    "orthonormality_loss",
    "predictive_loss",
]


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


def predictive_loss(predictions: Tensor, target: Tensor) -> Tensor:
    """TD-JEPA's regression loss: squared error summed over features, mean over ensemble and batch.

    ``predictions`` ``[E, B, D]``, ``target`` ``[B, D]`` (the code's ``(preds - target).pow(2).sum(-1).mean()``,
    twice the paper's ``1/(2B) sum ||.||^2`` per member). [TDJ agents/td_jepa/agent.py]
    """
    return (predictions - target).square().sum(-1).mean()


class TDJEPAModel(WorldModel):
    """TD-JEPA's encoders ``phi``, ``psi`` and predictors ``T_phi``, ``T_psi`` as a world model.

    - ``encode(obs)``: ``phi(s)`` ``[B, d_phi]`` (norm ``sqrt(d_phi)``), the policy's input.
    - ``encode_task(obs)``: ``psi(s)`` ``[B, d_psi]`` (norm ``sqrt(d_psi)``), the space of task vectors ``z``.
    - ``successor(latent, action, z)``: ``T_phi(phi, a, z)`` ``[E, B, d_psi]``, the successor features of
      ``psi`` under ``pi_z``; ``Q(s, a, z) = mean_e T_phi(...)[e]^T z``. Not a next-latent model.
    - ``predict_phi(psi, action, z)``: ``T_psi`` ``[E, B, d_phi]`` (asymmetric models only).

    ``psi_encoder=None`` makes the symmetric variant (``psi = phi``). ``obs_key`` is ``"pixels"``
    (stacked frames ``[B, 3k, H, W]`` uint8) or ``"state"``; ``aug`` is the random-shift augmentation
    applied by agents to training batches (:meth:`augment`), never by :meth:`encode`.
    """

    capabilities = frozenset({"encode", "successor"})

    def __init__(self, phi_encoder: LatentEncoder, phi_predictor: ForwardMap, *,
                 psi_encoder: LatentEncoder | None = None, psi_predictor: ForwardMap | None = None,
                 obs_key: str = "state", aug: RandomShiftsAug | None = None):
        super().__init__()
        if obs_key not in ("pixels", "state"):
            raise ValueError(f"obs_key must be 'pixels' or 'state', got {obs_key!r}")
        self.phi_encoder, self.phi_predictor = phi_encoder, phi_predictor
        self.psi_encoder, self.psi_predictor = psi_encoder, psi_predictor
        self.obs_key, self.aug = obs_key, aug
        self.phi_dim = phi_encoder.dim
        self.z_dim = self.psi.dim

    @property
    def symmetric(self) -> bool:
        return self.psi_encoder is None

    @property
    def psi(self) -> LatentEncoder:
        """The task encoder (``phi`` itself in the symmetric variant)."""
        return self.phi_encoder if self.psi_encoder is None else self.psi_encoder

    def observation(self, obs: TensorDict | Tensor) -> Tensor:
        """The input tensor ``[N, *event]`` of ``obs`` (flattening leading batch dims).

        Single pixel frames ``[N, 3, H, W]`` given to a model of ``k`` stacked frames are repeated ``k``
        times, which is the frame stack at an episode's first step (e.g. a goal image).
        """
        if isinstance(obs, TensorDict):
            if self.obs_key not in obs.keys():
                raise KeyError(
                    f"{type(self).__name__} reads {self.obs_key!r} but the observation has keys "
                    f"{sorted(map(str, obs.keys()))}; build the env (or sample the buffer) with {self.obs_key!r}"
                )
            obs = obs[self.obs_key]
        event_dims = 3 if self.obs_key == "pixels" else 1
        x = obs.reshape(-1, *obs.shape[obs.dim() - event_dims:])
        if self.obs_key == "pixels":
            channels = self.phi_encoder.trunk.convnet.obs_shape[0]
            if x.shape[1] != channels:
                if channels % x.shape[1] != 0:
                    raise ValueError(f"pixels with {x.shape[1]} channels given to a model of {channels} "
                                     "(stacked frames); pass stacked frames or single RGB frames")
                x = x.repeat(1, channels // x.shape[1], 1, 1)
        return x

    def augment(self, x: Tensor) -> Tensor:
        """Random shifts on a pixel batch (identity for states)."""
        return x if self.aug is None else self.aug(x)

    def encode(self, obs: TensorDict | Tensor) -> Tensor:
        """``phi(s)`` ``[N, d_phi]``."""
        return self.phi_encoder(self.observation(obs))

    def encode_task(self, obs: TensorDict | Tensor) -> Tensor:
        """``psi(s)`` ``[N, d_psi]``: the embedding that rewards are regressed on and goals are mapped to."""
        return self.psi(self.observation(obs))

    def successor(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        """``T_phi(phi(s), a, z)`` ``[E, B, d_psi]``."""
        return self.phi_predictor(latent, action, z)

    def predict_phi(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        """``T_psi(psi(s), a, z)`` ``[E, B, d_phi]``."""
        if self.psi_predictor is None:
            raise NotImplementedError(f"{type(self).__name__} has no T_psi (symmetric variant or FB)")
        return self.psi_predictor(latent, action, z)

    def q_value(self, latent: Tensor, action: Tensor, z: Tensor) -> Tensor:
        """``Q(s, a, z) = mean_e T_phi(phi(s), a, z)[e]^T z`` ``[B]``."""
        return (self.successor(latent, action, z) * z).sum(-1).mean(0)

    def extra_repr(self) -> str:
        return f"obs_key={self.obs_key!r}, phi_dim={self.phi_dim}, z_dim={self.z_dim}, symmetric={self.symmetric}"

