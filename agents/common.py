"""Actor-critic pieces shared by agents: DDPG as URLB / ExoRL code it, and the helpers around it.

What is here (URLB ``utils.py`` and ``agent/ddpg.py`` are the reference; the code is our own):

- :func:`schedule`: a constant or a ``linear(init, final, duration)`` / ``step_linear(...)`` schedule.
- :func:`weight_init`: orthogonal init, zero bias (ReLU gain for convolutions).
- :func:`soft_update_params`: Polyak averaging of a target network.
- :class:`TruncatedNormal`: the exploration distribution of DrQ-v2 / URLB deterministic actors.
- :class:`RunningMeanStd`: running mean / variance (parallel-moments update) for normalisation.
- :class:`DeterministicActor`, :class:`TwinQCritic`, :class:`DDPGActorCritic`: the DDPG actor,
  its twin-Q critic with a target copy, and their losses. Agents own the optimizers and the order
  of the steps; these classes only compute.
- :class:`TanhNormal`, :class:`TanhGaussianActor`, :func:`xavier_init` and the SAC loss functions
  :func:`sac_td_target`, :func:`sac_critic_loss`, :func:`sac_actor_loss`, :func:`sac_alpha_loss`:
  soft actor-critic as garage / METRA code it (``iod/sac_utils.py``), as pure tensor functions so
  that agents with their own encoders (METRA: one per network) compose them.
- :class:`ZConditionedActor`, :class:`ZPolicy`, :class:`ZeroShotAgent`: the task-conditioned actor
  ``pi(phi(s), z)``, its policy holding ``z`` per episode, and the agent base shared by TD-JEPA and
  FB (construction from presets, ``sample_spec``, ``policy``, ``infer_task``).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor, nn
from torch.distributions import Normal

from latentrl.agents.base import (
    Agent,
    GoalObservation,
    Policy,
    RewardSamples,
    SampleSpec,
    Task,
    UnsupportedTaskError,
)
from latentrl.world_models.sphere import project_to_sphere, sample_sphere
from latentrl.world_models.td_jepa import TDJEPAModel, mlp_embedding

__all__ = [
    "DDPGActorCritic",
    "DeterministicActor",
    "RunningMeanStd",
    "TanhGaussianActor",
    "TanhNormal",
    "TruncatedNormal",
    "TwinQCritic",
    "ZConditionedActor",
    "ZPolicy",
    "ZeroShotAgent",
    "check_zero_shot_config",
    "heldout_linear_r2",
    "mlp",
    "resolve_device",
    "sac_actor_loss",
    "sac_alpha_loss",
    "sac_critic_loss",
    "sac_td_target",
    "schedule",
    "soft_update_params",
    "weight_init",
    "xavier_init",
]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_LINEAR = re.compile(r"^\s*linear\(([^,]+),([^,]+),([^,]+)\)\s*$")
_STEP_LINEAR = re.compile(r"^\s*step_linear\(([^,]+),([^,]+),([^,]+),([^,]+),([^,]+)\)\s*$")


def schedule(spec: float | str, step: int) -> float:
    """Value of a schedule at ``step`` (the DrQ-v2 / URLB ``utils.schedule`` format).

    ``spec`` is a number (constant), ``"linear(init, final, duration)"`` (from ``init`` to
    ``final`` over ``duration`` steps, then constant) or
    ``"step_linear(init, final1, duration1, final2, duration2)"`` (two linear pieces).
    """
    if isinstance(spec, (int, float)):
        return float(spec)
    try:
        return float(spec)
    except ValueError:
        pass
    if match := _LINEAR.match(spec):
        init, final, duration = (float(g) for g in match.groups())
        mix = min(max(step / duration, 0.0), 1.0)
        return (1.0 - mix) * init + mix * final
    if match := _STEP_LINEAR.match(spec):
        init, final1, duration1, final2, duration2 = (float(g) for g in match.groups())
        if step <= duration1:
            mix = min(max(step / duration1, 0.0), 1.0)
            return (1.0 - mix) * init + mix * final1
        mix = min(max((step - duration1) / duration2, 0.0), 1.0)
        return (1.0 - mix) * final1 + mix * final2
    raise ValueError(
        f"unknown schedule {spec!r}; use a number, 'linear(init,final,duration)' or "
        "'step_linear(init,final1,duration1,final2,duration2)'"
    )


def weight_init(module: nn.Module) -> None:
    """Orthogonal weights and zero biases for Linear; orthogonal with ReLU gain for convolutions.

    Use as ``net.apply(weight_init)``.
    """
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight.data)
        if module.bias is not None:
            module.bias.data.fill_(0.0)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.orthogonal_(module.weight.data, nn.init.calculate_gain("relu"))
        if module.bias is not None:
            module.bias.data.fill_(0.0)


@torch.no_grad()
def soft_update_params(net: nn.Module, target: nn.Module, tau: float) -> None:
    """Polyak averaging ``target <- tau * net + (1 - tau) * target``, parameter by parameter."""
    for param, target_param in zip(net.parameters(), target.parameters(), strict=True):
        target_param.lerp_(param, tau)


class TruncatedNormal(Normal):
    """A Normal whose samples are clamped to ``(low, high)`` with a straight-through gradient.

    ``sample(clip)`` clips the noise to ``[-clip, clip]`` before adding it to the mean (TD3-style
    target smoothing); ``mean`` is ``loc``. ``log_prob`` and ``entropy`` are the untruncated
    Normal's, as in DrQ-v2 / URLB.
    """

    def __init__(self, loc: Tensor, scale: Tensor, low: float = -1.0, high: float = 1.0, eps: float = 1e-6):
        super().__init__(loc, scale, validate_args=False)
        self.low, self.high, self.eps = low, high, eps

    def _clamp(self, x: Tensor) -> Tensor:
        clamped = torch.clamp(x, self.low + self.eps, self.high - self.eps)
        return x - x.detach() + clamped.detach()

    def sample(self, clip: float | None = None, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device) * self.scale
        if clip is not None:
            noise = torch.clamp(noise, -clip, clip)
        return self._clamp(self.loc + noise)


class RunningMeanStd(nn.Module):
    """Running mean and variance over all samples seen (Chan et al.'s parallel update).

    Starts at mean 0, variance 1 and a pseudo-count ``epsilon`` (OpenAI baselines / URLB ``RMS``);
    the batch variance is the unbiased one, as URLB's. The statistics are buffers, so they travel
    with ``state_dict``.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(epsilon, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold in a batch ``[N, *shape]`` (N >= 2 for a variance; N = 1 updates the mean only)."""
        x = x.detach().reshape(-1, *self.mean.shape).to(self.mean.dtype)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(dim=0)
        batch_var = x.var(dim=0) if n > 1 else torch.zeros_like(batch_mean)
        total = self.count + n  # tensors throughout: no host sync on accelerators
        dtype = self.mean.dtype
        old_share, new_share = (self.count / total).to(dtype), (n / total).to(dtype)
        delta = batch_mean - self.mean
        self.mean.add_(delta * new_share)
        # Pooled M2 / total: within-batch parts plus the between-batch term count * n / total * delta^2.
        self.var.copy_(self.var * old_share + batch_var * new_share + delta.square() * old_share * new_share)
        self.count.copy_(total)

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def normalize(self, x: Tensor, clip: float | None = None, eps: float = 1e-8) -> Tensor:
        """``(x - mean) / sqrt(var + eps)``, optionally clipped to ``[-clip, clip]``."""
        out = (x - self.mean) / torch.sqrt(self.var + eps)
        return out.clamp(-clip, clip) if clip is not None else out


def mlp(in_dim: int, hidden_dims: tuple[int, ...] | list[int], out_dim: int) -> nn.Sequential:
    """Linear -> ReLU for each hidden width, then a final Linear to ``out_dim``."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden_dims:
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


def _trunk(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> Tanh: the DrQ-v2 / URLB trunk in front of actors and critics."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.Tanh())


class DeterministicActor(nn.Module):
    """DDPG actor: trunk (Linear-LayerNorm-Tanh to ``feature_dim``), an MLP, ``tanh`` mean.

    ``forward(obs [B, D], std)`` returns a :class:`TruncatedNormal` on [-1, 1] around the mean with
    a fixed ``std`` (the exploration schedule). URLB uses ``feature_dim=50`` and two hidden layers
    for pixels, ``feature_dim=hidden_dim`` and one hidden layer for states.
    """

    def __init__(
        self, obs_dim: int, action_dim: int, feature_dim: int, hidden_dim: int, num_hidden_layers: int = 2
    ):
        super().__init__()
        self.trunk = _trunk(obs_dim, feature_dim)
        self.policy = mlp(feature_dim, [hidden_dim] * num_hidden_layers, action_dim)
        self.apply(weight_init)

    def forward(self, obs: Tensor, std: float) -> TruncatedNormal:
        mu = torch.tanh(self.policy(self.trunk(obs)))
        return TruncatedNormal(mu, torch.full_like(mu, std))


class TwinQCritic(nn.Module):
    """Two Q heads on a shared trunk: ``forward(obs [B, D], action [B, A]) -> (q1, q2)``, each ``[B, 1]``.

    With ``action_in_trunk`` (URLB's state path) the trunk reads ``obs ‖ action``; otherwise (the
    pixel path) the trunk reads ``obs`` and the action is concatenated after it.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        feature_dim: int,
        hidden_dim: int,
        num_hidden_layers: int = 2,
        action_in_trunk: bool = False,
    ):
        super().__init__()
        self.action_in_trunk = action_in_trunk
        if action_in_trunk:
            self.trunk = _trunk(obs_dim + action_dim, feature_dim)
            head_in = feature_dim
        else:
            self.trunk = _trunk(obs_dim, feature_dim)
            head_in = feature_dim + action_dim
        self.q1 = mlp(head_in, [hidden_dim] * num_hidden_layers, 1)
        self.q2 = mlp(head_in, [hidden_dim] * num_hidden_layers, 1)
        self.apply(weight_init)

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        if self.action_in_trunk:
            h = self.trunk(torch.cat([obs, action], dim=-1))
        else:
            h = torch.cat([self.trunk(obs), action], dim=-1)
        return self.q1(h), self.q2(h)


class DDPGActorCritic(nn.Module):
    """DDPG with a twin-Q critic and clipped target noise, as URLB's ``DDPGAgent`` computes it.

    Critic target: ``r + discount * min(Q1', Q2')(s', a')`` with ``a' ~ actor(s')`` (noise clipped to
    ``stddev_clip``) and ``Q'`` the Polyak-averaged target critic; loss ``MSE(Q1) + MSE(Q2)``.
    Actor loss: ``-min(Q1, Q2)(s, a)`` with ``a ~ actor(s)`` (clipped noise, straight-through).
    """

    def __init__(self, actor: DeterministicActor, critic: TwinQCritic):
        super().__init__()
        self.actor = actor
        self.critic = critic
        self.critic_target = copy.deepcopy(critic).requires_grad_(False)

    def critic_loss(
        self,
        obs: Tensor,
        action: Tensor,
        reward: Tensor,
        discount: Tensor,
        next_obs: Tensor,
        std: float,
        stddev_clip: float,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``reward``, ``discount``: ``[B, 1]`` (discount already holds ``gamma * (1 - terminated)``)."""
        with torch.no_grad():
            next_action = self.actor(next_obs, std).sample(clip=stddev_clip)
            target_q1, target_q2 = self.critic_target(next_obs, next_action)
            target_q = reward + discount * torch.min(target_q1, target_q2)
        q1, q2 = self.critic(obs, action)
        loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        metrics = {"critic_loss": loss, "q_mean": q1, "q2_mean": q2, "critic_target_q": target_q}
        return loss, {k: v.detach().mean() for k, v in metrics.items()}

    def actor_loss(self, obs: Tensor, std: float, stddev_clip: float) -> tuple[Tensor, dict[str, Tensor]]:
        dist = self.actor(obs, std)
        action = dist.sample(clip=stddev_clip)
        q1, q2 = self.critic(obs, action)
        loss = -torch.min(q1, q2).mean()
        return loss, {"actor_loss": loss.detach(), "actor_stddev": torch.tensor(std, device=loss.device)}

    def update_target(self, tau: float) -> None:
        soft_update_params(self.critic, self.critic_target, tau)



# ------------------------------------------------------------------------------------------- SAC


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for Linear layers (garage's MLP default).

    Use as ``net.apply(xavier_init)``.
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TanhNormal:
    """``tanh(u)`` with ``u ~ Normal(loc, scale)`` per dimension: SAC's squashed Gaussian (garage's).

    ``log_prob`` sums over the last dim, subtracting ``log(1 - a**2 + eps)`` (``eps`` = 1e-6) for
    the squashing; ``mean`` is ``tanh(loc)``, the deterministic action.
    """

    def __init__(self, loc: Tensor, scale: Tensor, eps: float = 1e-6):
        self.normal = Normal(loc, scale, validate_args=False)
        self.eps = eps

    @property
    def mean(self) -> Tensor:
        return torch.tanh(self.normal.loc)

    @property
    def stddev(self) -> Tensor:
        return self.normal.scale

    def rsample_with_pre_tanh(self) -> tuple[Tensor, Tensor]:
        """A reparameterised sample: ``(u, tanh(u))``, each ``[*, A]``."""
        pre_tanh = self.normal.rsample()
        return pre_tanh, torch.tanh(pre_tanh)

    def sample(self) -> Tensor:
        with torch.no_grad():
            return torch.tanh(self.normal.sample())

    def log_prob(self, action: Tensor, pre_tanh: Tensor | None = None) -> Tensor:
        """``[*]`` log-density of actions ``[*, A]`` (pass ``pre_tanh`` when known: exact, no atanh)."""
        if pre_tanh is None:
            pre_tanh = torch.atanh(action.clamp(-1.0 + self.eps, 1.0 - self.eps))
        squash = torch.log((1.0 - action.square()).clamp(0.0, 1.0) + self.eps)
        return (self.normal.log_prob(pre_tanh) - squash).sum(dim=-1)


class TanhGaussianActor(nn.Module):
    """An MLP with a mean head and a log-std head giving a :class:`TanhNormal` (garage's two-headed module).

    ``forward(x [B, D]) -> TanhNormal`` over ``[B, A]``. Hidden layers use ``activation`` (garage's
    default, and METRA's policy, is ``tanh``) with Xavier-uniform weights; the output layer is
    Xavier-normal (gain 1), the mean bias 0 and the log-std bias ``log(init_std)``; the log-std is
    clamped to ``[log(min_std), log(max_std)]``.
    """

    def __init__(
        self,
        in_dim: int,
        action_dim: int,
        hidden_dims: tuple[int, ...] | list[int],
        activation: str = "tanh",
        init_std: float = 1.0,
        min_std: float = 1e-6,
        max_std: float = math.exp(2.0),
    ):
        super().__init__()
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(acts)}")
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden_dims:
            layers += [nn.Linear(prev, width), acts[activation]()]
            prev = width
        self.trunk = nn.Sequential(*layers)
        self.trunk.apply(xavier_init)
        self.mean_head = nn.Linear(prev, action_dim)
        self.log_std_head = nn.Linear(prev, action_dim)
        for head, bias in ((self.mean_head, 0.0), (self.log_std_head, math.log(init_std))):
            nn.init.xavier_normal_(head.weight, gain=1.0)
            nn.init.constant_(head.bias, bias)
        self.log_std_min, self.log_std_max = math.log(min_std), math.log(max_std)

    def forward(self, x: Tensor) -> TanhNormal:
        h = self.trunk(x)
        log_std = self.log_std_head(h).clamp(self.log_std_min, self.log_std_max)
        return TanhNormal(self.mean_head(h), log_std.exp())


def sac_td_target(
    reward: Tensor, discount: Tensor, next_q1: Tensor, next_q2: Tensor, next_log_prob: Tensor, alpha: Tensor | float
) -> Tensor:
    """Soft TD target ``r + discount * (min(Q1', Q2') - alpha * log pi(a'|s'))`` without gradients.

    All tensors share one shape (e.g. ``[B]``); ``discount`` already holds ``gamma * (1 - terminated)``.
    """
    with torch.no_grad():
        return reward + discount * (torch.min(next_q1, next_q2) - alpha * next_log_prob)


def sac_critic_loss(q1: Tensor, q2: Tensor, target: Tensor) -> Tensor:
    """``0.5 * MSE(Q1, y) + 0.5 * MSE(Q2, y)`` (garage's critic weight 0.5)."""
    return 0.5 * F.mse_loss(q1, target) + 0.5 * F.mse_loss(q2, target)


def sac_actor_loss(log_prob: Tensor, q1: Tensor, q2: Tensor, alpha: Tensor | float) -> Tensor:
    """``mean(alpha * log pi(a|s) - min(Q1, Q2)(s, a))`` with ``a`` reparameterised (``alpha`` detached)."""
    return (alpha * log_prob - torch.min(q1, q2)).mean()


def sac_alpha_loss(log_alpha: Tensor, log_prob: Tensor, target_entropy: float) -> Tensor:
    """``-mean(log_alpha * (log pi(a|s) + target_entropy))``: the temperature rises while entropy is low.

    As in garage / METRA the gradient is taken w.r.t. ``log_alpha``.
    """
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


# ---------------------------------------------------------------------- z-conditioned zero-shot agents


class ZConditionedActor(nn.Module):
    """The TD-JEPA / FB actor ``pi(latent, z)`` (the reference code's ``simple`` actor).

    ``embed_z(latent || z)`` and ``embed_s(latent)`` (each Linear-LayerNorm-Tanh then Linear-ReLU to
    ``hidden_dim / 2``) are concatenated, then ``hidden_layers`` x Linear-ReLU and a Linear give the
    mean ``tanh(.)``; ``forward(latent [B, D], z [B, d], std)`` returns a :class:`TruncatedNormal` on
    [-1, 1] with that fixed ``std``.
    """

    def __init__(self, latent_dim: int, z_dim: int, action_dim: int, hidden_dim: int = 1024,
                 hidden_layers: int = 1, embedding_layers: int = 2):
        super().__init__()
        self.embed_z = mlp_embedding(latent_dim + z_dim, hidden_dim, embedding_layers)
        self.embed_s = mlp_embedding(latent_dim, hidden_dim, embedding_layers)
        self.policy = mlp(2 * (hidden_dim // 2), [hidden_dim] * hidden_layers, action_dim)

    def forward(self, latent: Tensor, z: Tensor, std: float) -> TruncatedNormal:
        embedding = torch.cat([self.embed_s(latent), self.embed_z(torch.cat([latent, z], dim=-1))], dim=-1)
        mu = torch.tanh(self.policy(embedding))
        return TruncatedNormal(mu, torch.full_like(mu, std))


class ZPolicy(Policy):
    """A policy ``pi(phi(s), z)`` holding one task vector ``z`` per env for a whole episode.

    With a task, ``z`` is the task's (``[d]`` for every env, or ``[num_envs, d]``); without one, each
    env draws ``z`` uniformly on the sphere of radius ``sqrt(d)`` at its episode start (the
    pre-training prior), redrawn by :meth:`reset`. ``explore`` samples the actor's noise
    (``actor_std``); otherwise the deterministic mean acts. It reads the agent's live networks.
    """

    def __init__(self, agent: ZeroShotAgent, z: Tensor | None = None, explore: bool = False):
        super().__init__(frame_stack=agent.frame_stack)
        self.agent, self.explore = agent, explore
        if z is not None:
            z = z.detach().to(agent.device, torch.float32)
            z = z.reshape(1, -1) if z.dim() == 1 else z
            if z.dim() != 2 or z.shape[-1] != agent.z_dim:
                raise ValueError(f"task z must be [{agent.z_dim}] or [num_envs, {agent.z_dim}], got {list(z.shape)}")
        self.task_z = z
        self._z: Tensor | None = None  # [num_envs, d] of the running episodes

    @property
    def z(self) -> Tensor | None:
        """The task vectors ``[num_envs, d]`` of the running episodes (``None`` before the first step)."""
        return self._z

    def reset(self, mask: Tensor | None = None) -> None:
        super().reset(mask)
        if mask is None or self._z is None:
            self._z = None
        elif self.task_z is None:
            redraw = mask.reshape(-1).to(self._z.device).bool()
            self._z[redraw] = sample_sphere(int(redraw.sum()), self.agent.z_dim, device=self._z.device)

    def _episode_z(self, num_envs: int) -> Tensor:
        if self._z is None or self._z.shape[0] != num_envs:
            if self.task_z is None:
                self._z = sample_sphere(num_envs, self.agent.z_dim, device=self.agent.device)
            elif self.task_z.shape[0] in (1, num_envs):
                self._z = self.task_z.expand(num_envs, -1).clone()
            else:
                raise ValueError(f"the task holds {self.task_z.shape[0]} task vectors but the observation "
                                 f"has {num_envs} envs; infer one per env or a single one")
        return self._z

    def act(self, obs: TensorDict) -> Tensor:
        agent = self.agent
        key = agent.world_model.obs_key
        if key not in obs.keys():
            raise KeyError(f"the {agent.name} policy reads {key!r}; the observation has keys "
                           f"{sorted(map(str, obs.keys()))}")
        out_device = obs[key].device
        latent = agent.world_model.encode(obs.select(key).to(agent.device))
        dist = agent.actor(latent, self._episode_z(latent.shape[0]), agent.config.actor_std)
        return (dist.sample() if self.explore else dist.mean).to(out_device)


def check_zero_shot_config(config: Any, pairs_why: str) -> None:
    """The checks shared by the zero-shot agents' configs (TD-JEPA, FB): ``obs_type``, ``frame_stack``,
    ``batch_size`` (>= 2, since ``pairs_why``) and ``train_goal_ratio``; errors name the config class."""
    name = type(config).__name__
    if config.obs_type not in ("pixels", "state"):
        raise ValueError(f"{name}.obs_type must be 'pixels' or 'state', got {config.obs_type!r}")
    if config.frame_stack < 1:
        raise ValueError(f"{name}.frame_stack must be >= 1, got {config.frame_stack}")
    if config.batch_size < 2:
        raise ValueError(f"{name}.batch_size must be >= 2 ({pairs_why}), got {config.batch_size}")
    if not 0.0 <= config.train_goal_ratio <= 1.0:
        raise ValueError(f"{name}.train_goal_ratio must be in [0, 1], got {config.train_goal_ratio}")


def heldout_linear_r2(features: Tensor, reward: Tensor, seed: int = 0) -> float:
    """How much of a reward the task features explain linearly: the R^2, on a held-out random half of
    the samples, of the least-squares fit ``features @ w ~ reward`` made on the other half.

    ``features`` ``[N, d]``, ``reward`` ``[N, 1]``. TD-JEPA's health check (spec §12.5) wants it > 0
    for every task; near 1 the reward lies in the span of the features. NaN with fewer than
    ``2 * (d + 1)`` samples.
    """
    n, d = features.shape
    if n < 2 * (d + 1):
        return float("nan")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(features.device)
    fit, held = order[: n // 2], order[n // 2:]
    x, r = features.double(), reward.double().reshape(-1, 1)
    w = torch.linalg.lstsq(x[fit], r[fit]).solution
    residual = ((x[held] @ w - r[held]) ** 2).sum()
    total = ((r[held] - r[held].mean()) ** 2).sum()
    return float(1.0 - residual / total) if total > 0 else float("nan")


class ZeroShotAgent(Agent):
    """Shared by TD-JEPA and FB: a z-conditioned actor on a :class:`TDJEPAModel`, zero-shot by inference.

    Subclasses set ``config_class`` (a dataclass with ``obs_type``, ``frame_stack``, ``batch_size``,
    ``discount``, ``actor_std``), ``presets`` (``paper`` / ``small`` / ``smoke``), optional
    ``pixel_presets`` / ``state_presets`` applied on top when the agent reads pixels / states, build
    ``world_model``, ``actor`` and ``_optimizers``, and implement :meth:`update` and
    :meth:`reward_inference`. Goals are ``project(encode_task(g))``.
    """

    world_model: TDJEPAModel
    actor: ZConditionedActor
    inference_chunk_size: int = 4096
    """Observations encoded at once by :meth:`infer_task`."""

    def __init__(self, config: Any, obs_shape: tuple[int, ...], action_dim: int, device: str | torch.device = "cpu"):
        super().__init__()
        self.config = config
        self.device = resolve_device(device)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.action_dim = int(action_dim)
        expected = 3 if config.obs_type == "pixels" else 1
        if len(self.obs_shape) != expected:
            want = "a frame shape [3, H, W]" if expected == 3 else "a state shape [D]"
            raise ValueError(f"obs_type={config.obs_type!r} needs {want}, got {list(self.obs_shape)}")
        self._optimizers: dict[str, torch.optim.Optimizer] = {}

    @property
    def frame_stack(self) -> int:
        return self.config.frame_stack if self.config.obs_type == "pixels" else 1

    @property
    def model_input_shape(self) -> tuple[int, ...]:
        """``[3 * frame_stack, H, W]`` for pixels, ``[D]`` for states."""
        if self.config.obs_type == "pixels":
            c, h, w = self.obs_shape
            return (c * self.frame_stack, h, w)
        return self.obs_shape

    @property
    def z_dim(self) -> int:
        return self.world_model.z_dim

    def sample_spec(self) -> SampleSpec:
        cfg = self.config
        return SampleSpec(batch_size=cfg.batch_size, frame_stack=self.frame_stack, keys=(cfg.obs_type,))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self._optimizers)

    # ------------------------------------------------------------------------------------- training
    def unpack_batch(self, batch: TensorDict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(s, s', a, gamma_t)`` of a replay batch: inputs ``[B, *]`` (pixels shifted independently),
        actions ``[B, A]``, ``gamma_t = discount * (1 - terminated')`` ``[B, 1]``."""
        wm = self.world_model
        batch = batch.to(self.device)
        obs, next_obs = wm.augment(wm.observation(batch)), wm.augment(wm.observation(batch["next"]))
        terminated = batch["next", "terminated"].reshape(-1, 1)
        discount = self.config.discount * (~terminated.bool()).float()
        return obs, next_obs, batch["action"].float(), discount

    @staticmethod
    def to_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
        values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()  # one sync
        return dict(zip(metrics, values, strict=True))

    # ------------------------------------------------------------------------------------ zero-shot
    def act(self, obs: TensorDict, z: Tensor, *, mean: bool = True) -> Tensor:
        """Actions ``[N, A]`` for observations ``[N]`` (stacked pixels or states) and ``z`` ``[N, d]``."""
        with torch.no_grad():
            dist = self.actor(self.world_model.encode(obs.to(self.device)), z.to(self.device), self.config.actor_std)
            return dist.mean if mean else dist.sample()

    def policy(self, task: Task | None = None, *, explore: bool = False) -> ZPolicy:
        """``pi(., z)`` with ``z`` fixed per episode: the task's, or without a task one drawn per episode."""
        if task is not None and task.z is None:
            raise UnsupportedTaskError(f"{self.name} acts on a task vector z; get one from agent.infer_task(...)")
        return ZPolicy(self, None if task is None else task.z, explore=explore)

    @torch.no_grad()
    def task_embedding(self, obs: TensorDict | Tensor) -> Tensor:
        """``encode_task`` (TD-JEPA's ``psi``, FB's ``B``) of observations ``[N]``, in chunks, no augmentation."""
        x = self.world_model.observation(obs)
        chunks = [self.world_model.encode_task(x[i:i + self.inference_chunk_size].to(self.device))
                  for i in range(0, x.shape[0], self.inference_chunk_size)]
        return torch.cat(chunks)

    def reward_inference(self, features: Tensor, reward: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """``z`` ``[d]`` (and extra info) from embeddings ``[N, d]`` of next states and rewards ``[N, 1]``."""
        raise NotImplementedError

    @torch.no_grad()
    def infer_task(self, spec: RewardSamples | GoalObservation) -> Task:
        """Zero-shot task vector: from next observations and their rewards, or from a goal observation.

        ``RewardSamples``: ``obs`` ``[N]`` (stacked or single pixel frames, or states) of next states
        ``s'`` and ``reward`` ``[N, 1]`` with ``r = r(s')`` (relabel them with ``ReplayBuffer.relabel``);
        ``Task.z`` is ``[d]``. ``GoalObservation``: ``Task.z`` is ``project(encode_task(g))`` ``[num_envs, d]``.
        """
        if isinstance(spec, RewardSamples):
            reward = torch.as_tensor(spec.reward).reshape(-1, 1).float()
            features = self.task_embedding(spec.obs)
            if reward.shape[0] != features.shape[0]:
                raise ValueError(f"{features.shape[0]} observations but {reward.shape[0]} rewards; give one "
                                 "reward per next observation")
            if not torch.isfinite(reward).all():
                raise ValueError("the rewards hold NaN or inf (reward-free data?): relabel the samples first "
                                 "with ReplayBuffer.relabel(get_task(name), td)")
            reward = reward.to(features.device)
            z, info = self.reward_inference(features, reward)
            return Task(z=z, info={"kind": "reward", "num_samples": int(features.shape[0]),
                                   "reward_r2": heldout_linear_r2(features, reward), **info})
        if isinstance(spec, GoalObservation):
            return Task(z=project_to_sphere(self.task_embedding(spec.obs)), goal=spec.obs, info={"kind": "goal"})
        raise UnsupportedTaskError(f"{self.name} infers tasks from RewardSamples or GoalObservation, "
                                   f"not {type(spec).__name__}")
