"""The one evaluation path: ``rollout`` against a hand-written loop, the carry contract it drives,
what it records, the per-task body position, and the registry of agent-specific evaluations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from latentrl.agents.base import Agent, Policy
from latentrl.envs import body_position, get_task, make_env
from latentrl.envs.tasks import get_physics_state
from latentrl.training import evaluation
from latentrl.training.evaluation import evaluate_agent, register_evaluation, rollout


class StatePolicy(Policy):
    """A deterministic feedback policy on ``state`` with a step counter ``t`` in its carry."""

    def __init__(self, state_dim: int, action_dim: int):
        super().__init__("state", (state_dim,), action_dim)
        self.weight = torch.linspace(-1.0, 1.0, state_dim * action_dim).reshape(state_dim, action_dim)

    def init_carry(self, batch_size: int) -> TensorDict:
        carry = super().init_carry(batch_size)
        carry["t"] = torch.zeros(batch_size, dtype=torch.int64)
        return carry

    def act(self, x, carry, is_first):
        carry = carry.clone()
        carry["t"] = carry["t"] + 1
        return torch.tanh(x @ self.weight + 0.1 * carry["t"].unsqueeze(-1)), carry

    def extras(self, carry=None):
        carry = self.carry if carry is None else carry
        return {} if carry is None else {"t": carry["t"].clone()}


class RecordingPolicy(StatePolicy):
    """Records every ``step`` call: ``is_first``, the carry's counter before acting, and the observation."""

    def __init__(self, state_dim: int, action_dim: int):
        super().__init__(state_dim, action_dim)
        self.calls: list[dict] = []

    def step(self, obs, carry, is_first):
        self.calls.append({"is_first": torch.as_tensor(is_first).clone(), "t": carry["t"].clone(),
                           "physics": obs["physics"].clone()})
        return super().step(obs, carry, is_first)


def _env(task="point_mass-easy", num_envs=2, episode_length=6, seed=0, obs=("state", "physics")):
    return make_env(task, obs=obs, num_envs=num_envs, episode_length=episode_length, seed=seed, num_workers=0)


def _hand_written(env, policy: Policy, episodes: int) -> tuple[list[float], list[int]]:
    """The loop every evaluation used to write by hand, on the explicit carry."""
    n = env.batch_size[0]
    returns, lengths = [], []
    while len(returns) < episodes:
        td = env.reset()
        carry = policy.init_carry(n)
        is_first = torch.ones(n, dtype=torch.bool)
        ret, length = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)
        alive = torch.ones(n, dtype=torch.bool)
        while alive.any():
            action, carry = policy.step(td.select("state", "physics"), carry, is_first)
            is_first = torch.zeros(n, dtype=torch.bool)
            td["action"] = action
            nxt = env.step(td)["next"]
            ret += nxt["reward"].reshape(-1).double() * alive
            length += alive.long()
            alive &= ~nxt["done"].reshape(-1)
            td = nxt.clone(False)
        returns += ret.tolist()
        lengths += length.tolist()
    return returns[:episodes], lengths[:episodes]


@pytest.mark.parametrize("task", ["walker-walk", "cheetah-run"])
def test_rollout_returns_and_lengths_match_a_hand_written_loop(task):
    env_a, env_b, env_c = _env(task), _env(task), _env(task)
    policy = StatePolicy(env_a.observation_spec["state"].shape[-1], env_a.action_spec.shape[-1])
    try:
        result = rollout(env_a, policy, 3)  # two rounds of two envs, the spare episode dropped
        expected_returns, expected_lengths = _hand_written(env_b, policy, 3)
        assert result.lengths == expected_lengths == [6, 6, 6]
        assert np.allclose(result.returns, expected_returns, rtol=0, atol=1e-12)
        assert result.mean_return == pytest.approx(np.mean(expected_returns))
        assert len({round(r, 9) for r in result.returns}) > 1  # the episodes differ: a real check
        # The task's reward recomputed from ("next", "physics") and the action is the env's own reward.
        relabelled = rollout(env_c, policy, 3, reward_task=task)
        assert np.allclose(relabelled.returns, result.returns, rtol=1e-5, atol=1e-5)
    finally:
        env_a.close(), env_b.close(), env_c.close()
    assert policy.carry is None  # rollout threads its own carry; the convenience carry is untouched


