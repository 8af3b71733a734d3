"""TD-JEPA: temporal-difference latent-predictive representations for zero-shot RL (Bagatella et al., 2025).

Offline and reward-free, TD-JEPA learns a state encoder ``phi``, a task encoder ``psi`` and two
policy-conditioned predictors by cross temporal-difference regression, and a TD3-style actor
``pi(phi(s), z)`` that maximises ``T_phi(phi(s), a, z)^T z``; at test time a reward is regressed on
``psi`` to give ``z_r`` and ``pi(., z_r)`` acts zero-shot. ``algorithms/td_jepa.md`` is the
specification (section numbers below refer to it); the reference is ``facebookresearch/td_jepa``
(``metamotivo/agents/td_jepa/{agent,model}.py``).

One update on a batch ``(s, a, s', terminated')`` (§3, paper Eq. 7 and Eq. 9, Alg. 1):

1. Pixels: independent random shifts of ``s`` and ``s'``; trunk features ``h = trunk(s)`` with
   gradients, ``h' = trunk(s')`` without (online trunks: the conv trunks have no target copies).
2. ``z`` ``[B, d_psi]``: uniform on the sphere of radius ``sqrt(d_psi)``, each row replaced with
   probability ``train_goal_ratio`` by ``project(psi(s'_perm))`` (§4).
3. Targets (EMA heads and predictors, marked ``-``), ``gamma_t = discount * (1 - terminated')``::

       a'    = clamp(mu_pi(phi-(s'), z) + clip(0.2 eps, -0.3, 0.3))            TD3 noise, not the mean
       y_phi = psi-(s') + gamma_t * mean_e T_phi-(phi-(s'), a', z)[e]         [B, d_psi]
       y_psi = phi-(s') + gamma_t * mean_e T_psi-(psi-(s'), a', z)[e]         [B, d_phi]

4. ``L = |T_phi(phi(s), a, z) - y_phi|^2 + |T_psi(psi(s), a, z) - y_psi|^2`` (sum over features, mean
   over ensemble and batch) ``+ c_phi Reg(phi) + c_psi Reg(psi)``; one backward, Adam steps on
   ``T_phi``, ``T_psi``, the ``phi`` encoder (head + trunk) and the ``psi`` encoder.
5. Actor on the same batch and ``z``, encoders detached: ``-mean_b mean_e T_phi(phi(s), a~, z)[e]^T z``
   with ``a~ ~ pi(phi(s), z)`` (clipped noise, straight-through clamp); Adam step on the actor.
6. EMA (``tau``) of the ``phi``/``psi`` heads and of ``T_phi``/``T_psi``.

The symmetric variant (``symmetric=True``) has one encoder (``psi = phi``, with ``psi``'s
architecture) and one predictor. Zero-shot: ``infer_task(RewardSamples)`` is
``project(lstsq(psi(s'), r))``, ``infer_task(GoalObservation)`` is ``project(psi(g))``.
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
from latentrl.world_models.layers import make_adam, weight_init
from latentrl.world_models.sphere import project_to_sphere
from latentrl.world_models.td_jepa import TDJEPAModel
from latentrl.world_models.zero_shot import ForwardMap, make_latent_encoder

__all__ = ["PIXEL_PRESETS", "PRESETS", "TDJEPAAgent", "TDJEPAConfig", "lstsq_task"]


@dataclass
class TDJEPAConfig:
    """TD-JEPA hyperparameters; the defaults are the paper's pixel-DMC launcher (§2, §6)."""

    obs_type: Literal["pixels", "state"] = "pixels"
    """Observation the agent reads: ``"pixels"`` (the paper's RGB setting) or ``"state"`` (proprio)."""
    frame_stack: int = 3
    """Frames stacked along channels for pixels (ignored for states). §2."""
    image_pad: int = 2
    """Random-shift augmentation pad (DrQ-v2 shift with replicate padding; pixels only). §2."""
    feature_dim: int = 256
    """Output of the pixel trunk's projection Linear-LayerNorm-Tanh after the DrQ-v2 conv net. §2."""
    phi_dim: int = 256
    """d_phi, the state latent ``phi(s)`` (norm ``sqrt(d_phi)``). Ignored when ``symmetric``. §2."""
    phi_hidden_dim: int = 256
    """Width of the ``phi`` head's hidden layers (unused with ``phi_hidden_layers=0``)."""
    phi_hidden_layers: int = 0
    """Hidden layers of the ``phi`` head: 0 is a single Linear (the paper's pixel and proprio DMC). §2."""
    psi_dim: int = 50
    """d_psi = d_z, the task latent ``psi(s)`` and task vectors ``z`` (norm ``sqrt(d_psi)``). §2."""
    psi_hidden_dim: int = 256
    """Width of the ``psi`` head's hidden layers. §2."""
    psi_hidden_layers: int = 2
    """Hidden layers of the ``psi`` head (Linear-LN-Tanh, then Linear-ReLU). §2."""
    predictor_hidden_dim: int = 1024
    """Width of ``T_phi`` and ``T_psi`` (their two embeddings output half of it). §2."""
    predictor_hidden_layers: int = 1
    """Hidden layers of the predictors after the embeddings. §2."""
    predictor_embedding_layers: int = 2
    """Layers of each predictor embedding (``embed_z``, ``embed_sa``). §2."""
    ensemble_size: int = 2
    """Members E of each predictor ensemble; targets and the actor use the ensemble mean. §2, §3."""
    actor_hidden_dim: int = 1024
    """Width of the actor (its two embeddings output half of it). §2."""
    actor_hidden_layers: int = 1
    """Hidden layers of the actor after the embeddings. §2."""
    actor_embedding_layers: int = 2
    """Layers of each actor embedding (``embed_z``, ``embed_s``). §2."""
    actor_std: float = 0.2
    """Std of the actor's truncated-normal noise (TD targets, actor loss, exploration). §2."""
    stddev_clip: float = 0.3
    """Clip of that noise in the TD targets and the actor loss (TD3 target smoothing). §3."""
    symmetric: bool = False
    """One encoder (``phi = psi``, built with the ``psi_*`` settings, trained with ``lr_phi`` and
    ``phi_ortho_coef``) and one predictor ``T_phi: R^{d_psi} -> R^{d_psi}`` (``launch_td_jepa_sym_*``). §2."""
    lr_predictor: float = 1e-4
    """Adam learning rate of ``T_phi`` and ``T_psi``. §6."""
    lr_phi: float = 1e-4
    """Adam learning rate of the ``phi`` encoder (head and trunk). §6."""
    lr_psi: float = 1e-4
    """Adam learning rate of the ``psi`` encoder (head and trunk); the paper sweeps {1e-4, 1e-5}. §6."""
    lr_actor: float = 1e-4
    """Adam learning rate of the actor (the proprio pointmass launcher uses 1e-6). §6."""
    encoder_target_tau: float = 1e-3
    """EMA rate of the target ``phi`` and ``psi`` heads (class default 5e-3). §6."""
    predictor_target_tau: float = 1e-3
    """EMA rate of the target predictors (class default 5e-3). §6."""
    phi_ortho_coef: float = 0.1
    """Weight of the orthonormality loss on ``phi``. §6."""
    psi_ortho_coef: float = 0.1
    """Weight of the orthonormality loss on ``psi``; the paper sweeps {0.01, 0.1, 1}. §6."""
    train_goal_ratio: float = 0.5
    """Fraction of pre-training ``z`` replaced by ``project(psi(s'_perm))``. §4."""
    batch_size: int = 512
    """Transitions per update: 512 for pixels, 1024 for states (the proprio launcher). §6."""
    discount: float = 0.98
    """Discount gamma (pointmass: 0.99). §6."""

    def __post_init__(self) -> None:
        check_zero_shot_config(self, "the orthonormality loss pairs rows")


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's DMC launchers (pixels: launch_td_jepa_dmc.py under pixel/; with obs_type=state the
    # proprio launcher, batch 1024).
    "paper": {},
    # §10: CPU proprio by default (2 cores); pixels get PIXEL_PRESETS["small"] on top.
    "small": {
        "obs_type": "state", "phi_dim": 64, "psi_dim": 16, "psi_hidden_dim": 128, "predictor_hidden_dim": 256,
        "actor_hidden_dim": 256, "encoder_target_tau": 5e-3, "predictor_target_tau": 5e-3, "batch_size": 256,
    },
    # Tiny networks for end-to-end smoke tests.
    "smoke": {
        "obs_type": "state", "feature_dim": 16, "phi_dim": 16, "psi_dim": 8, "phi_hidden_dim": 32,
        "psi_hidden_dim": 32, "predictor_hidden_dim": 32, "actor_hidden_dim": 32, "encoder_target_tau": 5e-3,
        "predictor_target_tau": 5e-3, "batch_size": 32,
    },
}

