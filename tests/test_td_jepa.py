"""TD-JEPA: reward and goal inference, orthonormality loss, EMA targets, TD targets, z sampling,
relabelling, policies, presets, and offline training through train_agent.py (states and pixels)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from latentrl.agents import GoalObservation, RewardSamples, Task, UnsupportedTaskError, make_agent
from latentrl.agents.td_jepa import PRESETS, TDJEPAAgent, TDJEPAConfig, lstsq_task
from latentrl.agents.zero_shot import heldout_linear_r2
from latentrl.world_models.sphere import project_to_sphere, sample_mixed_z, sample_sphere
from latentrl.world_models.td_jepa import TDJEPAModel, effective_rank, predictive_loss
from latentrl.world_models.zero_shot import orthonormality_loss

from fakes import IMAGE, STATE_DIM, SpecEnv, random_obs, replay_batch

SMOKE = ["preset=smoke", "log.progress=false", "log.tensorboard=false", "eval.video=false"]


def _agent(obs_type: str = "state", **overrides) -> TDJEPAAgent:
    return TDJEPAAgent.from_env(SpecEnv(), preset="smoke", obs_type=obs_type, **overrides)


# ------------------------------------------------------------------------------------ task inference


def test_lstsq_recovers_a_planted_z_from_synthetic_features():
    g = torch.Generator().manual_seed(0)
    psi = project_to_sphere(torch.randn(2000, 16, generator=g))
    z_true = torch.randn(16, generator=g)
    reward = psi @ z_true[:, None] + 1e-3 * torch.randn(2000, 1, generator=g)
    z, solution = lstsq_task(psi, reward)
    torch.testing.assert_close(solution, z_true, atol=1e-3, rtol=0)
    torch.testing.assert_close(z, project_to_sphere(z_true), atol=1e-3, rtol=0)
    assert z.norm().item() == pytest.approx(4.0, abs=1e-5)
    # The scale of the reward is irrelevant (z is re-projected), its sign is not.
    torch.testing.assert_close(lstsq_task(psi, 37.0 * reward)[0], z, atol=1e-5, rtol=0)
    torch.testing.assert_close(lstsq_task(psi, -reward)[0], -z, atol=1e-5, rtol=0)


def test_heldout_r2_is_one_for_rewards_in_the_span_of_the_features_and_near_zero_for_noise():
    g = torch.Generator().manual_seed(0)
    psi = project_to_sphere(torch.randn(2000, 16, generator=g))
    in_span = psi @ torch.randn(16, 1, generator=g)
    assert heldout_linear_r2(psi, in_span) == pytest.approx(1.0, abs=1e-9)
    noise = torch.randn(2000, 1, generator=g)
    assert -0.05 < heldout_linear_r2(psi, noise) < 0.05  # fitted on one half, scored on the other
    assert heldout_linear_r2(psi, 0.7 * in_span + 0.7 * in_span.std() * noise) == pytest.approx(0.5, abs=0.05)
    assert math.isnan(heldout_linear_r2(psi[:20], in_span[:20]))


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_infer_task_regresses_rewards_on_psi_of_next_observations(obs_type):
    torch.manual_seed(0)
    agent = _agent(obs_type)
    next_obs = TensorDict(random_obs(obs_type, 64), [64])
    psi = agent.task_embedding(next_obs)
    assert psi.shape == (64, agent.z_dim)
    torch.testing.assert_close(psi.norm(dim=-1), torch.full((64,), math.sqrt(agent.z_dim)))
    z_true = torch.randn(agent.z_dim)
    task = agent.infer_task(RewardSamples(obs=next_obs, reward=psi @ z_true[:, None]))
    assert isinstance(task, Task) and task.info["kind"] == "reward" and task.z.shape == (agent.z_dim,)
    assert task.info["reward_r2"] == pytest.approx(1.0, abs=1e-6)  # the planted reward is linear in psi
    torch.testing.assert_close(task.info["z_lstsq"], z_true, atol=1e-3, rtol=0)
    torch.testing.assert_close(task.z, project_to_sphere(z_true), atol=1e-4, rtol=0)
    scaled = agent.infer_task(RewardSamples(obs=next_obs, reward=5.0 * psi @ z_true[:, None]))
    torch.testing.assert_close(scaled.z, task.z, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="relabel"):
        agent.infer_task(RewardSamples(obs=next_obs, reward=torch.full((64, 1), float("nan"))))
    with pytest.raises(ValueError, match="rewards"):
        agent.infer_task(RewardSamples(obs=next_obs, reward=torch.zeros(3, 1)))


def test_goal_inference_is_the_projected_psi_of_the_goal_and_single_frames_are_stacked():
    torch.manual_seed(0)
    agent = _agent("pixels")
    frame = torch.randint(0, 256, (2, 3, IMAGE, IMAGE), dtype=torch.uint8)
    task = agent.infer_task(GoalObservation(obs=TensorDict({"pixels": frame}, [2])))
    with torch.no_grad():
        expected = project_to_sphere(agent.world_model.encode_task(frame.repeat(1, 3, 1, 1)))
    assert task.info["kind"] == "goal" and task.z.shape == (2, agent.z_dim)
    torch.testing.assert_close(task.z, expected)
    with pytest.raises(UnsupportedTaskError, match="infer_task"):
        agent.policy(Task())


# --------------------------------------------------------------------------------------- losses


def test_orthonormality_loss_matches_a_hand_computed_batch():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    # Gram off-diagonal entries (i < j): 0, 1, 2, 1, 0, 2 -> sum over i != j of squares = 2 * 10 = 20.
    # offdiag = 0.5 * 20 / (4 * 3) = 5/6; squared norms 1, 1, 2, 4 -> diag = -2.
    loss, diag, offdiag = orthonormality_loss(x)
    assert offdiag.item() == pytest.approx(5 / 6)
    assert diag.item() == pytest.approx(-2.0)
    assert loss.item() == pytest.approx(5 / 6 - 2.0)


def test_orthonormality_offdiagonal_term_is_zero_on_orthonormal_rows_and_positive_otherwise():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    orthonormal = q[:4]  # 4 orthonormal rows in R^6
    loss, diag, offdiag = orthonormality_loss(orthonormal)
    assert offdiag.item() == pytest.approx(0.0, abs=1e-12)
    assert diag.item() == pytest.approx(-1.0)  # the diagonal term is -mean ||x_i||^2, not 0
    assert loss.item() == pytest.approx(-1.0)
    skewed = orthonormal.clone()
    skewed[1] = (orthonormal[0] + orthonormal[1]) / math.sqrt(2)  # unit norm, not orthogonal to row 0
    _, diag2, offdiag2 = orthonormality_loss(skewed)
    # (x_0 . x_1)^2 = 1/2 for both orderings: offdiag = 0.5 * 1 / (4 * 3) = 1/24
    assert diag2.item() == pytest.approx(-1.0) and offdiag2.item() == pytest.approx(1 / 24)
    # On the sphere the diagonal is the constant -d, so only decorrelation acts.
    _, diag3, _ = orthonormality_loss(project_to_sphere(torch.randn(32, 5)))
    assert diag3.item() == pytest.approx(-5.0, rel=1e-6)


def test_predictive_loss_sums_features_and_averages_ensemble_and_batch():
    preds, target = torch.randn(2, 5, 3), torch.randn(5, 3)
    by_hand = sum(((preds[e, b] - target[b]) ** 2).sum() for e in range(2) for b in range(5)) / 10
    assert predictive_loss(preds, target).item() == pytest.approx(by_hand.item(), rel=1e-6)


# ------------------------------------------------------------------------------ networks and targets


@pytest.mark.parametrize("symmetric", [False, True])
def test_predictor_and_td_target_shapes(symmetric):
    torch.manual_seed(0)
    agent = _agent("state", symmetric=symmetric)
    cfg, wm, b = agent.config, agent.world_model, 8
    assert isinstance(wm, TDJEPAModel) and wm.capabilities == {"encode", "successor"}
    d_phi = cfg.psi_dim if symmetric else cfg.phi_dim
    batch = replay_batch("state", b)
    obs, next_obs, action, discount = wm.training_inputs(batch, cfg.discount)
    assert discount.shape == (b, 1) and torch.all(discount == cfg.discount)
    phi = wm.encode(batch)
    assert phi.shape == (b, d_phi)
    torch.testing.assert_close(phi.norm(dim=-1), torch.full((b,), math.sqrt(d_phi)))
    z = sample_sphere(b, cfg.psi_dim)
    assert wm.successor(phi, action, z).shape == (cfg.ensemble_size, b, cfg.psi_dim)
    assert wm.q_value(phi, action, z).shape == (b,)
    h = wm.trunk_features(obs, next_obs)
    target = wm.td_targets(h["next_phi"], h["next_psi"], z, discount, agent.target_action)
    assert target["phi"].shape == (b, cfg.psi_dim)
    if symmetric:
        assert "psi" not in target and wm.psi_predictor is None
        with pytest.raises(NotImplementedError):
            wm.predict_phi(phi, action, z)
    else:
        assert wm.predict_phi(wm.encode_task(batch), action, z).shape == (cfg.ensemble_size, b, cfg.phi_dim)
        assert target["psi"].shape == (b, cfg.phi_dim)

    # a' is the actor's TD3-noised action at the target phi(s'), not its mean.
    with torch.no_grad():
        next_phi = wm.targets["phi_head"](h["next_phi"])
        mean = agent.actor(next_phi, z, cfg.actor_std).mean
    noise = target["action"] - mean
    assert noise.abs().max() <= cfg.stddev_clip + 1e-6 and noise.abs().max() > 1e-3
    # With gamma_t = 0 (terminal transitions) the targets are the EMA embeddings of s' alone.
    ended = wm.td_targets(h["next_phi"], h["next_psi"], z, torch.zeros(b, 1), agent.target_action)
    with torch.no_grad():
        next_psi = next_phi if symmetric else wm.targets["psi_head"](h["next_psi"])
    torch.testing.assert_close(ended["phi"], next_psi)
    if not symmetric:
        torch.testing.assert_close(ended["psi"], next_phi)


def test_termination_zeroes_the_discount():
    agent = _agent("state")
    batch = replay_batch("state", 4)
    batch["next", "terminated"][1] = True
    discount = agent.world_model.training_inputs(batch, agent.config.discount)[3]
    assert discount.reshape(-1).tolist() == pytest.approx([0.98, 0.0, 0.98, 0.98])


def test_ema_moves_only_the_target_heads_and_predictors():
    torch.manual_seed(0)
    agent = _agent("pixels", batch_size=4, encoder_target_tau=0.01, predictor_target_tau=0.03)
    wm = agent.world_model
    targets = wm.targets
    # Targets exist for the heads and predictors only: the conv trunks have none.
    assert set(targets) == {"phi_head", "psi_head", "phi_predictor", "psi_predictor"}
    assert not any(isinstance(m, torch.nn.Conv2d) for m in targets.modules())
    assert not any(p.requires_grad for p in targets.parameters())
    online = {"phi_head": wm.phi_encoder.head, "psi_head": wm.psi_encoder.head,
              "phi_predictor": wm.phi_predictor, "psi_predictor": wm.psi_predictor}
    tau = {"phi_head": 0.01, "psi_head": 0.01, "phi_predictor": 0.03, "psi_predictor": 0.03}
    for key, module in online.items():  # targets start as copies
        for p, t in zip(module.parameters(), targets[key].parameters(), strict=True):
            torch.testing.assert_close(t, p, rtol=0, atol=0)
    expected = {k: [p.detach().clone() for p in targets[k].parameters()] for k in online}
    trunk_before = copy.deepcopy(wm.phi_encoder.trunk.state_dict())
    for seed in range(3):  # after k updates, the targets follow the EMA recursion exactly
        agent.update(replay_batch("pixels", 4, seed))
        for key, module in online.items():
            expected[key] = [t.lerp(p.detach(), tau[key]) for t, p in zip(expected[key], module.parameters(),
                                                                             strict=True)]
            for want, got in zip(expected[key], targets[key].parameters(), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The trunk is trained (by the TD-JEPA loss) without a target copy.
    assert any(not torch.equal(v, wm.phi_encoder.trunk.state_dict()[k]) for k, v in trunk_before.items())


def test_actor_step_trains_the_actor_only():
    torch.manual_seed(0)
    agent = _agent("state")
    batch = replay_batch("state", 8)
    obs, next_obs, _, _ = agent.world_model.training_inputs(batch, agent.config.discount)
    h = agent.world_model.trunk_features(obs, next_obs)
    z = sample_sphere(8, agent.z_dim)
    model_before = copy.deepcopy(agent.world_model.state_dict())
    actor_before = copy.deepcopy(agent.actor.state_dict())
    agent.actor_step(h["phi"].detach(), z)
    for k, v in agent.world_model.state_dict().items():
        torch.testing.assert_close(v, model_before[k], rtol=0, atol=0)
    assert any(not torch.equal(v, agent.actor.state_dict()[k]) for k, v in actor_before.items())


@pytest.mark.parametrize(("obs_type", "symmetric"), [("state", False), ("state", True), ("pixels", False)])
def test_update_returns_finite_metrics_and_trains_every_network(obs_type, symmetric):
    torch.manual_seed(0)
    agent = _agent(obs_type, symmetric=symmetric, batch_size=8)
    before = copy.deepcopy(agent.state_dict())
    metrics = agent.update(replay_batch(obs_type, 8))
    assert all(v.shape == () and np.isfinite(float(v)) for v in metrics.values()), metrics
    assert {"phi_loss", "phi_ortho_loss", "actor_loss", "q", "total_loss", "z_goal_fraction"} <= set(metrics)
    assert ("psi_loss" in metrics) != symmetric
    def part(name: str) -> str:  # the EMA targets live in the world model: world_model.targets.<name>
        return ".".join(name.split(".")[: 3 if name.startswith("world_model.targets.") else 2])

    changed = {part(k) for k, v in agent.state_dict().items() if not torch.equal(v, before[k])}
    expected = {"world_model.phi_encoder", "world_model.phi_predictor", "actor.embed_z",
                "world_model.targets.phi_head"}
    if not symmetric:
        expected |= {"world_model.psi_encoder", "world_model.psi_predictor", "world_model.targets.psi_predictor"}
    assert expected <= changed
    expected_optimizers = {"phi_encoder", "phi_predictor", "actor"}
    if not symmetric:
        expected_optimizers |= {"psi_encoder", "psi_predictor"}
    assert set(agent.optimizers()) == expected_optimizers


# ------------------------------------------------------------------------------------ z sampling


def _nearest(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Distance ``[N]`` from each row of ``x`` to the nearest row of ``rows`` (exact, no matmul trick)."""
    return (x[:, None] - rows[None]).norm(dim=-1).min(dim=1).values


