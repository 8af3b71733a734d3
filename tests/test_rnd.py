"""RND agent: intrinsic reward, updates from pixels and states, checkpoints, policy, and coverage."""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from latentrl.agents import UnsupportedTaskError, make_agent
from latentrl.agents.actor_critic import (
    DDPGActorCritic,
    DeterministicActor,
    TruncatedNormal,
    TwinQCritic,
    schedule,
)
from latentrl.agents.base import RewardSamples, Task
from latentrl.agents.rnd import PRESETS, RNDAgent, RNDConfig
from latentrl.world_models.layers import RunningMeanStd, soft_update_params

from fakes import ACTION_DIM, IMAGE, STATE_DIM, SpecEnv, random_obs

TINY = {"hidden_dim": 64, "feature_dim": 16, "rnd_rep_dim": 32, "batch_size": 8}


def _batch(obs_type: str, n: int, seed: int = 0) -> TensorDict:
    """A replay batch as ``ReplayBuffer.sample(n, frame_stack=3)`` returns it (reward-free)."""
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            **random_obs(obs_type, n, generator=g),
            "action": torch.rand(n, ACTION_DIM, generator=g) * 2 - 1,
            "next": {
                **random_obs(obs_type, n, generator=g),
                "reward": torch.full((n, 1), float("nan")),
                "terminated": torch.zeros(n, 1, dtype=torch.bool),
                "truncated": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        batch_size=[n],
    )


def _agent(obs_type: str, **overrides) -> RNDAgent:
    return RNDAgent.from_env(SpecEnv(), preset="smoke", obs_type=obs_type, **{**TINY, **overrides})


# --------------------------------------------------------------------------------- intrinsic reward


def test_intrinsic_reward_falls_on_revisited_states_only():
    torch.manual_seed(0)
    agent = RNDAgent(RNDConfig(**{**TINY, "batch_size": 64, "lr": 1e-3}), (STATE_DIM,), ACTION_DIM)
    seen = torch.randn(64, STATE_DIM)
    unseen = 2.0 * torch.randn(64, STATE_DIM) + 3.0  # another distribution
    batch = _batch("state", 64)
    batch["state"] = seen

    def reward(states):
        return agent.intrinsic_reward(TensorDict({"state": states}, [len(states)])).mean().item()

    def error(states):
        with torch.no_grad():
            return agent.rnd(states).mean().item()

    agent.update(batch)  # first update: the running statistics now describe `seen`
    before, error_before = reward(seen), error(seen)
    for _ in range(100):
        agent.update(batch)
    after, error_after = reward(seen), error(seen)
    print(f"intrinsic reward on revisited states: {before:.3f} -> {after:.3f}; unseen {reward(unseen):.3f}")
    assert after < 0.5 * before
    assert error_after < 0.5 * error_before
    assert reward(unseen) > 2.0 * after
    assert agent.intrinsic_reward(TensorDict({"state": seen[:1]}, [1])).shape == (1, 1)


def test_intrinsic_reward_is_normalised_by_running_std():
    agent = _agent("state")
    for seed in range(3):
        agent.update(_batch("state", 8, seed))
    obs = TensorDict(random_obs("state", 5), [5])
    with torch.no_grad():
        error = agent.rnd(obs["state"])
    expected = agent.config.rnd_scale * error / (agent.intrinsic_reward_rms.var.sqrt() + 1e-8)
    torch.testing.assert_close(agent.intrinsic_reward(obs), expected)
    stats = copy.deepcopy(agent.intrinsic_reward_rms.state_dict())
    agent.intrinsic_reward(obs)  # reading the reward leaves the statistics alone
    torch.testing.assert_close(agent.intrinsic_reward_rms.state_dict(), stats)


