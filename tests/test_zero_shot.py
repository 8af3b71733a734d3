"""The zero-shot harness: relabel -> infer_task -> roll out, reports, and agents that refuse a task kind."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from latentrl.agents.base import Agent, Policy, RewardSamples, SampleSpec, Task
from latentrl.envs.tasks import get_task, resolve_task_list
from latentrl.replay import ReplayBuffer
from latentrl.training.cli import collect_main, eval_main, train_main
from latentrl.training.zero_shot import evaluate_goals, evaluate_reward_tasks, write_report

SMOKE = ["preset=smoke", "log.progress=false", "log.tensorboard=false", "env.obs=[state,physics]"]


class _ConstantPolicy(Policy):
    def __init__(self, value: float, action_dim: int = 6):
        super().__init__(None, (), action_dim)
        self.value = value

    def act(self, x, carry, is_first):
        return torch.full((carry.batch_size[0], self.action_dim), self.value), carry


class _RecordingAgent(Agent):
    """Acts with a constant action whose sign is the sign of the mean inferred reward."""

    name = "recording"

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def sample_spec(self):
        return SampleSpec(batch_size=8)

    def infer_task(self, spec):
        self.seen.append(spec)
        return Task(z=spec.reward.mean().reshape(1))

    def policy(self, task=None, *, explore=False):
        return _ConstantPolicy(float(task.z.sign()))


@pytest.fixture(scope="module")
def cheetah_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    out = root / "data"
    collect_main([*SMOKE, "env=cheetah-run", "steps=300", f"out={out}", f"run_dir={root / 'collect'}"])
    return out


def test_reward_tasks_are_relabelled_inferred_and_rolled_out(cheetah_data, tmp_path):
    buffer = ReplayBuffer.load(cheetah_data)
    agent = _RecordingAgent()
    env_cfg = {"task": "cheetah-run", "obs": ["state", "physics"], "image_size": 64, "action_repeat": 1,
               "floor": "default", "camera": None}
    tasks = ["cheetah-run", "cheetah-run_backward"]
    results = evaluate_reward_tasks(agent, buffer, tasks, env_cfg, num_samples=200, episodes=2, progress=lambda s: None)
    assert [r.task for r in results] == tasks and all(len(r.values) == 2 for r in results)
    assert len(agent.seen) == len(tasks)
    for spec in agent.seen:
        assert isinstance(spec, RewardSamples)
        assert spec.reward.shape == (200, 1) and spec.obs["state"].shape == (200, 17)
        assert "physics" not in spec.obs.keys()  # agents see observations, not the simulator state
    # the relabelled rewards are the task's rewards of the stored next states
    batch = buffer.sample(50, keys=["state", "physics"])
    buffer.relabel(get_task("cheetah-run_backward"), batch)
    expected = get_task("cheetah-run_backward").rewards_from_states(batch["next", "physics"].numpy(),
                                                                    batch["action"].numpy())
    np.testing.assert_allclose(batch["next", "reward"].reshape(-1).numpy(), expected, atol=1e-6)

    paths = write_report(results, tmp_path)
    report = json.loads(paths["json"].read_text())
    assert set(report["domain_mean"]) == {"cheetah"} and paths["plot"].stat().st_size > 1000


def test_goal_mode_reports_success_and_distance(cheetah_data):
    class GoalAgent(_RecordingAgent):
        def infer_task(self, spec):
            self.seen.append(spec)
            return Task(z=torch.ones(1))

    agent = GoalAgent()
    env_cfg = {"task": "cheetah-run", "obs": ["state", "physics"], "image_size": 64, "action_repeat": 1,
               "floor": "default", "camera": None, "episode_length": 50}
    result = evaluate_goals(agent, ReplayBuffer.load(cheetah_data), env_cfg, num_goals=3, success_radius=0.5,
                            progress=lambda s: None)
    assert agent.seen[0].obs["state"].shape == (3, 17)
    assert len(result.values) == 3 and 0.0 <= result.mean <= 1.0 and result.final_distance >= 0


def test_goal_distance_is_between_body_positions():
    """Walker's qpos starts with rootz: the goal distance is along rootx alone (the body position of
    latentrl.envs.Task.body_position), so a goal 10 m overhead at the start's x is close."""
    from tensordict import TensorDict

    from latentrl.envs.tasks import get_physics_state

    dm_env = get_task("walker-walk").make_dm_env(seed=0)
    dm_env.reset()
    with dm_env.physics.reset_context():
        dm_env.physics.named.data.qpos["rootz"] = 10.0
        dm_env.physics.named.data.qpos["rootx"] = 0.25
    goal = torch.as_tensor(get_physics_state(dm_env.physics))

    class GoalBuffer:
        def sample(self, n, keys=None):
            return TensorDict({"physics": goal.expand(n, -1).clone()}, [n])

    class StandStill(_RecordingAgent):
        def infer_task(self, spec):
            return Task(z=torch.zeros(1))

    env_cfg = {"task": "walker-walk", "obs": ["state", "physics"], "image_size": 64, "action_repeat": 1,
               "floor": "default", "camera": None, "episode_length": 5}
    result = evaluate_goals(StandStill(), GoalBuffer(), env_cfg, num_goals=2, success_radius=1.0,
                            progress=lambda s: None)
    assert result.final_distance < 1.0 and result.mean == 1.0  # qpos[:2] (rootz, rootx) would be ~9 m off


