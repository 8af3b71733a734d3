"""RND: Random Network Distillation (Burda et al., 2019) driving DDPG, as URLB codes it.

ExoRL collects its reward-free datasets with this agent. A predictor network is trained to match a
frozen, randomly initialised target network on the (encoded) observation; the prediction error is
the intrinsic reward, high on rarely seen states. The actor-critic maximises the intrinsic reward
only: the extrinsic reward is ignored, so the data the policy collects is reward-free.

One update on a batch of transitions (URLB ``agent/rnd.py`` and ``agent/ddpg.py``):

1. ``h = encoder(aug(pixels))`` (pixels: DrQ-v2 trunk with random shifts) or ``h = state``;
   ``h' = encoder(aug(next pixels))`` without gradients.
2. RND: ``e(h) = mean_k (f_pred(n(h)) - f_target(n(h)))_k**2`` with ``n`` a running mean / std
   normalisation clipped to [-5, 5]; one Adam step on ``mean(e)`` (``h`` detached).
3. Intrinsic reward ``r = rnd_scale * e(h) / (std_e + 1e-8)`` with the updated predictor and
   ``std_e`` the running std of the prediction errors (its statistics updated with this batch).
4. DDPG critic step on ``r + gamma * (1 - terminated) * min Q'(h', a')`` (the encoder is trained by
   the critic loss), actor step on ``-min Q(h, a)`` (``h`` detached), Polyak update of ``Q'``.

Differences from URLB, on purpose:

- Transitions are 1-step (URLB: n-step returns with ``nstep=3``), because the replay buffer samples
  single transitions; everything else about the TD target is the same.
- The observation normaliser is a running mean / std over all batches (Burda et al.'s) rather than
  URLB's ``BatchNorm1d(affine=False)``, which in training normalises by the statistics of the
  current batch; with running statistics the reward of one observation does not depend on the
  rest of its batch, so :meth:`RNDAgent.intrinsic_reward` works on any batch size.
- Truncation does not stop bootstrapping; termination does (URLB's DMC tasks never terminate).

As in URLB, the intrinsic reward is a function of the observation ``s`` of a transition
``(s, a, s')``, not of ``s'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from latentrl.agents.actor_critic import DDPGActorCritic, DeterministicActor, TwinQCritic, schedule
from latentrl.agents.base import (
    Agent,
    Policy,
    SampleSpec,
    Task,
    UnsupportedTaskError,
    resolve_device,
    scalar_metrics,
)
from latentrl.world_models.encoders import RandomShiftsAug, make_encoder
from latentrl.world_models.layers import RunningMeanStd, make_adam, weight_init
from latentrl.world_models.rnd import RandomNetworkDistillation, RNDModel

__all__ = ["PRESETS", "RNDAgent", "RNDConfig", "RNDPolicy", "RandomNetworkDistillation"]

OBS_TYPES = ("pixels", "state")


@dataclass
class RNDConfig:
    """RND + DDPG hyperparameters; the defaults are URLB's (``agent/rnd.yaml``, ``pretrain.yaml``)."""

    obs_type: Literal["pixels", "state"] = "state"
    """Observation the agent reads: ``"state"`` (ExoRL collected its datasets from states) or ``"pixels"``."""
    frame_stack: int = 3
    """Frames stacked along channels for pixel observations (ignored for states)."""
    image_pad: int = 4
    """Random-shift augmentation pad in pixels (DrQ-v2 / URLB ``RandomShiftsAug(pad=4)``); pixels only."""
    hidden_dim: int = 1024
    """Width of the actor, critic and RND MLPs."""
    feature_dim: int = 50
    """Actor / critic trunk width (Linear-LayerNorm-Tanh) for pixels; for states it is ``hidden_dim``."""
    rnd_rep_dim: int = 512
    """Output size of the RND predictor and target networks."""
    rnd_scale: float = 1.0
    """Multiplier of the normalised prediction error in the intrinsic reward."""
    rnd_obs_clip: float = 5.0
    """The normalised RND input is clipped to ``[-rnd_obs_clip, rnd_obs_clip]``."""
    lr: float = 1e-4
    """Adam learning rate of the encoder, actor, critic and RND predictor."""
    batch_size: int = 1024
    """Transitions per update."""
    discount: float = 0.99
    """Discount factor gamma."""
    critic_target_tau: float = 0.01
    """Polyak rate of the target critic."""
    stddev_schedule: float | str = 0.2
    """Std of the actor's exploration noise: a number or ``"linear(init,final,steps)"`` over env steps."""
    stddev_clip: float = 0.3
    """Clip of the target-policy smoothing noise (critic target and actor loss)."""
    num_seed_steps: int = 4000
    """Env (agent) steps with uniform random actions before the exploring policy uses the actor. URLB:
    ``num_seed_frames`` 4000 / action repeat (1 for states; its pixel runs use 2, i.e. 2000 steps), and
    no updates before then (latentrl's trainer: ``learning_starts``, 4000 by default)."""
    update_every_steps: int = 2
    """URLB's cadence: one update every this many env steps (latentrl's trainer: ``updates_per_step``
    = 1 / update_every_steps, 0.5 by default)."""

    def __post_init__(self) -> None:
        if self.obs_type not in OBS_TYPES:
            raise ValueError(f"RNDConfig.obs_type must be one of {OBS_TYPES}, got {self.obs_type!r}")
        if self.frame_stack < 1:
            raise ValueError(f"RNDConfig.frame_stack must be >= 1, got {self.frame_stack}")
        schedule(self.stddev_schedule, 0)  # fails early on a malformed schedule