# ---------------------------------------------------------------------------------------- updates


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_update_returns_finite_metrics(obs_type):
    torch.manual_seed(0)
    agent = _agent(obs_type)
    for seed in range(2):
        metrics = agent.update(_batch(obs_type, 8, seed))
    expected = {"critic_loss", "actor_loss", "rnd_loss", "q_mean"}
    expected |= {"intrinsic_reward_mean", "intrinsic_reward_std"}
    assert expected <= set(metrics)
    assert all(v.shape == () and np.isfinite(float(v)) for v in metrics.values()), metrics


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_update_trains_everything_but_the_target_network(obs_type):
    torch.manual_seed(0)
    agent = _agent(obs_type)
    before = copy.deepcopy(agent.state_dict())
    agent.update(_batch(obs_type, 8))
    after = agent.state_dict()
    targets = [name for name in before if name.startswith("world_model.rnd.target.")]
    assert targets
    for name in targets:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)

    def part(name: str) -> str:  # the distillation pair lives in the world model: world_model.rnd.<part>
        return ".".join(name.split(".")[: 3 if name.startswith("world_model.rnd.") else 2])

    changed = {part(name) for name in before if not torch.equal(before[name], after[name])}
    expected = {"world_model.rnd.predictor", "world_model.rnd.obs_rms", "actor_critic.actor", "actor_critic.critic"}
    expected.add("actor_critic.critic_target")
    if obs_type == "pixels":
        expected.add("world_model.encoder")
    assert expected <= changed
    assert not any(p.requires_grad for p in agent.rnd.target.parameters())


def test_termination_stops_bootstrapping_and_truncation_does_not():
    torch.manual_seed(0)
    actor = DeterministicActor(4, 2, 8, 16, 1)
    critic = TwinQCritic(4, 2, 8, 16, 1, action_in_trunk=True)
    ac = DDPGActorCritic(actor, critic)
    obs, action, next_obs = torch.randn(5, 4), torch.rand(5, 2), torch.randn(5, 4)
    reward = torch.randn(5, 1)
    _, m_end = ac.critic_loss(obs, action, reward, torch.zeros(5, 1), next_obs, 0.2, 0.3)
    torch.testing.assert_close(m_end["critic_target_q"], reward.mean())

    # Through the agent: a terminal step's target is its (intrinsic) reward alone; a truncated one bootstraps.
    agent = _agent("state")
    batch = _batch("state", 8)
    batch["next", "terminated"][:] = True
    metrics = {k: float(v) for k, v in copy.deepcopy(agent).update(batch).items()}
    assert metrics["critic_target_q"] == pytest.approx(metrics["intrinsic_reward_mean"], rel=1e-5)
    batch["next", "terminated"][:] = False
    batch["next", "truncated"][:] = True
    metrics = {k: float(v) for k, v in copy.deepcopy(agent).update(batch).items()}
    assert metrics["critic_target_q"] != pytest.approx(metrics["intrinsic_reward_mean"], rel=1e-3)