def test_is_first_marks_exactly_the_episode_starts_and_the_carry_is_threaded():
    policy = RecordingPolicy(4, 2)
    env = _env(episode_length=4)
    try:
        result = rollout(env, policy, 3, extras=True)
    finally:
        env.close()
    assert len(policy.calls) == 8  # two rounds of four steps
    for i, call in enumerate(policy.calls):
        step = i % 4
        assert call["is_first"].tolist() == [step == 0] * 2, i
        if step > 0:  # the carry of the previous step comes back (init_carry's only at a start)
            assert call["t"].tolist() == [step] * 2, i
    # per-step extras: the carry's counter after each step
    assert all(e.extras["t"].tolist() == [1, 2, 3, 4] for e in result.episodes)


def test_per_round_policy_positions_stacked_observations_and_final_physics():
    made = []

    def make_policy(first: int, n: int) -> Policy:
        made.append((first, n))
        policy = RecordingPolicy(4, 2)
        rounds.append(policy)
        return policy

    rounds: list[RecordingPolicy] = []
    env = _env(episode_length=5)
    try:
        result = rollout(env, make_policy, 3, positions=True, keep_obs="physics", obs_frame_stack=2,
                         final_physics=True)
    finally:
        env.close()
    assert made == [(0, 2), (2, 2)]
    task = get_task("point_mass-easy")
    for i, episode in enumerate(result.episodes):
        calls = rounds[i // 2].calls
        seen = torch.stack([c["physics"][i % 2] for c in calls])  # the physics the policy saw, [5, P]
        p = seen.shape[-1]
        assert episode.positions.shape == (6, 2)
        assert np.allclose(episode.positions[:5], task.body_position(seen.numpy()))
        assert np.allclose(episode.positions[-1], task.body_position(episode.final_physics.numpy()))
        # stacked with 2 frames, oldest first; the reset's frame repeated at the start
        assert torch.equal(episode.first_obs, torch.cat([seen[0], seen[0]]))
        assert episode.last_obs.shape == (2 * p,)
        assert torch.equal(episode.last_obs[:p], seen[-1]) and torch.equal(episode.last_obs[p:], episode.final_physics)
    assert result.positions[0].shape == (6, 2)


def test_after_reset_gives_each_rounds_policy_and_start():
    """``rollout(env, None, ..., after_reset=f)``: ``f(td, first, n)`` sees each round's reset observations and
    returns the observations to start from and the round's policy; without ``after_reset``, or when it returns
    no policy, ``None`` is refused with a message."""
    seen, rounds = [], []

    def after_reset(td, first, n):
        seen.append((first, n, td["physics"].clone()))
        rounds.append(RecordingPolicy(4, 2))
        start = td.clone()
        start["physics"] = td["physics"] + 1.0  # what the policy must see at its first step
        return start, rounds[-1]

    env = _env(episode_length=3)
    try:
        rollout(env, None, 3, after_reset=after_reset)
        assert [(f, n) for f, n, _ in seen] == [(0, 2), (2, 2)]
        for (_, _, reset_physics), policy in zip(seen, rounds, strict=True):
            assert len(policy.calls) == 3 and torch.equal(policy.calls[0]["physics"], reset_physics + 1.0)
        with pytest.raises(ValueError, match="needs after_reset"):
            rollout(env, None, 1)
        with pytest.raises(ValueError, match="returned no policy for episodes 0..1"):
            rollout(env, None, 1, after_reset=lambda td, first, n: (td, None))
    finally:
        env.close()


def test_video_keeps_the_first_episode_frames():
    policy = StatePolicy(4, 2)
    env = _env(num_envs=1, episode_length=3, obs=("pixels", "state", "physics"))
    try:
        result = rollout(env, policy, 2, video=True)
    finally:
        env.close()
    assert result.frames.shape == (4, 3, 64, 64) and result.frames.dtype == np.uint8


@pytest.mark.parametrize("task, joints", [
    ("cheetah-run", ["rootx"]),
    ("walker-walk", ["rootx"]),  # walker's qpos starts with rootz: the position is rootx alone
    ("quadruped-run", None),  # the free joint's x and y
    ("point_mass-easy", ["root_x", "root_y"]),
])
def test_body_position_reads_the_root_joints_of_each_task(task, joints):
    env = get_task(task).make_dm_env(seed=0)
    env.reset()
    physics = env.physics
    rng = np.random.default_rng(0)
    with physics.reset_context():
        if joints is None:
            physics.named.data.qpos["root"][:3] = rng.normal(size=3)
            expected = physics.named.data.qpos["root"][:2].copy()
        else:
            for j in joints:
                physics.named.data.qpos[j] = rng.normal()
            expected = np.array([physics.named.data.qpos[j][0] for j in joints])
    state = get_physics_state(physics)
    assert np.allclose(body_position(task, state), expected)
    batch = np.stack([state, state])
    assert body_position(task, batch).shape == (2, len(expected))
    as_tensor = get_task(task).body_position(torch.as_tensor(batch))
    assert isinstance(as_tensor, torch.Tensor)
    assert np.allclose(as_tensor.numpy(), batch[:, list(get_task(task).body_qpos_index)])


def test_a_body_fixed_to_the_world_is_placed_by_its_end_effector():
    """Reacher has no body position in qpos (so METRA cannot place it at goals), but its fingertip's x-y is where it
    is for goal distances: forward kinematics of the stored angles, as dm_control's own finger_to_target."""
    with pytest.raises(ValueError, match="no free joint"):
        _ = get_task("reacher-easy").body_qpos_index
    env = get_task("reacher-hard").make_dm_env(seed=0)
    rng = np.random.default_rng(0)
    states, expected = [], []
    for _ in range(4):
        env.reset()
        physics = env.physics
        with physics.reset_context():
            physics.named.data.qpos[:] = rng.uniform(-np.pi, np.pi, size=2)
        states.append(get_physics_state(physics))
        expected.append(physics.named.data.geom_xpos["finger", :2].copy())
    states, expected = np.stack(states), np.stack(expected)
    assert np.allclose(body_position("reacher-hard", states), expected, atol=1e-9)
    as_tensor = get_task("reacher-easy").body_position(torch.as_tensor(states[None]))  # [1, 4, P] -> [1, 4, 2]
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (1, 4, 2)
    assert np.allclose(as_tensor[0].numpy(), expected, atol=1e-9)
    assert len({tuple(np.round(e, 3)) for e in expected}) == 4  # the angles moved the finger


class _TinyAgent(Agent):
    name = "tiny_eval_agent"

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)