# Applied on top of PRESETS when the agent reads pixels (state runs use the proprio values).
PIXEL_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"batch_size": 512},
    "small": {"feature_dim": 64, "batch_size": 64},
    "smoke": {"batch_size": 16},
}
# Applied on top of PRESETS when the agent reads states: the proprio launcher's batch.
STATE_PRESETS: dict[str, dict[str, Any]] = {"paper": {"batch_size": 1024}}


def lstsq_task(psi: Tensor, reward: Tensor) -> tuple[Tensor, Tensor]:
    """TD-JEPA's reward inference: ``z = project(argmin_z |psi z - r|^2)`` (§5, no ridge).

    ``psi`` ``[N, d]`` embeddings of next states, ``reward`` ``[N, 1]``. Returns the projected ``z``
    ``[d]`` (norm ``sqrt(d)``) and the least-squares solution before projection ``[d]``. Solved in
    float64; the result does not depend on the scale of a positive reward.
    """
    solution = torch.linalg.lstsq(psi.double(), reward.double().reshape(-1, 1)).solution.reshape(-1)
    return project_to_sphere(solution).to(psi.dtype), solution.to(psi.dtype)


class TDJEPAAgent(ZeroShotAgent):
    """TD-JEPA trained offline (or online) from replay batches; zero-shot by reward regression or goals.

    ``obs_shape`` is one env frame ``[3, H, W]`` (pixels; ``frame_stack`` of them are stacked) or
    ``[D]`` (state). Build it with :meth:`from_env` (``make_agent("td_jepa", env, preset=...)``).
    ``world_model`` is a :class:`~latentrl.world_models.td_jepa.TDJEPAModel` (``encode`` = ``phi``,
    ``encode_task`` = ``psi``, ``successor`` = ``T_phi``); ``targets`` holds the EMA copies of the
    heads and predictors (not of the conv trunks).
    """

    name = "td_jepa"
    config_class = TDJEPAConfig
    presets = PRESETS
    pixel_presets = PIXEL_PRESETS
    state_presets = STATE_PRESETS

    def __init__(self, config: TDJEPAConfig, obs_shape: tuple[int, ...], action_dim: int,
                 device: str | torch.device = "cpu"):
        super().__init__(config, obs_shape, action_dim, device)
        cfg = self.config
        pixels = cfg.obs_type == "pixels"
        in_shape = self.model_input_shape

        def encoder(out_dim: int, hidden_dim: int, hidden_layers: int):
            return make_latent_encoder(cfg.obs_type, in_shape, out_dim, hidden_dim=hidden_dim,
                                       hidden_layers=hidden_layers, feature_dim=cfg.feature_dim)

        def predictor(in_dim: int, out_dim: int) -> ForwardMap:
            return ForwardMap(in_dim, self.action_dim, cfg.psi_dim, out_dim, cfg.predictor_hidden_dim,
                              cfg.predictor_hidden_layers, cfg.predictor_embedding_layers, cfg.ensemble_size)

        psi_encoder = encoder(cfg.psi_dim, cfg.psi_hidden_dim, cfg.psi_hidden_layers)
        if cfg.symmetric:
            phi_encoder, psi_encoder = psi_encoder, None
            psi_predictor = None
        else:
            phi_encoder = encoder(cfg.phi_dim, cfg.phi_hidden_dim, cfg.phi_hidden_layers)
            psi_predictor = predictor(cfg.psi_dim, phi_encoder.dim)
        self.world_model = TDJEPAModel(
            phi_encoder, predictor(phi_encoder.dim, cfg.psi_dim), psi_encoder=psi_encoder,
            psi_predictor=psi_predictor, obs_key=cfg.obs_type, aug=RandomShiftsAug(cfg.image_pad) if pixels else None,
            discount=cfg.discount, phi_ortho_coef=cfg.phi_ortho_coef, psi_ortho_coef=cfg.psi_ortho_coef,
            train_goal_ratio=cfg.train_goal_ratio, encoder_target_tau=cfg.encoder_target_tau,
            predictor_target_tau=cfg.predictor_target_tau,
        )
        self.actor = ZConditionedActor(phi_encoder.dim, cfg.psi_dim, self.action_dim, cfg.actor_hidden_dim,
                                       cfg.actor_hidden_layers, cfg.actor_embedding_layers)
        self.world_model.apply(weight_init)
        self.actor.apply(weight_init)

        wm = self.world_model
        wm.make_targets()
        self.to(self.device)

        adam = make_adam
        self._optimizers = {
            "phi_encoder": adam(wm.phi_encoder.parameters(), lr=cfg.lr_phi),
            "phi_predictor": adam(wm.phi_predictor.parameters(), lr=cfg.lr_predictor),
        }
        if not cfg.symmetric:
            self._optimizers["psi_encoder"] = adam(wm.psi_encoder.parameters(), lr=cfg.lr_psi)
            self._optimizers["psi_predictor"] = adam(wm.psi_predictor.parameters(), lr=cfg.lr_predictor)
        self._optimizers["actor"] = adam(self.actor.parameters(), lr=cfg.lr_actor)

    # ------------------------------------------------------------------------------------ zero-shot
    def reward_inference(self, features: Tensor, reward: Tensor) -> tuple[Tensor, dict[str, Any]]:
        z, solution = lstsq_task(features, reward)
        return z, {"z_lstsq": solution}

    # ------------------------------------------------------------------------------------- training
    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        """One TD-JEPA update (steps 1-6 above): the model's loss, the actor step, the EMA targets."""
        out = self.world_model.loss(batch.to(self.device), self.target_action)
        representation = [opt for name, opt in self._optimizers.items() if name != "actor"]
        for opt in representation:
            opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        for opt in representation:
            opt.step()

        actor_loss, q = self.actor_step(out["phi_features"], out["z"])
        self.world_model.update_targets()
        metrics = {k: v for k, v in out.items() if k not in ("loss", "z", "phi_features")}
        return scalar_metrics({**metrics, "total_loss": out["loss"], "actor_loss": actor_loss, "q": q}, self.device)

    def actor_step(self, phi_features: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """One actor step on ``-mean_b mean_e T_phi(phi(s), a~, z)[e]^T z`` (encoders detached, §3)."""
        cfg, wm = self.config, self.world_model
        with torch.no_grad():
            phi = wm.phi_encoder.head(phi_features)
        action = self.actor(phi, z, cfg.actor_std).sample(clip=cfg.stddev_clip)
        q = (wm.phi_predictor(phi, action, z) * z).sum(-1).mean(0)  # [B], ensemble mean
        loss = -q.mean()
        opt = self._optimizers["actor"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), q.detach().mean()