def test_mixed_z_has_half_goals_and_the_sphere_norm():
    torch.manual_seed(0)
    dim, batch = 16, 256
    fractions = []
    for _ in range(100):
        goals = torch.randn(batch, dim) * 3.0
        z, is_goal = sample_mixed_z(goals, 0.5)
        fractions.append(is_goal.float().mean().item())
        torch.testing.assert_close(z.norm(dim=-1), torch.full((batch,), math.sqrt(dim)))
        # goal rows are the projected embedding of some (permuted) next state of the batch
        distance = _nearest(z, project_to_sphere(goals))
        assert torch.all(distance[is_goal] < 1e-4) and torch.all(distance[~is_goal] > 1e-2)
    assert np.mean(fractions) == pytest.approx(0.5, abs=0.05)
    assert sample_mixed_z(torch.randn(8, dim), 0.0)[1].sum() == 0
    assert sample_mixed_z(torch.randn(8, dim), 1.0)[1].all()


def test_agent_z_goals_come_from_online_psi_of_next_states():
    torch.manual_seed(0)
    agent = _agent("state")
    features = torch.randn(64, STATE_DIM)
    z, is_goal = agent.world_model.sample_z(features)
    with torch.no_grad():
        psi = agent.world_model.psi.head(features)
    distance = _nearest(z, psi)
    assert is_goal.any() and torch.all(distance[is_goal] < 1e-4)
    torch.testing.assert_close(z.norm(dim=-1), torch.full((64,), math.sqrt(agent.z_dim)))