PRESETS: dict[str, dict[str, Any]] = {
    # URLB's published setting (agent/rnd.yaml, pretrain.yaml).
    "paper": {},
    # Trains on a 2-core CPU.
    "small": {"hidden_dim": 256, "batch_size": 256, "rnd_rep_dim": 128, "num_seed_steps": 1000},
    # Tiny networks for end-to-end smoke tests.
    "smoke": {"hidden_dim": 32, "feature_dim": 16, "rnd_rep_dim": 16, "batch_size": 32, "num_seed_steps": 50},
}


class RNDPolicy(Policy):
    """The RND agent's policy: the deterministic actor's mean, or with ``explore`` its noisy sample.

    Holds the observation encoder and the actor (shared with the agent, so it follows training).
    While ``env_steps`` (the agent's counter, shared as a 0-dim tensor) is below ``num_seed_steps``
    an exploring policy draws uniform random actions in [-1, 1]; the exploration std follows
    ``stddev_schedule`` at ``env_steps``. The carry holds only the frame stack.
    """

    def __init__(self, encoder: nn.Module, actor: DeterministicActor, *, obs_key: str, obs_shape: tuple[int, ...],
                 frame_stack: int, num_seed_steps: int, stddev_schedule: float | str, env_steps: Tensor,
                 explore: bool = False):
        super().__init__(obs_key, obs_shape, actor.policy[-1].out_features, frame_stack=frame_stack,
                         explore=explore)
        self.encoder, self.actor = encoder, actor
        self.num_seed_steps, self.stddev_schedule = int(num_seed_steps), stddev_schedule
        self.env_steps = env_steps

    def act(self, x: Tensor, carry: TensorDict, is_first: Tensor) -> tuple[Tensor, TensorDict]:
        steps = int(self.env_steps)
        if self.explore and steps < self.num_seed_steps:
            return torch.rand(x.shape[0], self.action_dim, device=x.device) * 2.0 - 1.0, carry
        dist = self.actor(self.encoder(x), schedule(self.stddev_schedule, steps))
        return (dist.sample() if self.explore else dist.mean), carry