def test_eval_script_reports_unsupported_task_kinds(cheetah_data, tmp_path, capsys):
    run = tmp_path / "run"
    train_main([*SMOKE, "env=cheetah-run", f"data={cheetah_data}", "steps=5", f"run_dir={run}"])
    results = eval_main([f"checkpoint={run / 'checkpoints' / 'latest.pt'}", "tasks=cheetah-run", "samples=100",
                         "episodes=1", "mode=both", "episode_length=20", f"out={tmp_path / 'zs'}"])
    assert [r.unsupported is not None for r in results] == [True, True]  # RND infers no tasks
    assert "unsupported" in capsys.readouterr().out
    assert (tmp_path / "zs" / "results.csv").exists()


def test_task_lists_and_bad_keys():
    assert resolve_task_list("walker/all") == ["walker-stand", "walker-walk", "walker-run", "walker-spin"]
    assert len(resolve_task_list("point_mass_maze/all")) == 8
    with pytest.raises(ValueError, match="walker-walk"):
        resolve_task_list("walker-wlk")
    with pytest.raises(SystemExit):
        eval_main(["checkpont=x"])


@pytest.mark.parametrize("obs_type", ["state", "pixels"])
@pytest.mark.parametrize(("agent_name", "loss_key"), [("td_jepa", "phi_loss"), ("fb", "fb_loss")])
def test_offline_training_from_a_collected_dataset(walker_dataset, tmp_path, agent_name, loss_key, obs_type):
    """train_agent.py data=<collect_dataset.py output> trains from states and pixels; the checkpoint
    reloads, infers a task from relabelled samples of its own data and acts."""
    from latentrl.training.checkpoint import load_agent

    env_obs = "env.obs=[state,physics]" if obs_type == "state" else "env.obs=[pixels,state,physics]"
    run_dir = tmp_path / "run"
    result = train_main([f"agent={agent_name}", f"data={walker_dataset}", "preset=smoke", "log.progress=false",
                         "log.tensorboard=false", "eval.video=false", env_obs, f"agent.obs_type={obs_type}",
                         "steps=12", "log.every=4", "checkpoint_every=6", f"run_dir={run_dir}"])
    assert "eval/return" in result
    payload = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)
    assert payload["counters"]["updates"] == 12 and payload["agent_name"] == agent_name
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get(loss_key) and np.isfinite(float(r[loss_key])) for r in rows)

    agent, _ = load_agent(run_dir / "checkpoints" / "latest.pt")
    assert agent.config.obs_type == obs_type
    samples = ReplayBuffer.load(walker_dataset).sample(100, frame_stack=agent.frame_stack, keys=(obs_type, "physics"))
    ReplayBuffer.relabel(get_task("walker-stand"), samples)
    task = agent.infer_task(RewardSamples(obs=samples["next"], reward=samples["next", "reward"]))
    assert task.z.shape == (agent.z_dim,) and torch.isfinite(task.z).all()
    frame = samples["next"].select(obs_type)[:2]
    if obs_type == "pixels":
        frame["pixels"] = frame["pixels"][:, -3:]
    assert agent.policy(task)(frame).shape == (2, 6)


@pytest.mark.parametrize("agent_name", ["td_jepa", "fb"])
def test_paper_preset_updates_at_its_published_size(agent_name):
    """The pixel defaults (DrQ-v2 trunk, 1024-wide predictors / forward maps and actor) build and
    update; only the batch is shrunk to keep the test fast."""
    from latentrl.agents import make_agent

    from fakes import SpecEnv, replay_batch

    torch.manual_seed(0)
    agent = make_agent(agent_name, SpecEnv(), preset="paper", batch_size=4)
    assert agent.config.obs_type == "pixels" and agent.config.actor_hidden_dim == 1024
    metrics = agent.update(replay_batch("pixels", 4))
    assert all(np.isfinite(v) for v in metrics.values())


def _ball_centre(frames: torch.Tensor) -> torch.Tensor:
    """Pixel position ``[N, 2]`` of reacher's target ball: the red pixels (R well above G and B; the arm is
    yellow) within 6 pixels of their median, which the ball's ~80 pixels set (the fingertip has a few more)."""
    out = []
    for frame in frames.float():
        r, g, b = frame[:3]
        ys, xs = torch.nonzero((r > g + 60) & (r > b + 60), as_tuple=True)
        points = torch.stack([ys, xs], dim=1).float()
        near = (points - points.median(dim=0).values).abs().max(dim=1).values <= 6
        out.append(points[near].mean(dim=0))
    return torch.stack(out)


