"""The zero-shot harness: relabel -> infer_task -> roll out, reports, and agents that refuse a task kind."""

from __future__ import annotations

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
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def act(self, obs):
        return torch.full((obs.batch_size[0], 6), self.value)


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