def test_effective_rank():
    assert effective_rank(torch.eye(8) * 3).item() == pytest.approx(8.0, rel=1e-5)
    collapsed = torch.randn(100, 1) * torch.ones(1, 8)
    assert effective_rank(collapsed).item() == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------------------- policies


def test_policy_holds_the_task_z_and_acts_with_the_actor_mean():
    torch.manual_seed(0)
    agent = _agent("state")
    z = sample_sphere(1, agent.z_dim)[0]
    obs = TensorDict(random_obs("state", 5), [5])
    policy = agent.policy(Task(z=z))
    action = policy(obs)
    torch.testing.assert_close(action, agent.act(obs, z.expand(5, -1), mean=True))
    torch.testing.assert_close(policy.z, z.expand(5, -1))
    policy.reset(torch.tensor([True, False, False, False, False]))
    torch.testing.assert_close(policy(obs), action)  # a task's z survives resets
    assert action.abs().max() <= 1.0


def test_policy_without_task_draws_z_per_episode():
    torch.manual_seed(0)
    agent = _agent("state")
    obs = TensorDict(random_obs("state", 4), [4])
    policy = agent.policy()
    first = policy(obs)
    z = policy.z.clone()
    torch.testing.assert_close(z.norm(dim=-1), torch.full((4,), math.sqrt(agent.z_dim)))
    torch.testing.assert_close(policy(obs), first)  # z fixed within the episode, mean actions
    policy.reset(torch.tensor([False, True, False, False]))  # env 1 restarts at its next call
    policy(obs)
    assert torch.equal(policy.z[[0, 2, 3]], z[[0, 2, 3]]) and not torch.equal(policy.z[1], z[1])
    explore = agent.policy(explore=True)
    noisy = explore(obs)
    residual = (noisy - agent.act(obs, explore.z, mean=True)).std().item()
    assert 0.1 < residual < 0.25  # actor_std 0.2, truncated at the action bounds


