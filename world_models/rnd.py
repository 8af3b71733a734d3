"""RND's model (Burda et al., 2019) as URLB codes it: an observation encoder and the distillation pair.

The encoder (DrQ-v2 trunk with random shifts for pixels, the identity for states) is shared with the
agent's actor-critic, which trains it. :class:`RandomNetworkDistillation` is a predictor trained to
match a frozen, randomly initialised target network on the normalised encoded observation; its
prediction error is the novelty the agent turns into an intrinsic reward. :meth:`RNDModel.loss` is
the distillation loss.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.world_models.encoders import ObservationEncoder
from latentrl.world_models.layers import RunningMeanStd, mlp, weight_init

__all__ = ["RNDModel", "RandomNetworkDistillation"]


class RandomNetworkDistillation(nn.Module):
    """Predictor and frozen random target MLPs on a normalised input; ``forward`` is the error ``[B, 1]``.

    ``forward(h [B, D], update_stats)`` normalises ``h`` by the running mean / std (folding ``h`` into
    the statistics first when ``update_stats``), clips it to ``[-clip, clip]`` and returns
    ``mean_k (predictor - target)_k**2``. Only the predictor has gradients.
    """

    def __init__(self, obs_dim: int, hidden_dim: int, rep_dim: int, clip: float = 5.0):
        super().__init__()
        self.clip = clip
        self.obs_rms = RunningMeanStd((obs_dim,))
        self.predictor = mlp(obs_dim, [hidden_dim, hidden_dim], rep_dim)
        self.target = mlp(obs_dim, [hidden_dim, hidden_dim], rep_dim)
        self.apply(weight_init)
        self.target.requires_grad_(False)

    def forward(self, h: Tensor, update_stats: bool = False) -> Tensor:
        if update_stats:
            self.obs_rms.update(h)
        x = self.obs_rms.normalize(h, clip=self.clip, eps=1e-5)
        with torch.no_grad():
            target = self.target(x)
        return (self.predictor(x) - target).square().mean(dim=-1, keepdim=True)


class RNDModel(ObservationEncoder):
    """``encode(obs)`` (an :class:`ObservationEncoder`) plus ``rnd``, the distillation pair on its features.

    ``loss(batch, features=None)``: the predictor's error on the encoded observations (the batch's
    augmented encoding, or ``features`` ``[B, D]`` when the agent already encoded them), detached from
    the encoder, folding them into the input statistics. ``prediction_error(h)`` reads the statistics
    without changing them.
    """

    def __init__(self, encoder: nn.Module, obs_key: str, rnd: RandomNetworkDistillation,
                 aug: nn.Module | None = None):
        super().__init__(encoder, obs_key, aug=aug)
        self.rnd = rnd

    def prediction_error(self, h: Tensor) -> Tensor:
        """``[B, 1]`` error of features ``h`` ``[B, D]`` (statistics unchanged)."""
        return self.rnd(h)

    def loss(self, batch: TensorDict, features: Tensor | None = None) -> TensorDict:
        h = self.encode(batch, augment=True) if features is None else features
        rnd_loss = self.rnd(h.detach(), update_stats=True).mean()
        return TensorDict({"loss": rnd_loss, "rnd_loss": rnd_loss.detach()}, batch_size=[])
