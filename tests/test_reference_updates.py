"""Reference tests of the agents' updates: each agent's ``update`` against a plain transcription of the
authors' update, written here, from the same weights and the same random draws.

Each test builds an agent at a tiny config, perturbs its online networks (so that online and target
networks differ and a swap of one for the other shows), deep-copies it as the reference, and runs a
few updates on both sides: ``agent.update(batch)`` and the functions below, which use the copy's
networks only as layers (their forward passes) and do everything an update does on their own: the
losses, the TD targets, the noise, the order of the steps, fresh ``torch.optim.Adam`` optimisers and
the Polyak / EMA updates. Both sides re-seed the global RNG identically before each update and draw
their noise in the authors' order; afterwards every parameter and buffer must agree within 1e-5 (relative
above 1), the losses the reference computes must equal the agent's logged ones, and most tensors (targets
among them) must have moved.

Facts transcribed (the authors' code, read for the facts; the code below is ours):

- METRA: ``seohongpark/METRA`` ``iod/metra.py`` (``_train_components``, ``_update_loss_te``,
  ``_update_loss_dual_lam``, ``_update_rewards``, ``_optimize_op``) and ``iod/sac_utils.py``
  (``update_loss_qf``, ``update_loss_sacp``, ``update_loss_alpha``, ``update_targets``); garage's
  ``TanhNormal``. Differences on purpose (agents/metra.py): bootstrapping stops on ``terminated``.
- TD-JEPA and FB: ``facebookresearch/td_jepa`` (``metamotivo/agents/{td_jepa,fb}/agent.py``
  ``update``, ``sample_mixed_z``, ``update_tdjepa_asym`` / ``update_fb``, ``update_actor``,
  ``_orth_loss``, the DrQ-v2 ``TruncatedNormal`` and ``RandomShiftsAug``).
- RND: URLB ``agent/rnd.py`` and ``agent/ddpg.py``, with the differences agents/rnd.py documents
  (1-step targets; running mean / std input normalisation folded once per batch).

The harness tests at the end check that zero-shot rewards are regressed on next observations (the
ones whose physics gave the reward), that zero-shot rollouts and METRA's coverage evaluation are
deterministic, whatever the global random state.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from latentrl.agents.fb import FBAgent
from latentrl.agents.metra import METRAAgent
from latentrl.agents.rnd import RNDAgent
from latentrl.agents.td_jepa import TDJEPAAgent

ATOL = 1e-5
ACTION_DIM = 3
STATE_DIM = 5
IMAGE = 64


# ------------------------------------------------------------------------------------------- helpers


def _build(cls, obs_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = cls.make_config("smoke", obs_type=obs_type, **overrides)
    shape = (3, IMAGE, IMAGE) if obs_type == "pixels" else (STATE_DIM,)
    return cls(config, shape, ACTION_DIM)


@torch.no_grad()
def _perturb(*modules: torch.nn.Module, scale: float = 0.05, seed: int = 123) -> None:
    """Move the online networks away from their targets (which are copies of them at construction)."""
    g = torch.Generator().manual_seed(seed)
    for module in modules:
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _obs(obs_type: str, n: int, g: torch.Generator, frames: int = 3) -> torch.Tensor:
    if obs_type == "pixels":
        return torch.randint(0, 256, (n, 3 * frames, IMAGE, IMAGE), dtype=torch.uint8, generator=g)
    return torch.randn(n, STATE_DIM, generator=g)


def _batch(obs_type: str, n: int, seed: int, *, skill_dim: int | None = None, frames: int = 3) -> TensorDict:
    """A replay batch whose rows 0 and 2 are terminal (so a dropped ``1 - terminated`` shows)."""
    g = torch.Generator().manual_seed(seed)
    terminated = torch.zeros(n, 1, dtype=torch.bool)
    terminated[0::2][:2] = True
    td = TensorDict({
        obs_type: _obs(obs_type, n, g, frames),
        "action": torch.rand(n, ACTION_DIM, generator=g) * 2 - 1,
        "next": {obs_type: _obs(obs_type, n, g, frames), "terminated": terminated,
                 "truncated": torch.zeros(n, 1, dtype=torch.bool), "reward": torch.full((n, 1), float("nan"))},
    }, batch_size=[n])
    if skill_dim is not None:
        s = torch.randn(n, skill_dim, generator=g)
        td["skill"] = s / s.norm(dim=-1, keepdim=True)
    return td


def _assert_same_state(agent: torch.nn.Module, reference: torch.nn.Module, what: str) -> None:
    ours, theirs = agent.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        if not torch.is_floating_point(value):
            assert torch.equal(value, theirs[name]), f"{what}: {name}"
            continue
        # within 1e-5, relative for values above 1 (running variances of rewards reach ~100)
        scale = theirs[name].abs().clamp_min(1.0)
        diff = ((value - theirs[name]).abs() / scale).max().item() if value.numel() else 0.0
        assert diff <= ATOL, f"{what}: {name} differs from the reference update by {diff:.3g}"


def _run_both(agent, reference_update, batches, what: str) -> None:
    """``len(batches)`` updates of ``agent`` and of the reference (on a deep copy), same seeds. The losses the
    reference returns must equal the agent's logged metrics of the same name (a loss term whose gradient is
    zero, such as the constant diagonal of a sphere-normalised orthonormality loss, shows only there)."""
    reference = copy.deepcopy(agent)
    initial = copy.deepcopy(agent.state_dict())
    state = reference_update(reference)  # builds its own optimisers; returns the per-update function
    for k, batch in enumerate(batches):
        torch.manual_seed(1000 + k)
        metrics = agent.update(batch.clone())
        torch.manual_seed(1000 + k)
        losses = state(batch.clone()) or {}
        for name, value in losses.items():
            expected = float(value.detach())
            assert metrics[name] == pytest.approx(expected, rel=1e-5, abs=1e-5), f"{what}: {name}, update {k}"
    _assert_same_state(agent, reference, what)
    # not vacuous: the updates moved most tensors, the target networks among them, by more than the tolerance
    moved = {name for name, value in agent.state_dict().items()
             if torch.is_floating_point(value) and (value - initial[name]).abs().max() > 10 * ATOL}
    assert len(moved) > 0.5 * sum(torch.is_floating_point(v) for v in initial.values()), f"{what}: {len(moved)} moved"
    assert any("target" in name for name in moved), f"{what}: no target network moved"


def _polyak(online: torch.nn.Module, target: torch.nn.Module, tau: float) -> None:
    with torch.no_grad():
        for p, t in zip(online.parameters(), target.parameters(), strict=True):
            t.copy_(t * (1.0 - tau) + p * tau)


def _adam_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# --------------------------------------------------------------------------------------------- METRA


def _sac_steps(ref: METRAAgent, opt: dict, nets: tuple, obs, next_obs, options, actions, dones,
               r) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """METRA's SAC part, shared by METRA and its baselines: ``sac_utils.update_loss_qf``, ``update_loss_sacp``,
    ``update_loss_alpha`` and ``update_targets`` in the authors' order. ``nets`` holds the reference's own
    forward passes ``(qf, policy_dist, rsample_with_log_prob)``; returns the Q, policy and alpha losses."""
    qf, policy_dist, rsample_with_log_prob = nets
    cfg = ref.config
    target_entropy = -ACTION_DIM / 2.0 * cfg.target_entropy_coef  # -|A|/2 * sac_target_coef
    with torch.no_grad():
        alpha = ref.log_alpha.exp()
    q1_pred, q2_pred = qf(ref.critic1, obs, options, actions), qf(ref.critic2, obs, options, actions)
    next_actions, next_log_probs = rsample_with_log_prob(policy_dist(next_obs, options))
    target_q = torch.min(qf(ref.critic1_target, next_obs, options, next_actions),
                         qf(ref.critic2_target, next_obs, options, next_actions))
    target_q = (target_q - alpha * next_log_probs) * cfg.discount
    with torch.no_grad():
        q_target = r * cfg.reward_scale + target_q * (1.0 - dones)
    loss_qf = F.mse_loss(q1_pred, q_target) * 0.5 + F.mse_loss(q2_pred, q_target) * 0.5
    _adam_step(opt["qf"], loss_qf)
    new_actions, new_log_probs = rsample_with_log_prob(policy_dist(obs, options))
    min_q = torch.min(qf(ref.critic1, obs, options, new_actions), qf(ref.critic2, obs, options, new_actions))
    loss_sacp = (alpha * new_log_probs - min_q).mean()
    _adam_step(opt["option_policy"], loss_sacp)
    loss_alpha = (-ref.log_alpha * (new_log_probs.detach() + target_entropy)).mean()
    _adam_step(opt["log_alpha"], loss_alpha)
    _polyak(ref.critic1, ref.critic1_target, cfg.tau)
    _polyak(ref.critic2, ref.critic2_target, cfg.tau)
    return loss_qf, loss_sacp, loss_alpha


def _metra_reference(ref: METRAAgent):
    """METRA's ``_train_components`` inner loop for one minibatch, as the official code runs it."""
    cfg = ref.config
    wm = ref.world_model
    opt = {
        "te": torch.optim.Adam([*wm.encoder.parameters(), *wm.head.parameters()], lr=cfg.lr_of("phi")),
        "dual_lam": torch.optim.Adam([wm.log_lambda], lr=cfg.lr_of("lambda")),
        "qf": torch.optim.Adam([*ref.critic1.parameters(), *ref.critic2.parameters()], lr=cfg.lr_of("q")),
        "option_policy": torch.optim.Adam(ref.actor.parameters(), lr=cfg.lr_of("policy")),
        "log_alpha": torch.optim.Adam([ref.log_alpha], lr=cfg.lr_of("alpha")),
    }

    def traj_encoder(x):  # phi: its own encoder, then the mean MLP (inputs already normalised, see update)
        return wm.head(wm.encoder(x))

    # --normalizer_type preset: the official env wrapper hands every network (s - mean) / std with a fixed
    # (preset) mean and std; ours folds them from the first warm-up batches and then freezes them. The test
    # with a frozen normaliser gives both sides the same preset, copied here once.
    rms = wm.normalizer.rms
    preset = None if rms is None else (rms.mean.clone(), rms.var.sqrt().clone())

    def normalise(x):
        return x if preset is None else (x - preset[0]) / preset[1]

    def traj_encoder_pair(x, x_next):
        # phi(s) and phi(s') in one call. The official code makes two calls; one call gives the same values
        # but other float rounding in the gradients of parameters whose gradient is 0 analytically (a unit
        # active on every row: its contributions from s and s' cancel), which Adam normalises into lr-sized
        # steps. One call on both sides keeps those parameters comparable.
        return traj_encoder(torch.cat([x, x_next])).chunk(2)

    def qf(critic, x, z, a):
        return critic.head(torch.cat([critic.encoder(x), z, a], dim=-1)).flatten()

    def policy_dist(x, z):
        head = ref.actor.head
        h = head.trunk(torch.cat([ref.actor.encoder(x), z], dim=-1))
        mean = head.mean_head(h)
        log_std = head.log_std_head(h).clamp(math.log(1e-6), math.log(cfg.policy_max_std))
        return torch.distributions.Normal(mean, log_std.exp())

    def rsample_with_log_prob(normal):  # garage TanhNormal.rsample_with_pre_tanh_value + log_prob
        pre_tanh = normal.rsample()
        action = torch.tanh(pre_tanh)
        log_prob = normal.log_prob(pre_tanh) - torch.log((1.0 - action.pow(2)).clamp(0.0, 1.0) + 1e-6)
        return action, log_prob.sum(-1)

    def rewards(cur_z, next_z, options):
        return ((next_z - cur_z) * options).sum(dim=1)

    def update(v: TensorDict) -> None:
        obs, next_obs = normalise(v[cfg.obs_type]), normalise(v["next", cfg.obs_type])
        options, actions = v["skill"].float(), v["action"].float()
        dones = v["next", "terminated"].float().flatten()
        # _update_loss_te
        cur_z, next_z = traj_encoder_pair(obs, next_obs)
        r = rewards(cur_z, next_z, options)
        dual_lam = wm.log_lambda.exp()
        cst_penalty = 1.0 - torch.square(next_z - cur_z).mean(dim=1)  # dual_dist 'one'
        cst_penalty = torch.clamp(cst_penalty, max=cfg.dual_slack)
        te_obj = r + dual_lam.detach() * cst_penalty
        loss_te = -te_obj.mean()
        _adam_step(opt["te"], loss_te)
        # _update_loss_dual_lam (the penalty of the phi that entered LossTe)
        loss_dual_lam = (wm.log_lambda * cst_penalty.detach()).mean()
        _adam_step(opt["dual_lam"], loss_dual_lam)
        # _update_rewards with the updated phi
        with torch.no_grad():
            r = rewards(*traj_encoder_pair(obs, next_obs), options)
        loss_qf, loss_sacp, loss_alpha = _sac_steps(ref, opt, (qf, policy_dist, rsample_with_log_prob), obs, next_obs,
                                                    options, actions, dones, r)
        return {"phi_loss": loss_te, "lambda_loss": loss_dual_lam, "q_loss": loss_qf, "policy_loss": loss_sacp,
                "alpha_loss": loss_alpha, "intrinsic_reward_mean": r.mean()}

    return update