def test_registered_evaluations_run_in_eval_mode_for_the_agent_and_its_subclasses(monkeypatch, tmp_path):
    monkeypatch.setattr(evaluation, "_EVALUATIONS", {})
    monkeypatch.setattr(evaluation, "_BUILTIN", ())
    modes = []

    @register_evaluation("tiny_eval_agent")
    def tiny(agent, env, *, step, out_dir):
        modes.append(agent.training)
        return {"score": float(step), "dir": str(out_dir)}

    agent = _TinyAgent()
    assert evaluate_agent(agent, None, step=3, out_dir=tmp_path) == {"score": 3.0, "dir": str(tmp_path)}
    assert modes == [False] and agent.training  # eval mode inside, training mode restored

    class Renamed(_TinyAgent):
        name = "renamed"

    assert evaluate_agent(Renamed(), None, step=1, out_dir=tmp_path)["score"] == 1.0
    assert evaluate_agent(Agent(), None, step=1, out_dir=tmp_path) == {}


def test_metra_registers_its_coverage_evaluation():
    from latentrl.agents.metra import METRAAgent
    from latentrl.training.skills import evaluate_metra

    agent = METRAAgent.__new__(METRAAgent)  # only the class matters for the lookup
    assert evaluate_metra in evaluation.registered_evaluations(agent)