# ------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
def test_checkpoint_round_trip(obs_type):
    torch.manual_seed(0)
    agent = _agent(obs_type)
    for seed in range(2):
        agent.update(_batch(obs_type, 8, seed))
    agent.observe_env_steps(123)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": agent.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in agent.optimizers().items()},
            "extra": agent.extra_state(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    torch.manual_seed(1)
    restored = _agent(obs_type)
    restored.load_state_dict(checkpoint["model"])
    for name, opt in restored.optimizers().items():
        opt.load_state_dict(checkpoint["optimizers"][name])
    restored.load_extra_state(checkpoint["extra"])

    assert restored.env_steps == 123
    for name in ("mean", "var", "count"):
        torch.testing.assert_close(getattr(restored.rnd.obs_rms, name), getattr(agent.rnd.obs_rms, name))
        torch.testing.assert_close(
            getattr(restored.intrinsic_reward_rms, name), getattr(agent.intrinsic_reward_rms, name)
        )
    obs = TensorDict(random_obs(obs_type, 4), [4])
    torch.testing.assert_close(restored.intrinsic_reward(obs), agent.intrinsic_reward(obs))
    frame = obs.copy()
    if obs_type == "pixels":
        frame["pixels"] = frame["pixels"][:, -3:]
    torch.testing.assert_close(restored.policy()(frame), agent.policy()(frame))
    # Continuing training from the checkpoint is the same as never having stopped.
    batch = _batch(obs_type, 8, seed=7)
    torch.manual_seed(2)
    expected = agent.update(batch)
    torch.manual_seed(2)
    got = restored.update(batch)
    assert {k: float(v) for k, v in got.items()} == pytest.approx({k: float(v) for k, v in expected.items()})


def test_extra_state_loads_into_an_agent_without_the_buffers():
    agent = _agent("state")
    agent.update(_batch("state", 8))
    other = _agent("state")
    other.load_extra_state(agent.extra_state())
    torch.testing.assert_close(other.rnd.obs_rms.mean, agent.rnd.obs_rms.mean)
    torch.testing.assert_close(other.intrinsic_reward_rms.var, agent.intrinsic_reward_rms.var)


# ------------------------------------------------------------------------------------------ policy


def test_policy_explores_uniformly_during_seed_steps_then_follows_the_actor():
    torch.manual_seed(0)
    agent = _agent("state", num_seed_steps=10)
    obs = TensorDict(random_obs("state", 256), [256])
    explore, greedy = agent.policy(explore=True), agent.policy()
    random_actions = explore(obs)
    assert random_actions.shape == (256, ACTION_DIM)
    assert random_actions.abs().max() <= 1.0
    assert random_actions.std().item() == pytest.approx((1 / 3) ** 0.5, rel=0.1)  # U(-1, 1)
    torch.testing.assert_close(greedy(obs), greedy(obs))  # the greedy policy ignores seed steps
    agent.observe_env_steps(10)
    mean = greedy(obs)
    noisy = explore(obs)
    assert noisy.abs().max() <= 1.0
    residual = (noisy - mean).std().item()
    assert 0.1 < residual < 0.25  # stddev_schedule 0.2, truncated at the action bounds


def test_pixel_policy_stacks_single_frames():
    agent = _agent("pixels", num_seed_steps=0)
    policy = agent.policy(explore=False)
    frames = [torch.randint(0, 256, (2, 3, IMAGE, IMAGE), dtype=torch.uint8) for _ in range(3)]
    for frame in frames:
        action = policy(TensorDict({"pixels": frame}, [2]))
    assert action.shape == (2, ACTION_DIM)
    stacked = TensorDict({"pixels": torch.cat(frames, dim=1)}, [2])
    with torch.no_grad():
        torch.testing.assert_close(action, agent.actor(agent.world_model.encode(stacked), 0.2).mean)
    policy.reset()
    assert policy(TensorDict({"pixels": frames[0]}, [2])).shape == (2, ACTION_DIM)

    # The same through the explicit carry: frames oldest first; a restarted row is filled with its first frame.
    carry = policy.init_carry(2)
    for i, frame in enumerate(frames):
        step_action, carry = policy.step(TensorDict({"pixels": frame}, [2]), carry, torch.full((2,), i == 0))
    torch.testing.assert_close(step_action, action)
    assert torch.equal(carry["frames"], torch.stack(frames, dim=1))
    new = torch.randint(0, 256, (2, 3, IMAGE, IMAGE), dtype=torch.uint8)
    restarted_action, restarted = policy.step(TensorDict({"pixels": new}, [2]), carry, torch.tensor([True, False]))
    assert torch.equal(restarted["frames"][0], new[0].expand(3, -1, -1, -1))
    assert torch.equal(restarted["frames"][1], torch.stack([frames[1][1], frames[2][1], new[1]]))
    assert torch.equal(carry["frames"], torch.stack(frames, dim=1))  # the input carry is not modified
    with torch.no_grad():
        expected = agent.actor(agent.world_model.encode(TensorDict({"pixels": restarted["frames"].flatten(1, 2)},
                                                                   [2])), 0.2).mean
    torch.testing.assert_close(restarted_action, expected)


def test_rnd_takes_no_tasks():
    agent = _agent("state")
    with pytest.raises(UnsupportedTaskError, match="not task-conditioned"):
        agent.policy(Task(z=torch.zeros(1)))
    with pytest.raises(UnsupportedTaskError, match="rnd"):
        agent.infer_task(RewardSamples(obs=TensorDict(random_obs("state", 2), [2]), reward=torch.zeros(2, 1)))


# ------------------------------------------------------------------------------------ construction


def test_from_env_reads_specs_and_presets():
    agent = make_agent("rnd", SpecEnv(), preset="small", obs_type="pixels")
    assert isinstance(agent, RNDAgent) and agent.name == "rnd"
    assert agent.obs_shape == (3, IMAGE, IMAGE) and agent.action_dim == ACTION_DIM
    assert agent.world_model.repr_dim == 32 * 25 * 25
    assert agent.config == RNDConfig(obs_type="pixels", **PRESETS["small"])
    spec = agent.sample_spec()
    assert (spec.batch_size, spec.frame_stack, spec.horizon, spec.keys) == (256, 3, 1, ("pixels",))
    assert set(agent.optimizers()) == {"encoder", "actor", "critic", "rnd"}

    paper = RNDAgent.from_env(SpecEnv(("state",)))
    assert paper.config == RNDConfig() and paper.config.obs_type == "state"
    assert paper.sample_spec().frame_stack == 1 and paper.sample_spec().keys == ("state",)
    assert paper.sample_spec().batch_size == 1024
    assert set(paper.optimizers()) == {"actor", "critic", "rnd"}
    assert RNDAgent.required_obs() == ("state",)
    assert RNDAgent.required_obs("small", obs_type="pixels") == ("pixels",)


def test_from_env_errors_name_the_fix():
    with pytest.raises(ValueError, match="did you mean hidden_dim"):
        RNDAgent.from_env(SpecEnv(), hidden_dimm=3)
    with pytest.raises(ValueError, match="valid presets: paper, small, smoke"):
        RNDAgent.from_env(SpecEnv(), preset="large")
    with pytest.raises(ValueError, match=r"obs=\('state',\)\) or pass obs_type='pixels'"):
        RNDAgent.from_env(SpecEnv(("pixels",)))
    with pytest.raises(ValueError, match="obs_type must be one of"):
        RNDAgent.from_env(SpecEnv(), obs_type="rgb")


def test_hydra_group_file_builds_the_agent():
    import latentrl.configs

    path = Path(latentrl.configs.__file__).parent / "agent" / "rnd.yaml"
    cfg = OmegaConf.load(path)
    assert cfg.name == "rnd" and cfg.preset == "paper" and dict(cfg.overrides) == {}
    agent = make_agent(cfg.name, SpecEnv(), preset=cfg.preset, **{**cfg.overrides, "obs_type": "state"})
    assert agent.config == RNDConfig()


# ----------------------------------------------------------------------------------- common pieces


def test_running_mean_std_matches_numpy():
    rms = RunningMeanStd((3,))
    chunks = [torch.randn(n, 3) * 2 + 1 for n in (5, 17, 40)]
    for chunk in chunks:
        rms.update(chunk)
    data = torch.cat(chunks).double().numpy()
    np.testing.assert_allclose(rms.mean.numpy(), data.mean(0), rtol=1e-4, atol=1e-4)
    # Pooled variance of batches whose own variances are unbiased (as URLB's RMS): within + between.
    arrays = [c.double().numpy() for c in chunks]
    pooled = sum(len(a) * (a.var(0, ddof=1) + (a.mean(0) - data.mean(0)) ** 2) for a in arrays) / len(data)
    np.testing.assert_allclose(rms.var.numpy(), pooled, rtol=1e-4)
    assert rms.count.item() == pytest.approx(62, abs=1e-3)
    assert rms.normalize(torch.full((1, 3), 1e6), clip=5.0).max() == 5.0


def test_schedule_truncated_normal_and_soft_update():
    assert schedule(0.2, 10) == 0.2 and schedule("0.2", 10) == 0.2
    assert schedule("linear(1.0,0.1,100)", 50) == pytest.approx(0.55)
    assert schedule("linear(1.0,0.1,100)", 1000) == pytest.approx(0.1)
    assert schedule("step_linear(1.0,0.5,10,0.1,10)", 15) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule("cosine(1,0)", 0)

    dist = TruncatedNormal(torch.full((10000,), 0.9), torch.full((10000,), 0.5))
    samples = dist.sample(clip=0.3)
    assert samples.max() < 1.0 and samples.min() >= 0.6 - 1e-6
    loc = torch.zeros(3, requires_grad=True)
    TruncatedNormal(loc, torch.ones(3)).sample().sum().backward()
    torch.testing.assert_close(loc.grad, torch.ones(3))  # straight-through clamp

    net, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.01 * p + 0.99 * q for p, q in zip(net.parameters(), target.parameters(), strict=True)]
    soft_update_params(net, target, 0.01)
    for got, want in zip(target.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_smoke_collects_into_the_replay_buffer_and_trains():
    """make_env -> explore policy -> ReplayBuffer -> update on ``buffer.sample(**asdict(sample_spec()))``."""
    pytest.importorskip("latentrl.envs.dmc")
    replay = pytest.importorskip("latentrl.replay")
    from torchrl.envs.utils import step_mdp

    from latentrl.envs import make_env

    torch.manual_seed(0)
    env = make_env("walker-walk", obs=("state",), num_envs=2, seed=0, num_workers=0)
    try:
        agent = make_agent("rnd", env, preset="smoke")
        buffer = replay.ReplayBuffer(1000)
        policy = agent.policy(explore=True)
        td = env.reset()
        metrics = {}
        for _ in range(40):
            td["action"] = policy(td)
            td = env.step(td)
            buffer.extend(td)
            agent.observe_env_steps(env.batch_size[0])
            td = step_mdp(td)
            if agent.env_steps >= agent.config.num_seed_steps:
                metrics = agent.update(buffer.sample(**dataclasses.asdict(agent.sample_spec())))
    finally:
        env.close()
    assert agent.env_steps == 80 and metrics and all(np.isfinite(v) for v in metrics.values())


# ----------------------------------------------------------------------------------------- coverage


def _walker_coverage_run(env, agent: RNDAgent | None, steps: int) -> np.ndarray:
    """``steps`` env steps on walker states; returns the visited joint positions qpos ``[steps, 9]``.

    With an agent: collect -> list buffer -> one update every ``update_every_steps`` after the seed
    steps, as the trainer does. Without: uniform random actions.
    """
    policy = agent.policy(explore=True) if agent is not None else None
    buffer: dict[str, list[torch.Tensor]] = {"state": [], "action": [], "next_state": [], "terminated": []}
    qpos = np.zeros((steps, 9))
    td = env.reset()
    for i in range(steps):
        action = policy(td.select("state")) if policy is not None else torch.rand(1, ACTION_DIM) * 2 - 1
        td["action"] = action
        nxt = env.step(td)["next"]
        qpos[i] = nxt["physics"][0, :9].numpy()  # mjSTATE_PHYSICS starts with qpos
        if agent is not None:
            step = (td["state"], action, nxt["state"], nxt["terminated"])
            for key, value in zip(buffer, step, strict=True):
                buffer[key].append(value[0])
            agent.observe_env_steps(1)
            cfg = agent.config
            if agent.env_steps >= cfg.num_seed_steps and agent.env_steps % cfg.update_every_steps == 0:
                idx = torch.randint(0, len(buffer["state"]), (cfg.batch_size,)).tolist()
                b = {key: torch.stack([values[j] for j in idx]) for key, values in buffer.items()}
                batch = {"state": b["state"], "action": b["action"]}
                batch["next"] = {"state": b["next_state"], "terminated": b["terminated"]}
                agent.update(TensorDict(batch, [cfg.batch_size]))
        if nxt["done"].any():
            td = env.reset()
            if policy is not None:
                policy.reset()
        else:
            td = nxt.exclude("reward", "done", "terminated", "truncated")
    return qpos


def _coverage(qpos: np.ndarray) -> dict[str, float]:
    """Spread of walker poses: torso height (rootz), torso angle (rooty) and the six joint angles."""
    angle = np.mod(qpos[:, 2] + np.pi, 2 * np.pi)
    height_angle, _, _ = np.histogram2d(
        qpos[:, 0], angle, bins=[np.linspace(-1.4, 0.6, 21), np.linspace(0.0, 2 * np.pi, 25)]
    )
    return {
        "height_angle_bins": float((height_angle > 0).sum()),
        "height_std": float(qpos[:, 0].std()),
        "joint_std": float(qpos[:, 3:].std(axis=0).mean()),
    }


@pytest.mark.slow
def test_rnd_covers_more_walker_states_than_random_actions():
    pytest.importorskip("latentrl.envs.dmc")
    from latentrl.envs import make_env

    steps, seed = 10_000, 0  # 10 episodes; RND learns (small preset) after 1000 random seed steps
    coverage = {}
    for name in ("random", "rnd"):
        torch.manual_seed(seed)
        env = make_env("walker-walk", obs=("state", "physics"), num_envs=1, seed=seed)
        try:
            agent = RNDAgent.from_env(env, preset="small") if name == "rnd" else None
            coverage[name] = _coverage(_walker_coverage_run(env, agent, steps))
        finally:
            env.close()
    print(f"walker coverage after {steps} steps: RND {coverage['rnd']} vs random {coverage['random']}")
    rnd, random = coverage["rnd"], coverage["random"]
    # Measured at 10k steps, RND vs random: seed 0 bins 236 vs 150, height std 0.25 vs 0.17, joint std 0.83
    # vs 0.73; seeds 1 and 2 (same setup) gave bins 209 / 214 vs 153 / 149, height std 0.20 / 0.20 vs
    # 0.15 / 0.15, joint std 0.89 / 0.85 vs 0.73 / 0.74.
    assert rnd["height_angle_bins"] > 1.25 * random["height_angle_bins"]
    assert rnd["height_std"] > 1.2 * random["height_std"]
    assert rnd["joint_std"] > random["joint_std"]