METRA_TINY = {"hidden_dim": 16, "batch_size": 6, "dim_option": 3, "tau": 0.05, "lr": 1e-3,
              "phi_lr": 2e-3, "lambda_lr": 3e-2, "q_lr": 1.5e-3, "policy_lr": 2.5e-3, "alpha_lr": 2e-2}


@pytest.mark.parametrize("obs_type", ["state", "pixels", "state-preset-normaliser"])
def test_metra_update_matches_reference(obs_type):
    """``state-preset-normaliser``: the state normaliser past its warm-up (frozen statistics, as the official
    ``--normalizer_type preset``): phi, the policy, the Qs and their targets all read ``(s - mean) / std``."""
    normalised = obs_type == "state-preset-normaliser"
    obs_type = "state" if normalised else obs_type
    agent = _build(METRAAgent, obs_type, **METRA_TINY, obs_normalizer_warmup=1 if normalised else 0)
    if normalised:
        norm, g = agent.world_model.normalizer, torch.Generator().manual_seed(5)
        with torch.no_grad():
            norm.rms.mean.copy_(0.5 * torch.randn(STATE_DIM, generator=g))
            norm.rms.var.copy_((0.5 + torch.rand(STATE_DIM, generator=g)).square())
            norm.batches.fill_(1)  # the warm-up is over: the statistics stay as they are
    _perturb(agent.critic1, agent.critic2)
    # large steps in phi: the constraint is violated on some rows and slack on others
    batches = [_batch(obs_type, 6, seed=k, skill_dim=3) for k in range(3)]
    if obs_type == "state":
        for b in batches:
            b["next", "state"][:3] = b["state"][:3] + 0.01
    _run_both(agent, _metra_reference, batches, f"METRA ({obs_type})")


