"""Actor-critic pieces shared by agents: DDPG as URLB / ExoRL code it, SAC as garage / METRA code it.

What is here (URLB ``utils.py`` / ``agent/ddpg.py`` and METRA ``iod/sac_utils.py`` are the
references; the code is our own):

- :func:`schedule`: a constant or a ``linear(init, final, duration)`` / ``step_linear(...)`` schedule.
- :class:`TruncatedNormal`: the exploration distribution of DrQ-v2 / URLB deterministic actors.
- :class:`DeterministicActor`, :class:`TwinQCritic`, :class:`DDPGActorCritic`: the DDPG actor,
  its twin-Q critic with a target copy, and their losses. Agents own the optimizers and the order
  of the steps; these classes only compute.
- :class:`TanhNormal`, :class:`TanhGaussianActor` and the SAC loss functions :func:`sac_td_target`,
  :func:`sac_critic_loss`, :func:`sac_actor_loss`, :func:`sac_alpha_loss`: soft actor-critic as
  pure tensor functions, so that agents with their own encoders (METRA: one per network) compose them.
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from latentrl.world_models.layers import mlp, soft_update_params, weight_init, xavier_init

__all__ = [
    "DDPGActorCritic",
    "DeterministicActor",
    "TanhGaussianActor",
    "TanhNormal",
    "TruncatedNormal",
    "TwinQCritic",
    "sac_actor_loss",
    "sac_alpha_loss",
    "sac_critic_loss",
    "sac_td_target",
    "schedule",
]


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
