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
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

__all__ = [
    "DDPGActorCritic",
    "DeterministicActor",
    "RunningMeanStd",
    "TruncatedNormal",
    "TwinQCritic",
    "mlp",
    "resolve_device",
    "schedule",
    "soft_update_params",
    "weight_init",
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