def test_pixel_policy_stacks_single_frames():
    torch.manual_seed(0)
    agent = _agent("pixels")
    z = sample_sphere(1, agent.z_dim)[0]
    policy = agent.policy(Task(z=z))
    frames = [torch.randint(0, 256, (2, 3, IMAGE, IMAGE), dtype=torch.uint8) for _ in range(3)]
    for frame in frames:
        action = policy(TensorDict({"pixels": frame}, [2]))
    stacked = TensorDict({"pixels": torch.cat(frames, dim=1)}, [2])
    torch.testing.assert_close(action, agent.act(stacked, z.expand(2, -1)))


# ------------------------------------------------------------------------------------ construction


def test_presets_sample_spec_and_required_obs():
    paper = make_agent("td_jepa", SpecEnv())
    assert isinstance(paper, TDJEPAAgent) and paper.config == TDJEPAConfig()
    cfg = paper.config
    assert (cfg.obs_type, cfg.phi_dim, cfg.psi_dim, cfg.batch_size, cfg.discount) == ("pixels", 256, 50, 512, 0.98)
    assert (cfg.encoder_target_tau, cfg.predictor_target_tau, cfg.phi_ortho_coef, cfg.psi_ortho_coef) == (
        1e-3, 1e-3, 0.1, 0.1)
    spec = paper.sample_spec()
    assert (spec.batch_size, spec.frame_stack, spec.horizon, spec.keys) == (512, 3, 1, ("pixels",))
    trunk = paper.world_model.phi_encoder.trunk
    assert trunk.convnet.repr_dim == 32 * 25 * 25 and trunk.repr_dim == 256
    assert paper.world_model.aug.pad == 2
    assert paper.world_model.psi_encoder.trunk is not trunk  # separate trunks for phi and psi
    del paper

    proprio = TDJEPAAgent.make_config("paper", obs_type="state")
    assert proprio.batch_size == 1024 and proprio.phi_dim == 256
    small = TDJEPAAgent.make_config("small")
    assert small == TDJEPAConfig(**PRESETS["small"]) and small.obs_type == "state" and small.batch_size == 256
    small_pixels = TDJEPAAgent.make_config("small", obs_type="pixels")
    assert (small_pixels.batch_size, small_pixels.feature_dim, small_pixels.psi_dim) == (64, 64, 16)
    assert TDJEPAAgent.required_obs() == ("pixels",)
    assert TDJEPAAgent.required_obs("smoke") == ("state",)
    state_agent = _agent("state")
    assert state_agent.sample_spec().frame_stack == 1 and state_agent.sample_spec().keys == ("state",)