# ------------------------------------------------------------------------------- METRA's baselines: LSD, DIAYN
# The official code runs LSD and DIAYN as flags of the same learner (README; shared/algorithms/metra.md §4):
# LSD = --dual_reg 0 --spectral_normalization 1, DIAYN = --inner 0 --unit_length 0 --dual_reg 0. Facts
# transcribed: iod/metra.py (_update_rewards with and without `inner`, _update_loss_te without `dual_reg`,
# _optimize_te: no dual_lam step without it), garage's GaussianMLPIndependentStdModule (a separate log-std MLP,
# log-std clamped below at log 1e-6, std = exp) and MultiHeadedMLPModule / with_encoder.CNN (spectral norm on
# every Linear and Conv2d of the traj encoder), garagei's SpectralNorm.compute_weight (one power iteration per
# forward pass in training mode, u and v updated in place).


def _sn_weight(layer: torch.nn.Module) -> torch.Tensor:
    """garagei ``SpectralNorm.compute_weight`` (training mode): one power iteration, in place, then W / sigma."""
    weight = layer.weight_orig
    u, v = layer.weight_u, layer.weight_v
    weight_mat = weight.reshape(weight.shape[0], -1)
    with torch.no_grad():
        v.copy_(F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=1e-12))
        u.copy_(F.normalize(torch.mv(weight_mat, v), dim=0, eps=1e-12))
        u, v = u.clone(), v.clone()
    sigma = torch.dot(u, torch.mv(weight_mat, v))
    return weight / sigma


