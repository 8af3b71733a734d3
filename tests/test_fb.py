"""FB baseline: the FB loss by hand, reward / goal inference, EMA targets, target shapes, z sampling,
policies, presets, and offline training through train_agent.py (states and pixels)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from latentrl.agents import GoalObservation, RewardSamples, Task, make_agent
from latentrl.agents.fb import PRESETS, FBAgent, FBConfig, weighted_sum_task
from latentrl.agents.td_jepa import lstsq_task
from latentrl.world_models.fb import fb_loss
from latentrl.world_models.sphere import project_to_sphere, sample_sphere
from latentrl.world_models.zero_shot import orthonormality_loss

from fakes import ACTION_DIM, IMAGE, SpecEnv, replay_batch

SMOKE = ["preset=smoke", "log.progress=false", "log.tensorboard=false", "eval.video=false"]


def _agent(obs_type: str = "state", **overrides) -> FBAgent:
    return FBAgent.from_env(SpecEnv(), preset="smoke", obs_type=obs_type, **overrides)


# ------------------------------------------------------------------------------------------ losses


def test_fb_loss_matches_a_hand_computed_case():
    m = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]])  # [E=2, B=2, B=2]
    target = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    discount = torch.tensor([[0.5], [1.0]])  # scales row i of the target
    # diff[0] = [[0.5, 2], [1, 2]], diff[1] = [[-0.5, 1], [-1, -2]]
    # offdiag = 0.5 * (2^2 + 1^2 + 1^2 + 1^2) / (2 * 1) = 1.75
    # diag = -E * mean(0.5, 2, -0.5, -2) = 0
    loss, diag, offdiag = fb_loss(m, target, discount)
    assert offdiag.item() == pytest.approx(1.75)
    assert diag.item() == pytest.approx(0.0)
    assert loss.item() == pytest.approx(1.75)
    _, diag1, _ = fb_loss(m[:1], target, discount)
    assert diag1.item() == pytest.approx(-(0.5 + 2.0) / 2)


def test_reward_inference_is_the_projected_reward_weighted_sum_of_b():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(50, 4, generator=g)
    r = torch.randn(50, 1, generator=g)
    by_hand = sum(r[i, 0] * b[i] for i in range(50))
    torch.testing.assert_close(weighted_sum_task(b, r), 2.0 * by_hand / by_hand.norm())
    torch.testing.assert_close(weighted_sum_task(b, 3.0 * r), weighted_sum_task(b, r))
    # With isotropic B (B^T B = N I) it recovers a planted z; with correlated B it differs from lstsq.
    q, _ = torch.linalg.qr(torch.randn(64, 4, generator=g))
    iso = q * 8.0  # columns orthogonal, B^T B = 64 I
    z_true = torch.randn(4, generator=g)
    torch.testing.assert_close(weighted_sum_task(iso, iso @ z_true[:, None]), project_to_sphere(z_true))
    skewed = iso @ torch.tensor([[3.0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    reward = skewed @ z_true[:, None]
    assert not torch.allclose(weighted_sum_task(skewed, reward), lstsq_task(skewed, reward)[0], atol=1e-2)


# ------------------------------------------------------------------------------- networks and targets


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_shapes_norms_and_zero_shot_tasks(obs_type):
    torch.manual_seed(0)
    agent = _agent(obs_type)
    cfg, wm, n = agent.config, agent.world_model, 6
    assert wm.capabilities == {"encode", "successor"}
    assert wm.state_encoder is agent.left and wm.task_encoder is agent.backward_map  # L and B: two encoders
    assert agent.left is not agent.backward_map
    batch = replay_batch(obs_type, n)
    left, b = wm.encode(batch), agent.task_embedding(batch["next"])
    assert left.shape == (n, cfg.L_dim) and b.shape == (n, cfg.z_dim)
    torch.testing.assert_close(left.norm(dim=-1), torch.full((n,), math.sqrt(cfg.L_dim)))
    torch.testing.assert_close(b.norm(dim=-1), torch.full((n,), math.sqrt(cfg.z_dim)))
    z = sample_sphere(n, cfg.z_dim)
    assert wm.successor(left, batch["action"], z).shape == (cfg.ensemble_size, n, cfg.z_dim)

    obs, next_obs, _, discount = wm.training_inputs(batch, cfg.discount)
    with torch.no_grad():
        target_m, next_action = wm.fb_target(agent.left.trunk(next_obs), agent.backward_map.trunk(next_obs), z,
                                             agent.target_action)
    assert target_m.shape == (n, n) and next_action.shape == (n, ACTION_DIM)

    reward = torch.randn(n, 1)
    task = agent.infer_task(RewardSamples(obs=batch["next"], reward=reward))
    torch.testing.assert_close(task.z, weighted_sum_task(b, reward))
    goal = agent.infer_task(GoalObservation(obs=batch["next"][:2]))
    torch.testing.assert_close(goal.z, b[:2])  # B is already on the sphere: project(B(g)) = B(g)


def test_ema_moves_only_the_target_maps():
    torch.manual_seed(0)
    agent = _agent("pixels", batch_size=4, f_target_tau=0.01, b_target_tau=0.05)
    targets = agent.world_model.targets
    assert set(targets) == {"left_head", "forward_map", "backward_head"}
    assert not any(isinstance(m, torch.nn.Conv2d) for m in targets.modules())
    online = {"left_head": agent.left.head, "forward_map": agent.forward_map, "backward_head": agent.backward_map.head}
    tau = {"left_head": 0.01, "forward_map": 0.01, "backward_head": 0.05}
    expected = {k: [p.detach().clone() for p in targets[k].parameters()] for k in online}
    trunk_before = copy.deepcopy(agent.backward_map.trunk.state_dict())
    for seed in range(2):
        metrics = agent.update(replay_batch("pixels", 4, seed))
        for key, module in online.items():
            expected[key] = [t.lerp(p.detach(), tau[key]) for t, p in zip(expected[key], module.parameters(),
                                                                             strict=True)]
            for want, got in zip(expected[key], targets[key].parameters(), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(np.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(v, agent.backward_map.trunk.state_dict()[k]) for k, v in trunk_before.items())


def test_update_trains_each_network_with_its_optimizer():
    torch.manual_seed(0)
    agent = _agent("state", batch_size=8)
    assert set(agent.optimizers()) == {"forward", "backward", "actor"}
    before = copy.deepcopy(agent.state_dict())
    metrics = agent.update(replay_batch("state", 8))
    expected_metrics = {"fb_loss", "fb_diag", "fb_offdiag", "orth_loss", "actor_loss", "q", "z_goal_fraction"}
    assert expected_metrics <= set(metrics)
    def part(name: str) -> str:  # the EMA targets live in the world model: world_model.targets.<name>.<part>
        return ".".join(name.split(".")[: 4 if name.startswith("world_model.targets.") else 3])

    changed = {part(k) for k, v in agent.state_dict().items() if not torch.equal(v, before[k])}
    # L (left_encoder), B (backward_map) and F (forward_map) in FBModel's names
    assert {"world_model.left_encoder.head", "world_model.backward_map.head", "world_model.forward_map.embed_z",
            "actor.embed_z.0", "world_model.targets.forward_map.embed_z"} <= changed
    # the orthonormality term acts on B: its diagonal is the constant -d_z on the sphere
    assert metrics["orth_loss_diag"] == pytest.approx(-agent.z_dim, rel=1e-5)
    with torch.no_grad():
        b = agent.task_embedding(replay_batch("state", 8)["next"])
    assert orthonormality_loss(b)[1].item() == pytest.approx(-agent.z_dim, rel=1e-5)


def test_goal_z_come_from_online_b_of_next_states(monkeypatch):
    """The pre-training z mix uses project(B(s'_perm)) (online B), half of the rows on average."""
    import latentrl.world_models.fb as fb_module  # the model's loss draws the pre-training z

    torch.manual_seed(0)
    agent = _agent("state", batch_size=64)
    seen = {}
    original = fb_module.sample_mixed_z

    def spy(goals, ratio):
        z, is_goal = original(goals, ratio)
        seen.update(goals=goals.clone(), z=z, is_goal=is_goal, ratio=ratio)
        return z, is_goal

    monkeypatch.setattr(fb_module, "sample_mixed_z", spy)
    batch = replay_batch("state", 64)
    with torch.no_grad():
        b_next = agent.task_embedding(batch["next"])
    agent.update(batch)
    torch.testing.assert_close(seen["goals"], b_next)
    assert seen["ratio"] == 0.5 and seen["is_goal"].any()
    distance = (seen["z"][:, None] - b_next[None]).norm(dim=-1).min(dim=1).values
    assert torch.all(distance[seen["is_goal"]] < 1e-4)


def test_policy_uses_the_actor_mean_on_l_and_holds_z():
    torch.manual_seed(0)
    agent = _agent("pixels")
    z = sample_sphere(1, agent.z_dim)[0]
    policy = agent.policy(Task(z=z))
    frames = [torch.randint(0, 256, (2, 3, IMAGE, IMAGE), dtype=torch.uint8) for _ in range(3)]
    for frame in frames:
        action = policy(TensorDict({"pixels": frame}, [2]))
    stacked = TensorDict({"pixels": torch.cat(frames, dim=1)}, [2])
    with torch.no_grad():
        expected = agent.actor(agent.left(stacked["pixels"]), z.expand(2, -1), agent.config.actor_std).mean
    torch.testing.assert_close(action, expected)
    explore = agent.policy(explore=True)
    assert explore(TensorDict({"pixels": frames[0]}, [2])).shape == (2, ACTION_DIM)


# ------------------------------------------------------------------------------------ construction


def test_presets_and_construction():
    cfg = FBAgent.make_config("paper")
    assert cfg == FBConfig() and (cfg.obs_type, cfg.L_dim, cfg.z_dim, cfg.batch_size) == ("pixels", 256, 50, 512)
    assert (cfg.f_target_tau, cfg.b_target_tau, cfg.ortho_coef, cfg.discount) == (1e-3, 1e-3, 1.0, 0.98)
    assert FBAgent.make_config("paper", obs_type="state").batch_size == 1024
    small = FBAgent.make_config("small")
    assert small == FBConfig(**PRESETS["small"]) and (small.L_dim, small.z_dim, small.batch_size) == (64, 16, 256)
    assert FBAgent.make_config("small", obs_type="pixels").batch_size == 64
    assert FBAgent.required_obs() == ("pixels",) and FBAgent.required_obs("smoke") == ("state",)
    agent = make_agent("fb", SpecEnv(), preset="smoke", obs_type="pixels")
    assert isinstance(agent, FBAgent)
    spec = agent.sample_spec()
    assert (spec.batch_size, spec.frame_stack, spec.keys) == (16, 3, ("pixels",))
    assert agent.left.trunk is not agent.backward_map.trunk  # separate fw and bw trunks
    with pytest.raises(ValueError, match="did you mean z_dim"):
        FBAgent.from_env(SpecEnv(), preset="smoke", z_dimm=3)

    import latentrl.configs

    yaml = OmegaConf.load(Path(latentrl.configs.__file__).parent / "agent" / "fb.yaml")
    assert yaml.name == "fb" and yaml.preset == "paper" and dict(yaml.overrides) == {}