def test_construction_errors_name_the_fix():
    with pytest.raises(ValueError, match="did you mean psi_dim"):
        TDJEPAAgent.from_env(SpecEnv(), preset="smoke", psi_dimm=3)
    with pytest.raises(ValueError, match="valid presets: paper, small, smoke"):
        TDJEPAAgent.from_env(SpecEnv(), preset="large")
    with pytest.raises(ValueError, match=r"obs=\('pixels',\)\) or pass obs_type='state'"):
        TDJEPAAgent.from_env(SpecEnv(("state",)), preset="paper")


def test_hydra_group_file_builds_the_agent():
    import latentrl.configs

    cfg = OmegaConf.load(Path(latentrl.configs.__file__).parent / "agent" / "td_jepa.yaml")
    assert cfg.name == "td_jepa" and cfg.preset == "paper" and dict(cfg.overrides) == {}
    agent = make_agent(cfg.name, SpecEnv(), preset="smoke", **cfg.overrides)
    assert isinstance(agent, TDJEPAAgent)


# --------------------------------------------------------------------------- relabelling and training


@pytest.mark.parametrize("task_name", ["walker-walk", "point_mass_maze-reach_top_left"])
def test_relabelled_rewards_equal_the_rewards_the_env_returned(task_name):
    from torchrl.envs.utils import step_mdp

    from latentrl.envs import get_task, make_env
    from latentrl.replay import ReplayBuffer

    env = make_env(task_name, obs=("state", "physics"), num_envs=2, seed=0, num_workers=0, episode_length=30)
    buffer = ReplayBuffer(500)
    try:
        td = env.reset()
        for _ in range(70):  # episodes of 30 steps: both envs cross two episode ends
            td["action"] = env.action_spec.rand()
            td = env.step(td)
            buffer.extend(td)
            td = step_mdp(td)
    finally:
        env.close()
    torch.manual_seed(0)
    batch = buffer.sample(128, keys=("state", "physics"))
    logged = batch["next", "reward"].clone()
    assert torch.isfinite(logged).all() and logged.std() > 0  # the comparison can fail
    batch["next", "reward"].fill_(float("nan"))
    relabelled = ReplayBuffer.relabel(get_task(task_name), batch)["next", "reward"]
    assert (relabelled - logged).abs().max().item() < 1e-6
