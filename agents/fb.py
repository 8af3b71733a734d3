"""FB: forward-backward representations (Touati & Ollivier, 2021), the baseline TD-JEPA is compared with.

Configured as in the TD-JEPA codebase (``algorithms/td_jepa.md`` §7; reference
``metamotivo/agents/fb/{agent,model}.py`` and ``scripts/train/{pixel,proprio}/launch_fb_dmc.py``). FB
learns a forward map ``F(L(s), a, z) -> R^{d_z}`` and a backward map ``B(s') -> R^{d_z}`` so that
``F(s, a, z)^T B(s')`` is the successor measure of ``pi_z``, with ``pi_z`` maximising ``F^T z``. It is
the model :class:`~latentrl.world_models.fb.FBModel` (built from the pieces TD-JEPA's model uses;
it owns the loss below and the EMA targets). For pixels ``L`` and ``B`` each have their own DrQ-v2
trunk (``fw`` and ``bw``), without target copies.

One update on ``(s, a, s', terminated')`` (§7)::

    hF = fw(s) (grad);  hF' = fw(s') (no grad);  g = bw(s') (grad: trains B and the bw trunk)
    z  = sample_mixed_z(B(g)): uniform on the sphere, or project(B(g_perm)) with prob. train_goal_ratio
    no grad: l' = L-(hF');  a' = pi(l', z).sample(clip);  M' = mean_e F-(l', a', z)[e] B-(g)^T      [B, B]
    M = F(L(hF), a, z) B(g)^T                                                                    [E, B, B]
    diff = M - gamma_t M'          (gamma_t [B, 1] scales row i)
    L_FB = sum_e [0.5 sum_{i != j} diff[e,i,j]^2 / (B (B - 1)) - mean_i diff[e,i,i]]
    loss = L_FB + ortho_coef * Reg(B(g));  Adam on F + L + fw trunk (lr_f) and on B + bw trunk (lr_b)
    actor: l = L(hF) (no grad);  -mean_b mean_e F(l, a~, z)[e]^T z;  then EMA of F, L (tau_F) and B (tau_B)

Zero-shot: ``z_r = project(sum_i r_i B(s'_i))`` (no covariance inverse, unlike TD-JEPA's lstsq) and
``z_g = project(B(g))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import Tensor

from latentrl.agents.base import scalar_metrics
from latentrl.agents.zero_shot import ZConditionedActor, ZeroShotAgent, check_zero_shot_config
from latentrl.world_models.encoders import RandomShiftsAug
from latentrl.world_models.fb import FBModel
from latentrl.world_models.layers import make_adam, weight_init
from latentrl.world_models.sphere import project_to_sphere
from latentrl.world_models.zero_shot import ForwardMap, make_latent_encoder

__all__ = ["FBAgent", "FBConfig", "PIXEL_PRESETS", "PRESETS", "weighted_sum_task"]


@dataclass
class FBConfig:
    """FB hyperparameters; the defaults are the TD-JEPA codebase's pixel-DMC FB launcher (§7)."""

    obs_type: Literal["pixels", "state"] = "pixels"
    """Observation the agent reads: ``"pixels"`` or ``"state"`` (proprio)."""
    frame_stack: int = 3
    """Frames stacked along channels for pixels (ignored for states)."""
    image_pad: int = 2
    """Random-shift augmentation pad (DrQ-v2 shift; pixels only)."""
    feature_dim: int = 256
    """Output of each pixel trunk's projection (``fw`` and ``bw``) after the DrQ-v2 conv net."""
    L_dim: int = 256
    """Output of the left encoder ``L`` (sphere-normalised), the input of ``F`` and of the actor."""
    left_hidden_dim: int = 256
    """Width of ``L``'s hidden layers (unused with ``left_hidden_layers=0``)."""
    left_hidden_layers: int = 0
    """Hidden layers of ``L``: 0 is Linear + sphere norm (the launchers' "shallow" left encoder)."""
    z_dim: int = 50
    """d_z: output of ``B`` and of ``F``, and the task vectors ``z`` (norm ``sqrt(d_z)``)."""
    backward_hidden_dim: int = 256
    """Width of ``B``'s hidden layers."""
    backward_hidden_layers: int = 2
    """Hidden layers of ``B`` (Linear-LN-Tanh, then Linear-ReLU)."""
    forward_hidden_dim: int = 1024
    """Width of ``F`` (its two embeddings output half of it)."""
    forward_hidden_layers: int = 1
    """Hidden layers of ``F`` after the embeddings."""
    forward_embedding_layers: int = 2
    """Layers of each embedding of ``F``."""
    ensemble_size: int = 2
    """Members E of ``F``; the target uses the ensemble mean (pessimism 0)."""
    actor_hidden_dim: int = 1024
    """Width of the actor."""
    actor_hidden_layers: int = 1
    """Hidden layers of the actor after the embeddings."""
    actor_embedding_layers: int = 2
    """Layers of each actor embedding."""
    actor_std: float = 0.2
    """Std of the actor's truncated-normal noise."""
    stddev_clip: float = 0.3
    """Clip of that noise in the FB target and the actor loss."""
    lr_f: float = 1e-4
    """Adam learning rate of ``F``, ``L`` and the ``fw`` trunk."""
    lr_b: float = 1e-4
    """Adam learning rate of ``B`` and the ``bw`` trunk; the paper sweeps {1e-4, 1e-5}."""
    lr_actor: float = 1e-4
    """Adam learning rate of the actor (the proprio pointmass launcher uses 1e-6)."""
    f_target_tau: float = 1e-3
    """EMA rate of the target ``F`` and ``L`` (class default 0.01)."""
    b_target_tau: float = 1e-3
    """EMA rate of the target ``B`` (class default 0.01)."""
    ortho_coef: float = 1.0
    """Weight of the orthonormality loss on ``B``; the paper sweeps {0.1, 1, 10}."""
    train_goal_ratio: float = 0.5
    """Fraction of pre-training ``z`` replaced by ``project(B(s'_perm))``."""
    batch_size: int = 512
    """Transitions per update: 512 for pixels, 1024 for states."""
    discount: float = 0.98
    """Discount gamma (pointmass: 0.99)."""

    def __post_init__(self) -> None:
        check_zero_shot_config(self, "the FB loss pairs rows")