class RNDAgent(Agent):
    """RND exploration with a DDPG actor-critic trained on the intrinsic reward only.

    ``obs_shape`` is one env frame ``[3, H, W]`` (pixels; ``frame_stack`` of them are stacked) or
    ``[D]`` (state). Build it from an env with :meth:`from_env` (or ``make_agent("rnd", env)``).
    The trainer advances :attr:`env_steps` (or calls :meth:`observe_env_steps`): it sets the
    exploration schedule and ends the uniform-random seed phase.
    """

    config_class = RNDConfig
    presets = PRESETS
    inference_modules = ("world_model", "actor_critic.actor")
    inference_exclude = ("world_model.rnd.",)

    name = "rnd"

    def __init__(
        self,
        config: RNDConfig,
        obs_shape: tuple[int, ...],
        action_dim: int,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        self.config = cfg = config
        self.device = resolve_device(device)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.action_dim = int(action_dim)
        self.env_steps = 0  # env steps collected so far (all envs together); set by the trainer

        pixels = cfg.obs_type == "pixels"
        if pixels:
            if len(self.obs_shape) != 3:
                raise ValueError(f"obs_type=pixels needs a frame shape [3, H, W], got {list(self.obs_shape)}")
            c, h, w = self.obs_shape
            encoder, aug = make_encoder("drq", (c * cfg.frame_stack, h, w)), RandomShiftsAug(cfg.image_pad)
        else:
            if len(self.obs_shape) != 1:
                raise ValueError(f"obs_type='state' needs a state shape [D], got {list(self.obs_shape)}")
            encoder, aug = make_encoder("identity", self.obs_shape), None
        encoder.apply(weight_init)
        obs_dim = encoder.repr_dim

        # URLB: pixels -> trunk feature_dim, 2 hidden layers, action after the critic trunk;
        # states -> trunk hidden_dim, 1 hidden layer, action inside the critic trunk.
        trunk_dim = cfg.feature_dim if pixels else cfg.hidden_dim
        layers = 2 if pixels else 1
        self.actor_critic = DDPGActorCritic(
            DeterministicActor(obs_dim, self.action_dim, trunk_dim, cfg.hidden_dim, layers),
            TwinQCritic(
                obs_dim, self.action_dim, trunk_dim, cfg.hidden_dim, layers, action_in_trunk=not pixels
            ),
        )
        rnd = RandomNetworkDistillation(obs_dim, cfg.hidden_dim, cfg.rnd_rep_dim, cfg.rnd_obs_clip)
        self.world_model = RNDModel(encoder, cfg.obs_type, rnd, aug=aug)
        self.intrinsic_reward_rms = RunningMeanStd((1,))
        self.to(self.device)

        adam = lambda params: make_adam(params, lr=cfg.lr)
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        if pixels:
            self._optimizers["encoder"] = adam(self.world_model.encoder.parameters())
        self._optimizers["actor"] = adam(self.actor.parameters())
        self._optimizers["critic"] = adam(self.actor_critic.critic.parameters())
        self._optimizers["rnd"] = adam(self.rnd.predictor.parameters())

    @property
    def rnd(self) -> RandomNetworkDistillation:
        """The distillation pair (``world_model.rnd``)."""
        return self.world_model.rnd

    @property
    def actor(self) -> DeterministicActor:
        return self.actor_critic.actor

    @property
    def frame_stack(self) -> int:
        return self.config.frame_stack if self.config.obs_type == "pixels" else 1

    def observe_env_steps(self, n: int) -> None:
        """Count ``n`` more env steps (all envs together)."""
        self.env_steps += int(n)

    def sample_spec(self) -> SampleSpec:
        cfg = self.config
        return SampleSpec(batch_size=cfg.batch_size, frame_stack=self.frame_stack, keys=(cfg.obs_type,))

    def policy(self, task: Task | None = None, *, explore: bool = False) -> RNDPolicy:
        if task is not None:
            raise UnsupportedTaskError(
                "RND's policy is not task-conditioned (it explores by novelty); "
                "call agent.policy() without a task"
            )
        cfg = self.config
        return RNDPolicy(self.world_model.encoder, self.actor, obs_key=cfg.obs_type, obs_shape=self.obs_shape,
                         frame_stack=self.frame_stack,
                         num_seed_steps=cfg.num_seed_steps, stddev_schedule=cfg.stddev_schedule,
                         env_steps=self.env_steps_counter, explore=explore)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self._optimizers)

    def _normalise_reward(self, prediction_error: Tensor) -> Tensor:
        return self.config.rnd_scale * prediction_error / (self.intrinsic_reward_rms.std + 1e-8)

    @torch.no_grad()
    def intrinsic_reward(self, obs: TensorDict) -> Tensor:
        """Intrinsic reward ``[B, 1]`` of observations ``[B]`` (stacked ``pixels`` or ``state``).

        Reads the running statistics without changing them and applies no augmentation.
        """
        h = self.world_model.encode(obs.select(self.world_model.obs_key).to(self.device))
        return self._normalise_reward(self.world_model.prediction_error(h))

    def update(self, batch: TensorDict) -> dict[str, Tensor]:
        cfg = self.config
        batch = batch.to(self.device)
        key = self.world_model.obs_key
        action = batch["action"].float()
        not_terminated = 1.0 - batch["next", "terminated"].float().reshape(-1, 1)
        discount = cfg.discount * not_terminated
        std = schedule(cfg.stddev_schedule, self.env_steps)

        obs = self.world_model.encode(batch.select(key), augment=True)
        with torch.no_grad():
            next_obs = self.world_model.encode(batch["next"].select(key), augment=True)

        # RND predictor step on the detached features, then the reward with the updated predictor.
        rnd_loss = self.world_model.loss(batch, features=obs)["loss"]
        self._optimizers["rnd"].zero_grad(set_to_none=True)
        rnd_loss.backward()
        self._optimizers["rnd"].step()
        with torch.no_grad():
            error = self.world_model.prediction_error(obs.detach())
            self.intrinsic_reward_rms.update(error)
            reward = self._normalise_reward(error)

        critic_loss, metrics = self.actor_critic.critic_loss(
            obs, action, reward, discount, next_obs, std, cfg.stddev_clip
        )
        encoder_opt = self._optimizers.get("encoder")
        if encoder_opt is not None:
            encoder_opt.zero_grad(set_to_none=True)
        self._optimizers["critic"].zero_grad(set_to_none=True)
        critic_loss.backward()
        self._optimizers["critic"].step()
        if encoder_opt is not None:
            encoder_opt.step()

        actor_loss, actor_metrics = self.actor_critic.actor_loss(obs.detach(), std, cfg.stddev_clip)
        self._optimizers["actor"].zero_grad(set_to_none=True)
        actor_loss.backward()
        self._optimizers["actor"].step()

        self.actor_critic.update_target(cfg.critic_target_tau)

        metrics.update(actor_metrics)
        metrics.update(
            rnd_loss=rnd_loss.detach(),
            intrinsic_reward_mean=reward.mean(),
            intrinsic_reward_std=reward.std(),
            prediction_error_mean=self.intrinsic_reward_rms.mean.squeeze(),
            prediction_error_std=self.intrinsic_reward_rms.std.squeeze(),
        )
        return scalar_metrics(metrics, self.device)  # tensors: no host sync per update

    def extra_state(self) -> dict[str, Any]:
        def stats(rms: RunningMeanStd) -> dict[str, Tensor]:
            return {name: buf.detach().cpu().clone() for name, buf in rms.named_buffers()}

        return {
            "env_steps": self.env_steps,
            "obs_rms": stats(self.rnd.obs_rms),
            "intrinsic_reward_rms": stats(self.intrinsic_reward_rms),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.env_steps = int(state.get("env_steps", 0))
        for name, rms in (("obs_rms", self.rnd.obs_rms), ("intrinsic_reward_rms", self.intrinsic_reward_rms)):
            if name in state:
                rms.load_state_dict(state[name])