def _metra_baseline_reference(ref: METRAAgent):
    """``_train_components``' inner loop with the official flags ``inner``, ``dual_reg`` and spectral
    normalisation read from the config (LSD, DIAYN), for one minibatch."""
    cfg = ref.config
    wm = ref.world_model
    inner, dual_reg, spectral = cfg.switch("inner"), cfg.switch("dual_reg"), cfg.switch("spectral_norm")
    te_params = [*wm.encoder.parameters(), *wm.head.parameters()]
    if not inner:
        te_params += list(wm.log_std_head.parameters())
    opt = {
        "te": torch.optim.Adam(te_params, lr=cfg.lr_of("phi")),
        "dual_lam": torch.optim.Adam([wm.log_lambda], lr=cfg.lr_of("lambda")),
        "qf": torch.optim.Adam([*ref.critic1.parameters(), *ref.critic2.parameters()], lr=cfg.lr_of("q")),
        "option_policy": torch.optim.Adam(ref.actor.parameters(), lr=cfg.lr_of("policy")),
        "log_alpha": torch.optim.Adam([ref.log_alpha], lr=cfg.lr_of("alpha")),
    }

    def linear(layer, x):
        return F.linear(x, _sn_weight(layer) if spectral else layer.weight, layer.bias)

    def mlp_forward(seq, x):  # garage MLPModule: Linear, ReLU, ..., Linear (spectral norm on each Linear)
        layers = [m for m in seq if isinstance(m, torch.nn.Linear)]
        for layer in layers[:-1]:
            x = torch.relu(linear(layer, x))
        return linear(layers[-1], x)

    def cnn_forward(x):  # with_encoder.CNN: 4 x Conv(k4, s2), ELU, flatten (spectral norm on each conv)
        if cfg.obs_type != "pixels":
            return x.float()
        # channels_last as DreamerEncoder lays it out (the same values; the same float rounding)
        h = (x.float() / 255.0).contiguous(memory_format=torch.channels_last)
        for conv in [m for m in wm.encoder.modules() if isinstance(m, torch.nn.Conv2d)]:
            weight = _sn_weight(conv) if spectral else conv.weight
            h = F.elu(F.conv2d(h, weight, conv.bias, stride=2))
        return h.flatten(1)

    def traj_encoder(x):
        """(mean, log_std) of GaussianMLPIndependentStdModule on the CNN features (log_std: DIAYN only)."""
        h = cnn_forward(x)
        mean = mlp_forward(wm.head, h)
        log_std = None if inner else mlp_forward(wm.log_std_head, h).clamp(min=math.log(1e-6))
        return mean, log_std

    def qf(critic, x, z, a):
        return critic.head(torch.cat([critic.encoder(x), z, a], dim=-1)).flatten()

    def policy_dist(x, z):
        head = ref.actor.head
        h = head.trunk(torch.cat([ref.actor.encoder(x), z], dim=-1))
        log_std = head.log_std_head(h).clamp(math.log(1e-6), math.log(cfg.policy_max_std))
        return torch.distributions.Normal(head.mean_head(h), log_std.exp())

    def rsample_with_log_prob(normal):
        pre_tanh = normal.rsample()
        action = torch.tanh(pre_tanh)
        log_prob = normal.log_prob(pre_tanh) - torch.log((1.0 - action.pow(2)).clamp(0.0, 1.0) + 1e-6)
        return action, log_prob.sum(-1)

    def update_rewards(obs, next_obs, options):
        """iod/metra.py ``_update_rewards``: two traj_encoder calls with ``inner``, one (on s') without."""
        if inner:
            if spectral:  # two calls, as the official code: each runs one power iteration
                cur_z, _ = traj_encoder(obs)
                next_z, _ = traj_encoder(next_obs)
            else:  # one call on both (same values; see _metra_reference's traj_encoder_pair for the rounding)
                cur_z, next_z = traj_encoder(torch.cat([obs, next_obs]))[0].chunk(2)
            target_z = next_z - cur_z
            if cfg.discrete:
                d = cfg.dim_option
                masks = (options - options.mean(dim=1, keepdim=True)) * d / (d - 1)
                return (target_z * masks).sum(dim=1), cur_z, next_z
            return (target_z * options).sum(dim=1), cur_z, next_z
        mean, log_std = traj_encoder(next_obs)
        if cfg.discrete:
            return -F.cross_entropy(mean, options.argmax(dim=1), reduction="none"), None, None
        std = log_std.exp()  # Independent(Normal(mean, std), 1).log_prob(options), written out
        log_prob = -((options - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        return log_prob.sum(dim=1), None, None

    def update(v: TensorDict) -> dict:
        obs, next_obs = v[cfg.obs_type], v["next", cfg.obs_type]
        options, actions = v["skill"].float(), v["action"].float()
        dones = v["next", "terminated"].float().flatten()
        # _update_loss_te (+ _update_loss_dual_lam only with dual_reg)
        r, cur_z, next_z = update_rewards(obs, next_obs, options)
        te_obj = r
        loss_dual_lam = torch.zeros(())
        if dual_reg:
            cst_penalty = torch.clamp(1.0 - torch.square(next_z - cur_z).mean(dim=1), max=cfg.dual_slack)
            te_obj = r + wm.log_lambda.exp().detach() * cst_penalty
            loss_dual_lam = (wm.log_lambda * cst_penalty.detach()).mean()
        loss_te = -te_obj.mean()
        _adam_step(opt["te"], loss_te)
        if dual_reg:
            _adam_step(opt["dual_lam"], loss_dual_lam)
        # _update_rewards again, with the updated traj encoder
        with torch.no_grad():
            r = update_rewards(obs, next_obs, options)[0]
        loss_qf, loss_sacp, loss_alpha = _sac_steps(ref, opt, (qf, policy_dist, rsample_with_log_prob), obs, next_obs,
                                                    options, actions, dones, r)
        return {"phi_loss": loss_te, "lambda_loss": loss_dual_lam, "q_loss": loss_qf, "policy_loss": loss_sacp,
                "alpha_loss": loss_alpha, "intrinsic_reward_mean": r.mean()}

    return update


@pytest.mark.parametrize("objective, obs_type, discrete", [
    ("metra", "state", True),  # METRA's discrete skills: the zero-centred one-hot reward of iod/metra.py
    ("lsd", "state", False), ("lsd", "state", True), ("lsd", "pixels", False),
    ("diayn", "state", False), ("diayn", "state", True), ("diayn", "pixels", False),
])
def test_metra_baseline_update_matches_reference(objective, obs_type, discrete):
    agent = _build(METRAAgent, obs_type, **METRA_TINY, objective=objective, discrete=discrete)
    assert agent.config.switch("spectral_norm") == (objective == "lsd")
    _perturb(agent.critic1, agent.critic2)
    batches = [_batch(obs_type, 6, seed=k, skill_dim=3) for k in range(3)]
    g = torch.Generator().manual_seed(7)
    for b in batches:
        if discrete:
            b["skill"] = F.one_hot(torch.randint(3, (6,), generator=g), 3).float()
        elif objective == "diayn":  # --unit_length 0: skills ~ N(0, I)
            b["skill"] = torch.randn(6, 3, generator=g)
    lambda_before = agent.world_model.log_lambda.detach().clone()
    _run_both(agent, _metra_baseline_reference, batches, f"{objective} ({obs_type}, discrete={discrete})")
    moved = not torch.equal(agent.world_model.log_lambda.detach(), lambda_before)
    assert moved == agent.config.switch("dual_reg")  # no dual step without dual_reg


# ----------------------------------------------------------------------------- TD-JEPA and FB pieces


def _project_z(z: torch.Tensor) -> torch.Tensor:
    return math.sqrt(z.shape[-1]) * F.normalize(z, dim=-1)


def _drq_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """DrQ-v2's ``RandomShiftsAug.forward`` (replicate pad, then grid_sample at a random integer shift)."""
    x = x.float()
    n, _, h, w = x.size()
    x = F.pad(x, (pad, pad, pad, pad), "replicate")
    eps = 1.0 / (h + 2 * pad)
    arange = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad, dtype=x.dtype)[:h]
    arange = arange.unsqueeze(0).repeat(h, 1).unsqueeze(2)
    base_grid = torch.cat([arange, arange.transpose(1, 0)], dim=2)
    base_grid = base_grid.unsqueeze(0).repeat(n, 1, 1, 1)
    shift = torch.randint(0, 2 * pad + 1, size=(n, 1, 1, 2), dtype=x.dtype)
    shift *= 2.0 / (h + 2 * pad)
    return F.grid_sample(x, base_grid + shift, padding_mode="zeros", align_corners=False)


def _truncated_normal_sample(mu: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """DrQ-v2's ``TruncatedNormal(mu, std).sample(clip)``: clipped noise, clamp with a straight-through gradient."""
    eps = torch.empty(mu.shape, dtype=mu.dtype).normal_() * std
    eps = torch.clamp(eps, -clip, clip)
    x = mu + eps
    clamped = torch.clamp(x, -1.0 + 1e-6, 1.0 - 1e-6)
    return x - x.detach() + clamped.detach()


def _z_actor_mean(actor, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The TD-JEPA / FB ``simple`` actor's mean: ``tanh(policy(embed_s(obs) || embed_z(obs || z)))``."""
    z_embedding = actor.embed_z(torch.cat([obs, z], dim=-1))
    s_embedding = actor.embed_s(obs)
    return torch.tanh(actor.policy(torch.cat([s_embedding, z_embedding], dim=-1)))


def _orth_loss(enc: torch.Tensor) -> torch.Tensor:
    """``_orth_loss``: 0.5 sum_{i != j} (enc enc^T)_ij^2 / (B (B - 1)) - mean_i (enc enc^T)_ii."""
    off_diag = 1 - torch.eye(enc.shape[0])
    cov = enc @ enc.T
    return 0.5 * (cov * off_diag).pow(2).sum() / off_diag.sum() - cov.diag().mean()


def _sample_mixed_z(head, train_goal: torch.Tensor, z_dim: int, ratio: float) -> torch.Tensor:
    """``sample_mixed_z``: sphere samples, each row replaced with prob. ``ratio`` by project(head(goal[perm]))."""
    batch = train_goal.shape[0]
    with torch.no_grad():
        z = _project_z(torch.randn((batch, z_dim), dtype=torch.float32))
        perm = torch.randperm(batch)
        goals = _project_z(head(train_goal[perm]))
        mask = torch.rand((batch, 1)) < ratio
        return torch.where(mask, goals, z)


def _inputs(cfg, batch: TensorDict, pad: int):
    """obs, action, next obs and ``discount * ~terminated`` as the reference ``update`` reads them (pixels shifted)."""
    obs, next_obs = batch[cfg.obs_type], batch["next", cfg.obs_type]
    if cfg.obs_type == "pixels":
        with torch.no_grad():
            obs, next_obs = _drq_shift(obs, pad), _drq_shift(next_obs, pad)
    discount = cfg.discount * ~batch["next", "terminated"]
    return obs, batch["action"], next_obs, discount


# ------------------------------------------------------------------------------------------- TD-JEPA


def _td_jepa_reference(ref: TDJEPAAgent):
    """TD-JEPA's ``update`` (asymmetric: ``update_tdjepa_asym``, ``update_actor``, the soft updates)."""
    cfg, wm, targets = ref.config, ref.world_model, ref.world_model.targets
    phi_trunk, phi_mlp = wm.phi_encoder.trunk, wm.phi_encoder.head
    psi_trunk, psi_mlp = wm.psi_encoder.trunk, wm.psi_encoder.head
    adam = torch.optim.Adam
    phi_encoder_optimizer = adam([*phi_mlp.parameters(), *phi_trunk.parameters()], lr=cfg.lr_phi)
    phi_predictor_optimizer = adam(wm.phi_predictor.parameters(), lr=cfg.lr_predictor)
    psi_encoder_optimizer = adam([*psi_mlp.parameters(), *psi_trunk.parameters()], lr=cfg.lr_psi)
    psi_predictor_optimizer = adam(wm.psi_predictor.parameters(), lr=cfg.lr_predictor)
    actor_optimizer = adam(ref.actor.parameters(), lr=cfg.lr_actor)
    optimizers = [phi_predictor_optimizer, psi_predictor_optimizer, phi_encoder_optimizer, psi_encoder_optimizer]

    def update(batch: TensorDict) -> None:
        obs, action, next_obs, discount = _inputs(cfg, batch, cfg.image_pad)
        # encode_image
        with torch.no_grad():
            phi_next_obs, psi_next_obs = phi_trunk(next_obs), psi_trunk(next_obs)
        phi_obs, psi_obs = phi_trunk(obs), psi_trunk(obs)
        z = _sample_mixed_z(psi_mlp, psi_next_obs, cfg.psi_dim, cfg.train_goal_ratio)
        # update_tdjepa_asym
        with torch.no_grad():
            next_phi_enc = targets["phi_head"](phi_next_obs)
            next_psi_enc = targets["psi_head"](psi_next_obs)
            next_action = _truncated_normal_sample(_z_actor_mean(ref.actor, next_phi_enc, z), cfg.actor_std,
                                                   cfg.stddev_clip)
            target_phi = targets["phi_predictor"](next_phi_enc, next_action, z).mean(dim=0)
            td_target_phi = next_psi_enc + discount * target_phi
            target_psi = targets["psi_predictor"](next_psi_enc, next_action, z).mean(dim=0)
            td_target_psi = next_phi_enc + discount * target_psi
        phi_enc = phi_mlp(phi_obs)
        phi_preds = wm.phi_predictor(phi_enc, action, z)
        psi_enc = psi_mlp(psi_obs)
        psi_preds = wm.psi_predictor(psi_enc, action, z)
        phi_tdjepa_loss = (phi_preds - td_target_phi).pow(2).sum(-1).mean()
        psi_tdjepa_loss = (psi_preds - td_target_psi).pow(2).sum(-1).mean()
        tdjepa_loss = phi_tdjepa_loss + psi_tdjepa_loss
        total_loss = tdjepa_loss + cfg.phi_ortho_coef * _orth_loss(phi_enc) + cfg.psi_ortho_coef * _orth_loss(psi_enc)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        total_loss.backward()
        for opt in optimizers:
            opt.step()
        # update_actor
        with torch.no_grad():
            phi_enc = phi_mlp(phi_obs.detach())
        actor_action = _truncated_normal_sample(_z_actor_mean(ref.actor, phi_enc, z), cfg.actor_std, cfg.stddev_clip)
        q = (wm.phi_predictor(phi_enc, actor_action, z) * z).sum(-1).mean(dim=0)
        actor_loss = -q.mean()
        _adam_step(actor_optimizer, actor_loss)
        # soft updates
        _polyak(wm.phi_predictor, targets["phi_predictor"], cfg.predictor_target_tau)
        _polyak(phi_mlp, targets["phi_head"], cfg.encoder_target_tau)
        _polyak(wm.psi_predictor, targets["psi_predictor"], cfg.predictor_target_tau)
        _polyak(psi_mlp, targets["psi_head"], cfg.encoder_target_tau)
        return {"total_loss": total_loss, "actor_loss": actor_loss}

    return update


ZERO_SHOT_TINY = {"batch_size": 6, "actor_std": 0.5, "discount": 0.9}
TD_JEPA_TINY = {**ZERO_SHOT_TINY, "lr_phi": 2e-3, "lr_psi": 1.5e-3, "lr_predictor": 1e-3, "lr_actor": 2.5e-3,
                "encoder_target_tau": 0.05, "predictor_target_tau": 0.1, "phi_ortho_coef": 0.3, "psi_ortho_coef": 0.7}


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_td_jepa_update_matches_reference(obs_type):
    agent = _build(TDJEPAAgent, obs_type, **TD_JEPA_TINY)
    wm = agent.world_model
    _perturb(wm.phi_encoder.head, wm.psi_encoder.head, wm.phi_predictor, wm.psi_predictor)
    batches = [_batch(obs_type, 6, seed=10 + k) for k in range(3)]
    _run_both(agent, _td_jepa_reference, batches, f"TD-JEPA ({obs_type})")


def _td_jepa_sym_reference(ref: TDJEPAAgent):
    """Symmetric TD-JEPA's ``update`` (``update_tdjepa_sym``: one encoder ``psi = phi``, one predictor; goals from
    the online phi head; ``update_actor``; soft updates of phi's head and predictor only)."""
    cfg, wm, targets = ref.config, ref.world_model, ref.world_model.targets
    phi_trunk, phi_mlp = wm.phi_encoder.trunk, wm.phi_encoder.head
    adam = torch.optim.Adam
    phi_encoder_optimizer = adam([*phi_mlp.parameters(), *phi_trunk.parameters()], lr=cfg.lr_phi)
    phi_predictor_optimizer = adam(wm.phi_predictor.parameters(), lr=cfg.lr_predictor)
    actor_optimizer = adam(ref.actor.parameters(), lr=cfg.lr_actor)

    def update(batch: TensorDict) -> None:
        obs, action, next_obs, discount = _inputs(cfg, batch, cfg.image_pad)
        with torch.no_grad():  # encode_image: psi_next_obs is phi_next_obs
            phi_next_obs = phi_trunk(next_obs)
        phi_obs = phi_trunk(obs)
        z = _sample_mixed_z(phi_mlp, phi_next_obs, wm.phi_encoder.dim, cfg.train_goal_ratio)  # z_dim = d_phi
        with torch.no_grad():
            next_phi_enc = targets["phi_head"](phi_next_obs)
            next_action = _truncated_normal_sample(_z_actor_mean(ref.actor, next_phi_enc, z), cfg.actor_std,
                                                   cfg.stddev_clip)
            td_target_phi = next_phi_enc + discount * targets["phi_predictor"](next_phi_enc, next_action, z).mean(0)
        phi_enc = phi_mlp(phi_obs)
        phi_preds = wm.phi_predictor(phi_enc, action, z)
        tdjepa_loss = (phi_preds - td_target_phi).pow(2).sum(-1).mean()
        total_loss = tdjepa_loss + cfg.phi_ortho_coef * _orth_loss(phi_enc)
        phi_predictor_optimizer.zero_grad(set_to_none=True)
        phi_encoder_optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        phi_predictor_optimizer.step()
        phi_encoder_optimizer.step()
        with torch.no_grad():  # update_actor
            phi_enc = phi_mlp(phi_obs.detach())
        actor_action = _truncated_normal_sample(_z_actor_mean(ref.actor, phi_enc, z), cfg.actor_std, cfg.stddev_clip)
        actor_loss = -(wm.phi_predictor(phi_enc, actor_action, z) * z).sum(-1).mean(dim=0).mean()
        _adam_step(actor_optimizer, actor_loss)
        _polyak(wm.phi_predictor, targets["phi_predictor"], cfg.predictor_target_tau)
        _polyak(phi_mlp, targets["phi_head"], cfg.encoder_target_tau)
        return {"total_loss": total_loss, "actor_loss": actor_loss}

    return update


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_symmetric_td_jepa_update_matches_reference(obs_type):
    agent = _build(TDJEPAAgent, obs_type, **TD_JEPA_TINY, symmetric=True)
    wm = agent.world_model
    assert wm.symmetric and wm.psi_encoder is None and wm.psi_predictor is None
    _perturb(wm.phi_encoder.head, wm.phi_predictor)
    batches = [_batch(obs_type, 6, seed=20 + k) for k in range(3)]
    _run_both(agent, _td_jepa_sym_reference, batches, f"symmetric TD-JEPA ({obs_type})")


# ------------------------------------------------------------------------------------------------ FB


def _fb_reference(ref: FBAgent):
    """FB's ``update`` in the TD-JEPA codebase (``update_fb``, ``update_td3_actor``, the soft updates)."""
    cfg, wm, targets = ref.config, ref.world_model, ref.world_model.targets
    fw_encoder, left_encoder = wm.left_encoder.trunk, wm.left_encoder.head
    bw_encoder, backward_map = wm.backward_map.trunk, wm.backward_map.head
    forward_map = wm.forward_map
    adam = torch.optim.Adam
    backward_optimizer = adam([*backward_map.parameters(), *bw_encoder.parameters()], lr=cfg.lr_b)
    forward_optimizer = adam([*forward_map.parameters(), *left_encoder.parameters(), *fw_encoder.parameters()],
                             lr=cfg.lr_f)
    actor_optimizer = adam(ref.actor.parameters(), lr=cfg.lr_actor)

    def update(batch: TensorDict) -> None:
        obs, action, next_obs, discount = _inputs(cfg, batch, cfg.image_pad)
        # enc
        obs = fw_encoder(obs)
        goal = bw_encoder(next_obs)
        with torch.no_grad():
            next_obs = fw_encoder(next_obs)
        z = _sample_mixed_z(backward_map, goal, cfg.z_dim, cfg.train_goal_ratio)
        # update_fb
        with torch.no_grad():
            next_left_enc = targets["left_head"](next_obs)
            next_action = _truncated_normal_sample(_z_actor_mean(ref.actor, next_left_enc, z), cfg.actor_std,
                                                   cfg.stddev_clip)
            target_fs = targets["forward_map"](next_left_enc, next_action, z)
            target_b = targets["backward_head"](goal)
            target_m = torch.matmul(target_fs, target_b.T).mean(dim=0)
        left_enc = left_encoder(obs)
        fs = forward_map(left_enc, action, z)
        b = backward_map(goal)
        ms = torch.matmul(fs, b.T)
        diff = ms - discount * target_m
        off_diag = 1 - torch.eye(b.shape[0])
        fb_offdiag = 0.5 * (diff * off_diag).pow(2).sum() / off_diag.sum()
        fb_diag = -torch.diagonal(diff, dim1=1, dim2=2).mean() * ms.shape[0]
        fb_loss = fb_offdiag + fb_diag + cfg.ortho_coef * _orth_loss(b)
        forward_optimizer.zero_grad(set_to_none=True)
        backward_optimizer.zero_grad(set_to_none=True)
        fb_loss.backward()
        forward_optimizer.step()
        backward_optimizer.step()
        # update_td3_actor
        with torch.no_grad():
            left_enc = left_encoder(obs.detach())
        actor_action = _truncated_normal_sample(_z_actor_mean(ref.actor, left_enc, z), cfg.actor_std, cfg.stddev_clip)
        q = (forward_map(left_enc, actor_action, z) * z).sum(-1).mean(dim=0)
        actor_loss = -q.mean()
        _adam_step(actor_optimizer, actor_loss)
        # soft updates
        _polyak(forward_map, targets["forward_map"], cfg.f_target_tau)
        _polyak(backward_map, targets["backward_head"], cfg.b_target_tau)
        _polyak(left_encoder, targets["left_head"], cfg.f_target_tau)
        return {"total_loss": fb_loss, "actor_loss": actor_loss}

    return update


FB_TINY = {**ZERO_SHOT_TINY, "lr_f": 2e-3, "lr_b": 1.5e-3, "lr_actor": 2.5e-3, "f_target_tau": 0.05,
           "b_target_tau": 0.1, "ortho_coef": 0.7}


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_fb_update_matches_reference(obs_type):
    agent = _build(FBAgent, obs_type, **FB_TINY)
    wm = agent.world_model
    _perturb(wm.left_encoder.head, wm.backward_map.head, wm.forward_map)
    batches = [_batch(obs_type, 6, seed=20 + k) for k in range(3)]
    _run_both(agent, _fb_reference, batches, f"FB ({obs_type})")


# ----------------------------------------------------------------------------------------------- RND


def _rms_update(rms, x: torch.Tensor) -> None:
    """URLB's ``RMS.__call__`` (Chan et al.'s parallel update) on the statistics buffers of ``rms``."""
    with torch.no_grad():
        bs, n = x.size(0), rms.count.item()
        delta = torch.mean(x, dim=0) - rms.mean
        new_mean = rms.mean + delta * bs / (n + bs)
        new_var = (rms.var * n + torch.var(x, dim=0) * bs + torch.square(delta) * n * bs / (n + bs)) / (n + bs)
        rms.mean.copy_(new_mean)
        rms.var.copy_(new_var)
        rms.count.fill_(n + bs)


def _rnd_reference(ref: RNDAgent):
    """URLB's ``RNDAgent.update`` with ``DDPGAgent.update_critic`` / ``update_actor`` (1-step targets)."""
    cfg = ref.config
    pixels = cfg.obs_type == "pixels"
    encoder, rnd = ref.world_model.encoder, ref.world_model.rnd
    actor, critic, critic_target = ref.actor_critic.actor, ref.actor_critic.critic, ref.actor_critic.critic_target
    adam = lambda params: torch.optim.Adam(params, lr=cfg.lr)
    encoder_opt = adam(encoder.parameters()) if pixels else None
    actor_opt, critic_opt = adam(actor.parameters()), adam(critic.parameters())
    rnd_opt = adam(rnd.predictor.parameters())
    stddev = float(cfg.stddev_schedule)

    def aug_and_encode(obs):
        return encoder(_drq_shift(obs, cfg.image_pad) if pixels else obs)

    def prediction_error(obs):
        x = torch.clamp((obs - rnd.obs_rms.mean) / torch.sqrt(rnd.obs_rms.var + 1e-5), -cfg.rnd_obs_clip,
                        cfg.rnd_obs_clip)
        prediction, target = rnd.predictor(x), rnd.target(x)
        return torch.square(target.detach() - prediction).mean(dim=-1, keepdim=True)

    def actor_dist_sample(obs):
        mu = torch.tanh(actor.policy(actor.trunk(obs)))
        return _truncated_normal_sample(mu, stddev, cfg.stddev_clip)

    def q_values(net, obs, action):
        if pixels:
            h = torch.cat([net.trunk(obs), action], dim=-1)
        else:
            h = net.trunk(torch.cat([obs, action], dim=-1))
        return net.q1(h), net.q2(h)

    def update(batch: TensorDict) -> None:
        obs, action = batch[cfg.obs_type], batch["action"]
        discount = cfg.discount * (1.0 - batch["next", "terminated"].float())
        obs = aug_and_encode(obs)
        with torch.no_grad():
            next_obs = aug_and_encode(batch["next", cfg.obs_type])
        # update_rnd(obs.detach()): the input statistics take this batch once, then the predictor steps. The
        # input statistics are the agent's RunningMeanStd (a documented deviation from URLB's BatchNorm): a
        # transcription of them rounds differently, and features of near-zero variance amplify that rounding
        # into the predictor's first layer beyond 1e-5. The reward statistics below are transcribed.
        rnd.obs_rms.update(obs.detach())
        rnd_loss = prediction_error(obs.detach()).mean()
        _adam_step(rnd_opt, rnd_loss)
        with torch.no_grad():  # compute_intr_reward with the updated predictor
            error = prediction_error(obs)
            _rms_update(ref.intrinsic_reward_rms, error)
            reward = cfg.rnd_scale * error / (torch.sqrt(ref.intrinsic_reward_rms.var) + 1e-8)
        # update_critic
        with torch.no_grad():
            next_action = actor_dist_sample(next_obs)
            target_q1, target_q2 = q_values(critic_target, next_obs, next_action)
            target_q = reward + discount * torch.min(target_q1, target_q2)
        q1, q2 = q_values(critic, obs, action)
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        if encoder_opt is not None:
            encoder_opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_opt.step()
        if encoder_opt is not None:
            encoder_opt.step()
        # update_actor
        obs = obs.detach()
        q1, q2 = q_values(critic, obs, actor_dist_sample(obs))
        actor_loss = -torch.min(q1, q2).mean()
        _adam_step(actor_opt, actor_loss)
        # soft_update_params(critic, critic_target, critic_target_tau)
        _polyak(critic, critic_target, cfg.critic_target_tau)
        return {"critic_loss": critic_loss, "actor_loss": actor_loss, "intrinsic_reward_mean": reward.mean(),
                "rnd_loss": rnd_loss}

    return update


RND_TINY = {"batch_size": 6, "lr": 1e-3, "critic_target_tau": 0.1, "discount": 0.9, "stddev_schedule": 0.5,
            "rnd_scale": 2.0}


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_rnd_update_matches_reference(obs_type):
    agent = _build(RNDAgent, obs_type, **RND_TINY)
    _perturb(agent.actor_critic.critic)
    batches = [_batch(obs_type, 6, seed=30 + k) for k in range(3)]
    _run_both(agent, _rnd_reference, batches, f"RND ({obs_type})")


# ---------------------------------------------------------------------------------- zero-shot harness


def test_reward_inference_matches_reference():
    """TD-JEPA: z = project(lstsq(psi(s'), r)); FB: z = project(sum_i r_i B(s'_i)) (reward_inference)."""
    g = torch.Generator().manual_seed(5)
    obs = torch.randn(40, STATE_DIM, generator=g)
    reward = torch.randn(40, 1, generator=g)
    from latentrl.agents.base import RewardSamples

    samples = RewardSamples(obs=TensorDict({"state": obs}, [40]), reward=reward)
    td_jepa = _build(TDJEPAAgent, "state", **TD_JEPA_TINY)
    with torch.no_grad():
        psi = td_jepa.world_model.psi_encoder.head(obs)
        expected = _project_z(torch.linalg.lstsq(psi.double(), reward.double()).solution.T.float())[0]
    torch.testing.assert_close(td_jepa.infer_task(samples).z, expected, atol=ATOL, rtol=0)
    fb = _build(FBAgent, "state", **FB_TINY)
    with torch.no_grad():
        expected = _project_z((reward * fb.world_model.backward_map.head(obs)).sum(0))
    torch.testing.assert_close(fb.infer_task(samples).z, expected, atol=ATOL, rtol=0)


class _FixedSample:
    """A buffer whose ``sample`` returns one fixed batch (sampled once, with its own generator), so that the
    global random state changes nothing but the policies; records the batches it handed out."""

    def __init__(self, buffer, num_samples: int):
        torch.manual_seed(77)
        self.buffer, self.batch, self.handed = buffer, buffer.sample(num_samples, keys=["state", "physics"]), []
        self.domain, self.storage = buffer.domain, buffer.storage

    def __len__(self):
        return len(self.buffer)

    def sample(self, *args, **kwargs):
        batch = self.batch.clone()
        self.handed.append(batch)
        return batch

    def relabel(self, task, td):
        return self.buffer.relabel(task, td)


@pytest.fixture(scope="module")
def cheetah_steps():
    """40 random-action steps of cheetah-run (2 envs x 20) in a buffer, with states and physics."""
    from latentrl.envs import make_env
    from latentrl.replay import ReplayBuffer

    env = make_env("cheetah-run", obs=("state", "physics"), num_envs=2, episode_length=20, seed=3, num_workers=0)
    torch.manual_seed(3)
    try:
        steps = env.rollout(20)
    finally:
        env.close()
    buffer = ReplayBuffer(1000, domain="cheetah")
    buffer.extend(steps)
    return buffer


ENV_CFG = {"task": "cheetah-run", "obs": ["state", "physics"], "image_size": 64, "action_repeat": 1,
           "floor": "default", "camera": None, "episode_length": 12}


def test_zero_shot_rewards_are_regressed_on_next_observations(cheetah_steps):
    from latentrl.agents.base import Agent, Policy, SampleSpec, Task
    from latentrl.envs import get_task
    from latentrl.training.zero_shot import evaluate_reward_tasks

    class _Zero(Policy):
        def __init__(self):
            super().__init__(None, (), 6)

        def act(self, x, carry, is_first):
            return torch.zeros(carry.batch_size[0], 6), carry

    class _Recording(Agent):
        name = "recording"

        def __init__(self):
            super().__init__()
            self.seen = []

        def sample_spec(self):
            return SampleSpec(batch_size=8)

        def infer_task(self, spec):
            self.seen.append(spec)
            return Task(z=torch.zeros(1))

        def policy(self, task=None, *, explore=False):
            return _Zero()

    buffer = _FixedSample(cheetah_steps, 30)
    agent = _Recording()
    evaluate_reward_tasks(agent, buffer, ["cheetah-run_backward"], ENV_CFG, num_samples=30, episodes=1,
                          progress=lambda s: None)
    (spec,), (batch,) = agent.seen, buffer.handed
    assert not torch.equal(batch["state"], batch["next", "state"])
    torch.testing.assert_close(spec.obs["state"], batch["next", "state"], atol=0, rtol=0)
    # the reward is r(s') of the next physics (with the recorded action), one per next observation
    expected = get_task("cheetah-run_backward").rewards_from_states(batch["next", "physics"].double().numpy(),
                                                                    batch["action"].double().numpy())
    torch.testing.assert_close(spec.reward.reshape(-1).double(), torch.as_tensor(expected).double(), atol=1e-5, rtol=0)


def test_zero_shot_rollouts_are_deterministic(cheetah_steps):
    """The same agent, data and task give the same zero-shot returns whatever the global random state."""
    from latentrl.envs import make_env
    from latentrl.training.evaluation import rollout
    from latentrl.training.zero_shot import evaluate_reward_tasks

    env = make_env("cheetah-run", obs=("state", "physics"), num_envs=1, num_workers=0)
    try:
        agent = TDJEPAAgent.from_env(env, preset="smoke", actor_std=1.0)
    finally:
        env.close()
    agent.eval()
    runs = []
    for seed in (0, 1):
        buffer = _FixedSample(cheetah_steps, 30)
        torch.manual_seed(seed)
        results = evaluate_reward_tasks(agent, buffer, ["cheetah-run"], ENV_CFG, num_samples=30, episodes=2,
                                        progress=lambda s: None)
        runs.append(results[0].values)
    assert runs[0] == runs[1]
    # the evaluation path itself: the deterministic policy of one task, twice, on fresh envs of one seed
    from latentrl.agents.base import Task

    task = Task(z=_project_z(torch.randn(agent.z_dim, generator=torch.Generator().manual_seed(9))))
    returns = []
    for seed in (2, 3):
        env = make_env("cheetah-run", obs=("state", "physics"), num_envs=2, episode_length=12, seed=0, num_workers=0)
        torch.manual_seed(seed)
        try:
            returns.append(rollout(env, agent.policy(task), 2).returns)
        finally:
            env.close()
    assert returns[0] == returns[1]


def _metra_evaluations(evaluate, seeds: list[tuple[int, int]]) -> list:
    """``evaluate(agent, env, seed)`` of one small METRA agent on fresh cheetah envs (env seed 0), once per
    ``(global torch seed, evaluation seed)``."""
    from latentrl.envs import make_env

    torch.manual_seed(0)
    agent = None
    results = []
    for global_seed, seed in seeds:
        env = make_env("cheetah-run", obs=("physics",), num_envs=2, episode_length=10, seed=0, num_workers=0)
        try:
            if agent is None:
                agent = METRAAgent.from_env(env, preset="smoke", obs_type="physics", hidden_dim=16,
                                            policy_init_std=2.0)
            torch.manual_seed(global_seed)
            results.append(evaluate(agent, env, seed))
        finally:
            env.close()
    return results


def test_metra_coverage_evaluation_is_deterministic():
    """Coverage runs the deterministic skill policy: fresh envs of one seed give the same trajectories
    whatever the global random state."""
    from latentrl.training.skills import evaluate_coverage

    a, b = _metra_evaluations(lambda agent, env, seed: evaluate_coverage(agent, env, num_skills=4, seed=seed),
                              [(0, 0), (1, 0)])
    assert a.coverage == b.coverage and a.direction_cos == b.direction_cos
    assert all(np.array_equal(x, y) for x, y in zip(a.trajectories, b.trajectories, strict=True))


def test_metra_goal_reaching_evaluation_is_deterministic():
    """Goal reaching runs the deterministic goal policy (z = normalise(phi(g) - phi(s)), mean action) from goals
    drawn by its own seed: the same distances whatever the global random state, and other goals with another
    seed."""
    from latentrl.training.skills import evaluate_goal_reaching

    results = _metra_evaluations(
        lambda agent, env, seed: evaluate_goal_reaching(agent, env, num_goals=4, goal_range=2.0, seed=seed),
        [(0, 0), (1, 0), (1, 1)])
    assert results[0] == results[1]
    assert results[0]["final_distance"] != results[2]["final_distance"]