PRESETS: dict[str, dict[str, Any]] = {
    # launch_fb_dmc.py (pixel/; with obs_type=state the proprio launcher, batch 1024).
    "paper": {},
    # §10: the TD-JEPA small shrink for FB (CPU proprio by default).
    "small": {
        "obs_type": "state", "L_dim": 64, "z_dim": 16, "backward_hidden_dim": 128, "forward_hidden_dim": 256,
        "actor_hidden_dim": 256, "f_target_tau": 5e-3, "b_target_tau": 5e-3, "batch_size": 256,
    },
    # Tiny networks for end-to-end smoke tests.
    "smoke": {
        "obs_type": "state", "feature_dim": 16, "L_dim": 16, "z_dim": 8, "backward_hidden_dim": 32,
        "forward_hidden_dim": 32, "actor_hidden_dim": 32, "f_target_tau": 5e-3, "b_target_tau": 5e-3,
        "batch_size": 32,
    },
}
# Applied on top of PRESETS when the agent reads pixels / states (as in agents/td_jepa.py).
PIXEL_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"batch_size": 512},
    "small": {"feature_dim": 64, "batch_size": 64},
    "smoke": {"batch_size": 16},
}
STATE_PRESETS: dict[str, dict[str, Any]] = {"paper": {"batch_size": 1024}}


def weighted_sum_task(backward: Tensor, reward: Tensor) -> Tensor:
    """FB's reward inference ``project(sum_i r_i B(s'_i))``: ``backward`` ``[N, d]``, ``reward`` ``[N, 1]``
    -> ``[d]`` (norm ``sqrt(d)``)."""
    return project_to_sphere(reward.reshape(1, -1).to(backward.dtype) @ backward).reshape(-1)


