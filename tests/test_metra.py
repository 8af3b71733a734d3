"""METRA agent: losses against hand-computed numbers, the dual variable, the update order, skills,
goal tasks, coverage evaluation, and smoke runs of train_agent.py from pixels and from states."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torchrl.data import Bounded, Composite, Unbounded

from latentrl.agents import GoalObservation, RewardSamples, Task, UnsupportedTaskError, make_agent
from latentrl.agents.actor_critic import TanhGaussianActor, TanhNormal, sac_alpha_loss
from latentrl.agents.metra import (
    METRAAgent,
    METRAConfig,
    constraint_penalty,
    metra_reward,
    sample_skills,
)
from latentrl.envs import body_position, get_task
from latentrl.training.evaluation import evaluate_agent
from latentrl.training.skills import count_cells, evaluate_coverage, evaluate_goal_reaching

STATE_DIM, ACTION_DIM, IMAGE = 2, 3, 64
TINY = {"hidden_dim": 16, "batch_size": 4}


class SpecEnv:
    """Just the specs of a ``make_env`` env with one env: what ``from_env`` reads."""

    def __init__(self, state_dim: int = STATE_DIM):
        spec = Composite(shape=(1,))
        spec["pixels"] = Bounded(0, 255, shape=(1, 3, IMAGE, IMAGE), dtype=torch.uint8)
        spec["state"] = Unbounded(shape=(1, state_dim), dtype=torch.float32)
        self.observation_spec = spec
        self.action_spec = Bounded(-1.0, 1.0, shape=(1, ACTION_DIM), dtype=torch.float32)


def _agent(**overrides) -> METRAAgent:
    return METRAAgent.from_env(SpecEnv(), preset="smoke", **{"obs_type": "state", **TINY, **overrides})


def _identity_phi_agent(**overrides) -> METRAAgent:
    """An agent whose phi is one Linear layer set to the identity: phi(s) = s (D = state dim = 2)."""
    agent = _agent(num_hidden_layers=0, dim_option=2, **overrides)
    (linear,) = agent.world_model.head
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
        linear.bias.zero_()
    return agent


def _batch(s, s_next, skill, n_actions: int = ACTION_DIM) -> TensorDict:
    """A replay batch as ``ReplayBuffer.sample`` returns it: reward-free (NaN rewards), with skills."""
    s, s_next, skill = (torch.as_tensor(v, dtype=torch.float32) for v in (s, s_next, skill))
    n = s.shape[0]
    return TensorDict({
        "state": s,
        "action": torch.linspace(-0.5, 0.5, n * n_actions).reshape(n, n_actions),
        "skill": skill,
        "next": {
            "state": s_next,
            "reward": torch.full((n, 1), float("nan")),
            "terminated": torch.zeros(n, 1, dtype=torch.bool),
            "truncated": torch.zeros(n, 1, dtype=torch.bool),
        },
    }, batch_size=[n])


# Hand-computed case, D = 2, B = 2, lambda = 30, eps = 1e-3:
#   phi(s) = [[0, 0], [1, 0]], phi(s') = [[1, 1], [1, 2]]   -> dphi = [[1, 1], [0, 2]]
#   z = [[1, 0], [0, 1]]                                     -> r = [1, 2]
#   mean_d dphi^2 = [(1 + 1) / 2, (0 + 4) / 2] = [1, 2]      -> c = min(eps, 1 - [1, 2]) = [0, -1]
#   phi loss = -mean(r + 30 c) = -mean([1, 2 - 30]) = -(1 - 28) / 2 = 13.5
#   lambda loss = log(30) * mean(c) = -0.5 log 30; d/dlog_lambda = mean(c) = -0.5
#   d(phi loss)/d dphi_b = -(1/B) (z_b - lambda * 2 dphi_b / D) = -(z_b - 30 dphi_b) / 2
#       b = 0: -([1, 0] - [30, 30]) / 2 = [14.5, 15];  b = 1: -([0, 1] - [0, 60]) / 2 = [0, 29.5]
#   phi = W s + b with W = I:  dL/dW = sum_b g_b (s'_b - s_b)^T
#       = [14.5, 15]^T [1, 1] + [0, 29.5]^T [0, 2] = [[14.5, 14.5], [15, 15 + 59]];  dL/db = 0
S, S_NEXT, Z = [[0.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]]


def test_reward_and_constraint_match_hand_computed_values():
    phi_s, phi_next, z = torch.tensor(S), torch.tensor(S_NEXT), torch.tensor(Z)
    assert metra_reward(phi_s, phi_next, z, discrete=False).tolist() == [1.0, 2.0]
    c, dist = constraint_penalty(phi_s, phi_next, slack=1e-3)
    assert dist.tolist() == [1.0, 2.0] and c.tolist() == [0.0, -1.0]
    c_small, _ = constraint_penalty(phi_s, phi_s + 0.1, slack=1e-3)  # 1 - 0.01 clamped to eps
    assert torch.allclose(c_small, torch.full((2,), 1e-3))
    # discrete, D = 3: z - 1/3, times 3/2; dphi = [3, 0, 0] -> 3 * (2/3) * 3/2 = 3
    r = metra_reward(torch.zeros(1, 3), torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]), True)
    assert r.item() == pytest.approx(3.0)


def test_phi_and_lambda_losses_and_gradients_match_hand_computed_values():
    agent = _identity_phi_agent()
    metrics = agent.update(_batch(S, S_NEXT, Z))
    assert metrics["phi_loss"] == pytest.approx(13.5)
    assert metrics["lambda_loss"] == pytest.approx(-0.5 * math.log(30.0))
    assert metrics["constraint"] == pytest.approx(1.5)
    assert metrics["constraint_penalty"] == pytest.approx(-0.5)
    (linear,) = agent.world_model.head
    assert torch.allclose(linear.weight.grad, torch.tensor([[14.5, 14.5], [15.0, 74.0]]))
    assert torch.allclose(linear.bias.grad, torch.zeros(2), atol=1e-5)  # the bias cancels in phi(s') - phi(s)
    assert agent.world_model.log_lambda.grad.item() == pytest.approx(-0.5)
    # Adam's first step moves log lambda by lr against the gradient's sign: the violated constraint raises lambda
    assert math.log(metrics["lambda"]) == pytest.approx(math.log(30.0) + 1e-4, abs=1e-7)
    assert all(math.isfinite(v) for v in metrics.values())  # NaN stored rewards are never read


def test_discrete_reward_is_zero_mean_over_skills():
    dim = 5
    dphi = torch.randn(1, dim).expand(dim, dim)
    rewards = metra_reward(torch.zeros(dim, dim), dphi, torch.eye(dim), discrete=True)
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("violated", [True, False])
def test_lambda_rises_while_violated_and_falls_while_slack(violated):
    agent = _identity_phi_agent(phi_lr=0.0, lambda_lr=1e-2)  # phi frozen: the constraint stays as given
    s = torch.zeros(4, 2)
    step = 2.0 if violated else 0.1  # mean_d dphi^2 = 4 (violated) or 0.01 (slack: c = eps)
    batch = _batch(s, s + step, sample_skills(4, 2, False))
    lambdas = [agent.world_model.log_lambda.exp().item()]
    for _ in range(20):
        metrics = agent.update(batch)
        lambdas.append(metrics["lambda"])
    diffs = np.diff(lambdas)
    assert (diffs > 0).all() if violated else (diffs < 0).all()
    assert metrics["constraint_penalty"] == pytest.approx(-3.0 if violated else 1e-3)


def test_intrinsic_reward_is_recomputed_from_current_phi():
    agent = _agent()
    g = torch.Generator().manual_seed(0)
    batch = _batch(torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g), sample_skills(4, 4, False))
    before = agent.intrinsic_reward(batch)
    with torch.no_grad():
        for p in agent.world_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = agent.intrinsic_reward(batch)
    assert not torch.allclose(before, after)
    # Nothing reward-like is kept: the agent holds no reward buffers, the batch's NaN reward is unused.
    assert not any("reward" in name for name, _ in agent.named_buffers())
    assert all(math.isfinite(v) for v in agent.update(batch).values())


def test_update_order_phi_then_lambda_then_sac_on_one_batch():
    """lambda's gradient is mean(c) of the phi that entered phi's loss (the official code); the SAC
    reward is computed with phi after its step (a copy taken before the step gives another reward)."""
    agent = _agent(lr=1e-2)
    g = torch.Generator().manual_seed(1)
    batch = _batch(torch.randn(4, 2, generator=g), 30 * torch.randn(4, 2, generator=g), sample_skills(4, 4, False))
    before = copy.deepcopy(agent)
    x, x_next = batch["state"], batch["next", "state"]
    c_before, _ = constraint_penalty(before.world_model.phi(x), before.world_model.phi(x_next), 1e-3)
    reward_before = before.intrinsic_reward(batch)
    metrics = agent.update(batch)
    reward_after = agent.intrinsic_reward(batch)  # phi is not touched after its own step
    c_after, _ = constraint_penalty(agent.world_model.phi(x), agent.world_model.phi(x_next), 1e-3)
    assert agent.world_model.log_lambda.grad.item() == pytest.approx(c_before.mean().item(), rel=1e-5)
    assert abs(c_after.mean().item() - c_before.mean().item()) > 1e-4
    assert metrics["intrinsic_reward_mean"] == pytest.approx(reward_after.mean().item(), rel=1e-5)
    assert abs(reward_after.mean().item() - reward_before.mean().item()) > 1e-4
    # every part moved on this one batch (phi: the world model without the dual variable log_lambda)
    def parameters(a: METRAAgent, name: str):
        return a.world_model.phi_parameters() if name == "world_model" else getattr(a, name).parameters()

    for name in ("world_model", "actor", "critic1", "critic2"):
        old = torch.cat([p.flatten() for p in parameters(before, name)])
        new = torch.cat([p.flatten() for p in parameters(agent, name)])
        assert not torch.allclose(old, new), name
    assert agent.log_alpha.item() != before.log_alpha.item()


def test_sac_pieces():
    actor = TanhGaussianActor(4, 2, [8], init_std=1.0)
    dist = actor(torch.randn(5, 4))
    pre, action = dist.rsample_with_pre_tanh()
    assert action.abs().max() <= 1 and torch.equal(action, torch.tanh(pre))
    at_zero = actor(torch.zeros(1, 4))  # zero biases: the log-std head gives log(init_std)
    assert torch.allclose(at_zero.stddev, torch.ones(1, 2)) and torch.allclose(at_zero.mean, torch.zeros(1, 2))
    # log-density of tanh(u): log N(u) - log(1 - tanh(u)^2), summed over dims
    loc, scale = torch.zeros(1, 2), torch.ones(1, 2)
    u = torch.tensor([[0.3, -1.2]])
    expected = torch.distributions.Normal(loc, scale).log_prob(u).sum() - torch.log(1 - torch.tanh(u) ** 2 + 1e-6).sum()
    assert TanhNormal(loc, scale).log_prob(torch.tanh(u), u).item() == pytest.approx(expected.item(), rel=1e-5)
    log_alpha = torch.tensor(0.0, requires_grad=True)
    sac_alpha_loss(log_alpha, torch.tensor([1.0, 3.0]), target_entropy=-1.0).backward()
    assert log_alpha.grad.item() == pytest.approx(-1.0)  # -(mean(log pi) + H) = -(2 - 1)
    agent = _agent()
    assert agent.target_entropy == -ACTION_DIM / 2


def test_state_normalizer_is_fixed_after_its_warmup():
    agent = _agent(obs_normalizer_warmup=2)
    g = torch.Generator().manual_seed(2)
    batches = [_batch(10 + 3 * torch.randn(4, 2, generator=g), 10 + 3 * torch.randn(4, 2, generator=g),
                      sample_skills(4, 4, False)) for _ in range(3)]
    norm = agent.world_model.normalizer
    assert torch.equal(norm(torch.ones(1, 2)), torch.ones(1, 2))  # identity before any data
    agent.update(batches[0])
    agent.update(batches[1])
    assert norm.frozen
    seen = torch.cat([torch.cat([b["state"], b["next", "state"]]) for b in batches[:2]])
    assert torch.allclose(norm.rms.mean, seen.mean(0), atol=1e-3)
    mean = norm.rms.mean.clone()
    agent.update(batches[2])
    assert torch.equal(norm.rms.mean, mean)
    x = batches[2]["state"]
    expected = (x - mean) / norm.rms.var.sqrt()
    assert torch.allclose(norm(x), expected, atol=1e-5)
    # phi reads the normalised state: phi(x) = head(normalised x) for the identity encoder
    assert torch.allclose(agent.world_model.phi(x), agent.world_model.head(expected), atol=1e-5)
    assert "world_model.normalizer.rms.mean" in agent.state_dict()


# ------------------------------------------------------------------------------------------ skills


def test_skill_fixed_within_episode_and_redrawn_at_reset():
    agent = _agent()
    policy = agent.policy(explore=True)
    obs = TensorDict({"state": torch.randn(3, 2)}, [3])
    policy.reset()
    policy(obs)
    first = policy.extras()["skill"]
    assert first.shape == (3, 4)
    assert torch.allclose(first.norm(dim=-1), torch.ones(3))
    for _ in range(5):
        policy(TensorDict({"state": torch.randn(3, 2)}, [3]))
        assert torch.equal(policy.extras()["skill"], first)
    policy.reset(torch.tensor([True, False, False]))  # env 0 restarts at its next call
    policy(obs)
    after_reset = policy.extras()["skill"]  # drawn by that call, then kept
    policy(obs)
    assert torch.equal(policy.extras()["skill"], after_reset)
    assert not torch.equal(after_reset[0], first[0])
    assert torch.equal(after_reset[1:], first[1:])


def test_discrete_skills_are_one_hot():
    agent = _agent(discrete=True, dim_option=6)
    policy = agent.policy()
    policy(TensorDict({"state": torch.randn(50, 2)}, [50]))
    skill = policy.extras()["skill"]
    assert torch.equal(skill.sum(dim=-1), torch.ones(50)) and set(skill.unique().tolist()) == {0.0, 1.0}
    assert len(skill.argmax(dim=-1).unique()) > 1


def test_policy_actions_are_deterministic_without_explore_and_fixed_skills_are_kept():
    agent = _agent()
    z = sample_skills(2, 4, False)
    obs = TensorDict({"state": torch.randn(2, 2)}, [2])
    policy = agent.policy(agent.skill_task(z))
    a1, a2 = policy(obs), policy(obs)
    assert torch.equal(a1, a2) and a1.abs().max() < 1
    policy.reset(torch.tensor([True, False]))
    assert torch.equal(policy(obs), a1) and torch.equal(policy.extras()["skill"], z)
    explore = agent.policy(agent.skill_task(z), explore=True)
    assert not torch.equal(explore(obs), explore(obs))


# ------------------------------------------------------------------------------------------- goals


@pytest.mark.parametrize("discrete", [False, True])
def test_goal_policy_recomputes_the_skill_every_step(discrete):
    agent = _identity_phi_agent(discrete=discrete)
    goal = TensorDict({"state": torch.tensor([[3.0, 4.0], [0.0, -2.0]])}, [2])
    task = agent.infer_task(GoalObservation(goal))
    assert isinstance(task, Task) and torch.allclose(task.z, goal["state"])
    policy = agent.policy(task)
    for s in ([[0.0, 0.0], [0.0, 0.0]], [[3.0, 0.0], [-5.0, -2.0]]):
        s = torch.tensor(s)
        policy(TensorDict({"state": s}, [2]))
        direction = goal["state"] - s
        if discrete:
            expected = torch.nn.functional.one_hot(direction.argmax(-1), 2).float()
        else:
            expected = direction / direction.norm(dim=-1, keepdim=True)
        assert torch.allclose(policy.extras()["skill"], expected)


def test_goal_pixels_are_tiled_to_the_frame_stack():
    agent = METRAAgent.from_env(SpecEnv(), preset="smoke", obs_type="pixels", **TINY)
    frame = torch.randint(0, 256, (2, 3, IMAGE, IMAGE), dtype=torch.uint8)
    task = agent.infer_task(GoalObservation(TensorDict({"pixels": frame}, [2])))
    with torch.no_grad():
        expected = agent.world_model.phi(frame.repeat(1, 3, 1, 1))
    assert torch.allclose(task.z, expected)
    policy = agent.policy(task)
    assert policy(TensorDict({"pixels": frame}, [2])).shape == (2, ACTION_DIM)


def test_reward_tasks_are_refused_with_a_clear_error():
    agent = _agent()
    samples = RewardSamples(obs=TensorDict({"state": torch.randn(4, 2)}, [4]), reward=torch.randn(4, 1))
    with pytest.raises(UnsupportedTaskError, match="GoalObservation"):
        agent.infer_task(samples)
    with pytest.raises(KeyError, match="state"):
        agent.infer_task(GoalObservation(TensorDict({"pixels": torch.zeros(1, 3, 64, 64)}, [1])))


def test_config_presets_and_required_obs():
    assert METRAAgent.required_obs() == ("pixels",)
    assert METRAAgent.required_obs("small") == ("physics",)
    assert METRAAgent.required_obs("smoke", obs_type="state") == ("state",)
    cfg = METRAConfig()
    assert (cfg.dim_option, cfg.hidden_dim, cfg.batch_size, cfg.encoder_depth, cfg.dual_lambda_init,
            cfg.dual_slack, cfg.alpha_init, cfg.lr, cfg.tau) == (4, 1024, 256, 48, 30.0, 1e-3, 0.01, 1e-4, 5e-3)
    with pytest.raises(ValueError, match="dim_optoin"):
        _agent(dim_optoin=3)
    agent = METRAAgent.from_env(SpecEnv(), preset="smoke")
    spec = agent.sample_spec()
    assert (spec.frame_stack, spec.keys) == (3, ("pixels",))
    # separate encoders for phi, the policy and each Q; the target Qs are copies
    encoders = [agent.world_model.encoder, agent.actor.encoder, agent.critic1.encoder,
                agent.critic2.encoder, agent.critic1_target.encoder]
    assert len({id(e) for e in encoders}) == 5
    assert agent.critic1.encoder.convnet[0].out_channels == 4
    fixed = _agent(alpha_lr=0.0)
    assert "alpha" not in fixed.optimizers()


def test_paper_preset_updates_at_its_published_size():
    """The defaults (pixel quadruped: 4-D skills, 2 x 1024 MLPs, depth-48 CNNs) build and update;
    only the minibatch is shrunk to keep the test fast."""
    torch.manual_seed(0)
    agent = METRAAgent.from_env(SpecEnv(), preset="paper", batch_size=4)
    assert agent.critic1.encoder.convnet[0].out_channels == 48 and agent.config.hidden_dim == 1024
    n, g = 4, torch.Generator().manual_seed(0)

    def frames():
        return torch.randint(0, 256, (n, 9, IMAGE, IMAGE), dtype=torch.uint8, generator=g)

    batch = TensorDict({"pixels": frames(), "action": torch.rand(n, ACTION_DIM, generator=g) * 2 - 1,
                        "skill": F.normalize(torch.randn(n, 4, generator=g), dim=-1),
                        "next": {"pixels": frames(), "terminated": torch.zeros(n, 1, dtype=torch.bool)}},
                       batch_size=[n])
    metrics = agent.update(batch)
    assert all(np.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------- envs, coverage, training


def test_body_position_and_cell_count():
    assert get_task("cheetah-run").body_qpos_index == (0,)
    assert get_task("quadruped-run").body_qpos_index == (0, 1)
    assert get_task("point_mass-easy").body_qpos_index == (0, 1)
    assert get_task("walker-walk").body_qpos_index == (1,)
    physics = np.zeros((2, 18))
    physics[:, 0] = [2.5, -0.5]
    assert body_position("cheetah-run", physics).tolist() == [[2.5], [-0.5]]
    trajectories = [np.array([[0.1, 0.2], [0.9, 0.9], [1.1, 0.2]]), np.array([[-0.1, 0.0], [0.5, 0.5]])]
    assert count_cells(trajectories) == 3  # (0, 0), (1, 0), (-1, 0)
    assert count_cells(trajectories, bin_size=0.5) == 4  # (0, 0), (1, 1) twice, (2, 0), (-1, 0)


def test_coverage_and_goal_evaluation_on_cheetah(tmp_path):
    from latentrl.envs import make_env

    env = make_env("cheetah-run", obs=("state", "physics"), num_envs=1, episode_length=10, action_repeat=2)
    try:
        agent = make_agent("metra", env, preset="smoke", obs_type="physics", dim_option=2)
        result = evaluate_coverage(agent, env, num_skills=3, plot_path=tmp_path / "skills.png")
        assert len(result.trajectories) == 3 and result.trajectories[0].shape == (11, 1)
        assert result.coverage >= 1 and -1.0 <= result.direction_cos <= 1.0
        assert (tmp_path / "skills.png").stat().st_size > 1000
        goals = evaluate_goal_reaching(agent, env, num_goals=2, goal_range=3.0)
        assert set(goals) == {"success", "hit_success", "final_distance", "min_distance"}
        assert 0.0 <= goals["min_distance"] <= goals["final_distance"] <= 3.0 + 2.0
        agent.config.eval_num_goals = 2
        metrics = evaluate_agent(agent, env, step=7, out_dir=tmp_path)  # what the trainer runs for "metra"
        assert metrics["coverage"] >= 1 and (tmp_path / "skills_000000007.png").exists()
        assert {"skill_direction_cos", "mean_travel", "goal_success", "goal_final_distance"} <= set(metrics)
    finally:
        env.close()


@pytest.mark.parametrize("obs_type", ["pixels", "state"])
def test_train_agent_smoke(tmp_path, obs_type, capsys):
    from latentrl.training.checkpoint import load_agent
    from latentrl.training.cli import train_main

    run_dir = tmp_path / obs_type
    args = ["agent=metra", "preset=smoke", "env=cheetah-run", "log.progress=false", "log.tensorboard=false",
            "eval.video=false", f"run_dir={run_dir}", f"agent.obs_type={obs_type}", "steps=200",
            "env.episode_length=50", "eval.every=100"]
    result = train_main(args)
    assert result["eval/coverage"] >= 1  # the trainer ran METRA's registered evaluation (training/skills.py)
    plots = sorted((run_dir / "eval").glob("skills_*.png"))
    assert len(plots) >= 2  # eval.every=100: one plot per evaluation
    # the run's last lines name the last skills plot, what a user opens first
    assert f"[latentrl] figure:     {plots[-1]}\n" in capsys.readouterr().out
    with open(run_dir / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("lambda")]
    assert rows, "no update was logged"
    for key in ("constraint", "lambda", "alpha", "policy_entropy", "phi_loss", "lambda_loss", "q_loss",
                "policy_loss", "intrinsic_reward_mean"):
        assert math.isfinite(float(rows[-1][key])), key
    assert float(rows[-1]["alpha"]) > 0
    agent, _ = load_agent(run_dir / "checkpoints" / "latest.pt")
    assert isinstance(agent, METRAAgent) and agent.config.obs_type == obs_type


# ----------------------------------------------------------------------------- METRA's baselines: LSD, DIAYN


def test_objectives_are_the_official_flag_combinations_and_flags_override_them():
    from latentrl.agents.metra import OBJECTIVES

    flags = ("inner", "unit_length", "dual_reg", "spectral_norm")
    # README: LSD = --dual_reg 0 --spectral_normalization 1; DIAYN = --inner 0 --unit_length 0 --dual_reg 0
    expected = {"metra": (True, True, True, False), "lsd": (True, True, False, True),
                "diayn": (False, False, False, False)}
    for objective, values in expected.items():
        cfg = METRAConfig(objective=objective)
        assert tuple(cfg.switch(f) for f in flags) == values == tuple(OBJECTIVES[objective][f] for f in flags)
    cfg = METRAConfig(objective="lsd", spectral_norm=False)  # an explicit flag wins over the objective
    assert (cfg.switch("spectral_norm"), cfg.switch("dual_reg")) == (False, False)
    assert METRAConfig().objective == "metra"  # the default is METRA itself


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "dads"}, "objective must be one of"),
    ({"objective": "diayn", "dual_reg": True}, "dual_reg=True needs inner=True"),
    ({"inner": False}, "dual_reg=True needs inner=True"),  # METRA's dual term with DIAYN's reward
    ({"spectral_norm": "yes"}, "spectral_norm must be true, false or None"),
])
def test_bad_objective_settings_are_refused_with_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        METRAConfig(**kwargs)


def test_objective_reaches_the_agent_from_the_command_line_and_the_recipes():
    from latentrl.training.cli import load_config

    for overrides, objective in ((["agent=metra", "agent.objective=lsd"], "lsd"), (["recipe=lsd_state"], "lsd"),
                                 (["recipe=diayn_state"], "diayn"), (["recipe=diayn_pixels"], "diayn")):
        cfg = load_config(overrides)
        config = METRAAgent.make_config(cfg.agent.preset, **cfg.agent.overrides)
        assert config.objective == objective, overrides


def test_diayn_skills_are_gaussian_not_unit_length():
    g = torch.Generator().manual_seed(0)
    skills = sample_skills(500, 2, False, generator=g, unit_length=False)
    assert torch.equal(skills, torch.randn(500, 2, generator=torch.Generator().manual_seed(0)))
    agent = _agent(objective="diayn")
    policy = agent.policy(explore=True)
    policy(TensorDict({"state": torch.randn(200, 2)}, [200]))
    norms = policy.extras()["skill"].norm(dim=-1)
    assert norms.std() > 0.2 and not torch.allclose(norms, torch.ones(200))  # N(0, I), as --unit_length 0
    assert not torch.allclose(agent.sample_skills(50).norm(dim=-1), torch.ones(50))
    from latentrl.training.skills import _eval_skills

    eval_skills, _ = _eval_skills(4, False, 48, 0, unit_length=agent.config.switch("unit_length"))
    assert not torch.allclose(eval_skills.norm(dim=-1), torch.ones(48))  # evaluation draws from the same prior
    lsd = _agent(objective="lsd").policy(explore=True)
    lsd(TensorDict({"state": torch.randn(20, 2)}, [20]))
    assert torch.allclose(lsd.extras()["skill"].norm(dim=-1), torch.ones(20))


@pytest.mark.parametrize("discrete", [False, True])
def test_diayn_reward_is_the_skill_log_likelihood_of_the_next_state(discrete):
    agent = _agent(objective="diayn", discrete=discrete, dim_option=3)
    wm = agent.world_model
    s, s_next = torch.randn(5, 2), torch.randn(5, 2)
    z = F.one_hot(torch.arange(5) % 3, 3).float() if discrete else torch.randn(5, 3)
    with torch.no_grad():
        h = wm.encoder(s_next)
        mean, log_std = wm.head(h), wm.log_std_head(h)
        if discrete:
            expected = torch.log_softmax(mean, dim=-1)[torch.arange(5), torch.arange(5) % 3]
        else:
            expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(z).sum(-1)
    reward = agent.intrinsic_reward(_batch(s, s_next, z))
    assert torch.allclose(reward, expected, atol=1e-6)
    other = agent.intrinsic_reward(_batch(torch.randn(5, 2), s_next, z))
    assert torch.allclose(other, reward)  # s does not enter: q(z | s')
    metrics = agent.update(_batch(s, s_next, z))
    assert metrics["lambda_loss"] == 0.0 and "constraint" not in metrics


def test_diayn_has_no_goal_mode_and_lsd_reaches_goals_with_phi_differences():
    goal = GoalObservation(TensorDict({"state": torch.randn(2, 2)}, [2]))
    agent = _agent(objective="diayn")
    with pytest.raises(UnsupportedTaskError, match="DIAYN"):
        agent.infer_task(goal)
    with pytest.raises(UnsupportedTaskError, match="inner=False"):
        agent.policy(Task(z=torch.randn(2, 4), info={"kind": "goal"}))
    agent.policy(agent.skill_task(torch.randn(4)))  # skills still run
    lsd = _agent(objective="lsd").eval()  # eval mode: no power iteration, phi is fixed between the calls
    task = lsd.infer_task(goal)
    policy = lsd.policy(task)
    obs = TensorDict({"state": torch.randn(2, 2)}, [2])
    policy(obs)
    with torch.no_grad():
        direction = lsd.world_model.phi(goal.obs["state"]) - lsd.world_model.phi(obs["state"])
    assert torch.allclose(policy.extras()["skill"], direction / direction.norm(dim=-1, keepdim=True), atol=1e-5)


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_lsd_spectrally_normalises_every_layer_of_phi_only(obs_type):
    torch.manual_seed(0)
    agent = _agent(objective="lsd", obs_type=obs_type, hidden_dim=16)
    wm = agent.world_model
    layers = [m for m in wm.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and all(hasattr(m, "weight_orig") for m in layers)  # the head's Linears, the CNN's convs
    assert len([m for m in layers if isinstance(m, torch.nn.Conv2d)]) == (4 if obs_type == "pixels" else 0)
    others = [m for net in (agent.actor, agent.critic1, agent.critic2) for m in net.modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert others and not any(hasattr(m, "weight_orig") for m in others)  # policy and Qs: plain layers
    x = torch.randn(8, 2) if obs_type == "state" else torch.randint(0, 256, (8, 9, IMAGE, IMAGE), dtype=torch.uint8)
    for _ in range(100):  # power iterations converge: each effective weight has spectral norm 1
        wm.phi(x)
    def sigma(w):
        return torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1), ord=2).item()

    assert all(sigma(m.weight) == pytest.approx(1.0, abs=1e-2) for m in layers)
    assert max(abs(sigma(m.weight_orig) - 1.0) for m in layers) > 0.1  # not so by construction
    assert not any(hasattr(m, "weight_orig") for m in _agent().world_model.modules())  # METRA: none


@pytest.mark.parametrize("objective", ["lsd", "diayn"])
def test_train_agent_smoke_of_the_baselines_and_checkpoint_reload(tmp_path, objective):
    from latentrl.training.checkpoint import load_agent
    from latentrl.training.cli import train_main

    run_dir = tmp_path / objective
    result = train_main(["agent=metra", "preset=smoke", "env=cheetah-run", "log.progress=false",
                         "log.tensorboard=false", "eval.video=false", f"run_dir={run_dir}", "agent.obs_type=physics",
                         f"agent.objective={objective}", "steps=200", "env.episode_length=50"])
    assert result["eval/coverage"] >= 1
    agent, _ = load_agent(run_dir / "checkpoints" / "latest.pt")
    assert agent.config.objective == objective
    if objective == "lsd":  # the spectral-norm state (weight_orig, u, v) comes back
        layer = agent.world_model.head[0]
        assert hasattr(layer, "weight_u") and layer.weight_u.norm().item() == pytest.approx(1.0, abs=1e-5)