def test_goal_frames_show_each_episodes_own_scene():
    """Reacher draws its target ball at reset, outside the physics state: each goal frame is rendered after its
    episode's reset (the ball where the episode has it, whatever the arm pose), and the episode starts from its
    reset state, not from the goal's. The default success radius is the task's (0.05 for reacher)."""
    from tensordict import TensorDict

    from latentrl.agents.base import GoalObservation
    from latentrl.envs.tasks import get_physics_state

    dm_env = get_task("reacher-easy").make_dm_env(seed=0)
    dm_env.reset()
    goals = []
    for angles in ((0.3, 1.0), (2.0, -0.5), (-1.5, 0.2)):
        with dm_env.physics.reset_context():
            dm_env.physics.data.qpos[:] = angles
        goals.append(torch.as_tensor(get_physics_state(dm_env.physics)))
    goal = torch.stack(goals)

    class GoalBuffer:
        def sample(self, n, keys=None):
            return TensorDict({"physics": goal[:n].clone()}, [n])

    class FirstFrames(Policy):
        def __init__(self, record):
            super().__init__("pixels", (3, 64, 64), 2)
            self.record = record

        def act(self, x, carry, is_first):
            if bool(is_first.all()):
                self.record["first"] = x.clone()
            return torch.zeros(x.shape[0], 2), carry

    class Recorder(_RecordingAgent):
        record: dict = {}

        def infer_task(self, spec):
            assert isinstance(spec, GoalObservation)
            self.record["goal"] = spec.obs["pixels"].clone()
            return Task(z=torch.zeros(1))

        def policy(self, task=None, *, explore=False):
            return FirstFrames(self.record)

    agent = Recorder()
    env_cfg = {"task": "reacher-easy", "obs": ["pixels", "physics"], "image_size": 64, "action_repeat": 1,
               "floor": "default", "camera": None, "episode_length": 3}
    result = evaluate_goals(agent, GoalBuffer(), env_cfg, num_goals=3, progress=lambda s: None)
    goal_frames, first = agent.record["goal"], agent.record["first"]
    assert not torch.equal(goal_frames, first)  # the arm is in the goal pose there, in the start pose here
    torch.testing.assert_close(_ball_centre(goal_frames), _ball_centre(first), atol=1.0, rtol=0)
    # the three episodes drew three targets: a goal frame rendered before the reset would show another one
    assert torch.cdist(_ball_centre(first), _ball_centre(first)).max() > 5
    assert result.values is not None and result.final_distance > 0.05  # zero actions stay away from the goals
    assert result.mean == float(np.mean(np.asarray(result.values) < get_task("reacher-easy").goal_radius))


@pytest.mark.parametrize(("agent_name", "loss_key"), [("td_jepa", "phi_loss"), ("fb", "fb_loss")])
def test_representation_losses_are_the_training_loss_without_a_step(walker_dataset, agent_name, loss_key):
    """``representation_losses`` (bench_zero_shot's train / held-out loss) on one draw is the figure a training
    step on that draw reports, before it steps; over several draws their mean; no weight moves and the global
    RNG is put back, so measuring between evaluations changes nothing that follows."""
    from copy import deepcopy

    from latentrl.agents import make_agent
    from latentrl.agents.base import sample_batches
    from latentrl.envs import make_env
    from latentrl.training.zero_shot import representation_losses

    env = make_env("walker-walk", obs=("state", "physics"), num_envs=1, seed=0, num_workers=0)
    try:
        agent = make_agent(agent_name, env, preset="smoke", obs_type="state")
    finally:
        env.close()
    buffer = ReplayBuffer.load(walker_dataset)
    torch.manual_seed(0)
    for _ in range(3):  # off the initial weights, and targets that differ from the online networks
        agent.update(sample_batches(buffer, agent.sample_spec()))
    weights = deepcopy(agent.state_dict())

    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    one = representation_losses(agent, buffer, batches=1, seed=7)
    three = representation_losses(agent, buffer, batches=3, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(value, agent.state_dict()[key]) for key, value in weights.items())

    torch.manual_seed(7)
    twin = deepcopy(agent)
    reported = twin.update(sample_batches(buffer, twin.sample_spec()))
    assert one[loss_key] == pytest.approx(float(reported[loss_key]), rel=1e-6)
    assert one["loss"] == pytest.approx(float(reported["total_loss"]), rel=1e-6)

    torch.manual_seed(7)
    draws = []
    with torch.no_grad():
        for _ in range(3):
            out = agent.world_model.loss(sample_batches(buffer, agent.sample_spec()), agent.target_action)
            draws.append(float(out[loss_key]))
    assert len(set(draws)) == 3  # the draws differ, so a mean over one draw repeated would show
    assert three[loss_key] == pytest.approx(float(np.mean(draws)), rel=1e-6)
    with pytest.raises(TypeError, match="zero-shot agent"):
        representation_losses(_RecordingAgent(), buffer)