class FBAgent(ZeroShotAgent):
    """FB trained offline (or online) from replay batches; zero-shot by ``sum r B`` or goals.

    ``world_model.encode`` is ``L(fw(s))``, ``world_model.encode_task`` is ``B(bw(s))`` and
    ``world_model.successor`` is ``F`` ``[E, B, d_z]``. ``targets`` holds the EMA copies of ``F``,
    ``B`` and ``L`` (not of the trunks).
    """

    name = "fb"
    config_class = FBConfig
    presets = PRESETS
    pixel_presets = PIXEL_PRESETS
    state_presets = STATE_PRESETS

    def __init__(self, config: FBConfig, obs_shape: tuple[int, ...], action_dim: int,
                 device: str | torch.device = "cpu"):
        super().__init__(config, obs_shape, action_dim, device)
        cfg = self.config
        kwargs = {"feature_dim": cfg.feature_dim}
        left = make_latent_encoder(cfg.obs_type, self.model_input_shape, cfg.L_dim, hidden_dim=cfg.left_hidden_dim,
                                   hidden_layers=cfg.left_hidden_layers, **kwargs)
        backward = make_latent_encoder(cfg.obs_type, self.model_input_shape, cfg.z_dim,
                                       hidden_dim=cfg.backward_hidden_dim,
                                       hidden_layers=cfg.backward_hidden_layers, **kwargs)
        forward = ForwardMap(cfg.L_dim, self.action_dim, cfg.z_dim, cfg.z_dim, cfg.forward_hidden_dim,
                             cfg.forward_hidden_layers, cfg.forward_embedding_layers, cfg.ensemble_size)
        aug = RandomShiftsAug(cfg.image_pad) if cfg.obs_type == "pixels" else None
        self.world_model = FBModel(left, backward, forward, obs_key=cfg.obs_type, aug=aug, discount=cfg.discount,
                                   ortho_coef=cfg.ortho_coef, train_goal_ratio=cfg.train_goal_ratio,
                                   f_target_tau=cfg.f_target_tau, b_target_tau=cfg.b_target_tau)
        self.actor = ZConditionedActor(cfg.L_dim, cfg.z_dim, self.action_dim, cfg.actor_hidden_dim,
                                       cfg.actor_hidden_layers, cfg.actor_embedding_layers)
        self.world_model.apply(weight_init)
        self.actor.apply(weight_init)
        self.world_model.make_targets()
        self.to(self.device)

        adam = make_adam
        self._optimizers = {
            "forward": adam([*forward.parameters(), *left.parameters()], lr=cfg.lr_f),
            "backward": adam(backward.parameters(), lr=cfg.lr_b),
            "actor": adam(self.actor.parameters(), lr=cfg.lr_actor),
        }

    @property
    def left(self):
        """``L`` with the ``fw`` trunk."""
        return self.world_model.left_encoder

    @property
    def backward_map(self):
        """``B`` with the ``bw`` trunk."""
        return self.world_model.backward_map

    @property
    def forward_map(self):
        return self.world_model.forward_map

    def reward_inference(self, features: Tensor, reward: Tensor) -> tuple[Tensor, dict[str, Any]]:
        return weighted_sum_task(features, reward), {}

    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        """One FB update: the model's loss, the actor step, the EMA targets."""
        out = self.world_model.loss(batch.to(self.device), self.target_action)
        for name in ("forward", "backward"):
            self._optimizers[name].zero_grad(set_to_none=True)
        out["loss"].backward()
        for name in ("forward", "backward"):
            self._optimizers[name].step()

        actor_loss, q = self.actor_step(out["left_features"], out["z"])
        self.world_model.update_targets()
        metrics = {k: v for k, v in out.items() if k not in ("loss", "z", "left_features")}
        return scalar_metrics({**metrics, "total_loss": out["loss"], "actor_loss": actor_loss, "q": q}, self.device)

    def actor_step(self, left_features: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """One actor step on ``-mean_b mean_e F(L(s), a~, z)[e]^T z`` (encoders detached)."""
        cfg = self.config
        with torch.no_grad():
            left = self.left.head(left_features)
        action = self.actor(left, z, cfg.actor_std).sample(clip=cfg.stddev_clip)
        q = (self.forward_map(left, action, z) * z).sum(-1).mean(0)
        loss = -q.mean()
        opt = self._optimizers["actor"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), q.detach().mean()
