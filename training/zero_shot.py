"""Zero-shot evaluation: rewards and goals never seen in training (TD-JEPA / Meta Motivo protocol).

Reward tasks: sample transitions from the training data, relabel ``("next", "reward")`` from the
stored next-state physics with the task's reward, ``agent.infer_task(RewardSamples(...))``, then
roll out the deterministic policy for that task and report undiscounted returns. Goal tasks: goal
observations rendered from stored physics states, ``agent.infer_task(GoalObservation(...))``,
and the final distance between the body's position and the goal's
(:meth:`latentrl.envs.Task.body_position`). Episodes run on the one evaluation path,
:func:`latentrl.training.evaluation.rollout`. Works for any agent that implements ``infer_task``;
agents that cannot represent a kind of task are reported as such, not failed.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from latentrl.agents.base import Agent, GoalObservation, RewardSamples, SampleSpec, UnsupportedTaskError, sample_batches
from latentrl.envs import get_task, make_env
from latentrl.replay import ReplayBuffer
from latentrl.training.evaluation import rollout

__all__ = ["TaskResult", "check_dataset_fits", "check_tasks_fit", "evaluate_reward_tasks", "evaluate_goals",
           "representation_losses", "write_report"]


@dataclass
class TaskResult:
    task: str
    kind: str  # "reward" or "goal"
    mean: float | None = None  # mean return (reward) or success rate (goal)
    std: float | None = None
    values: list[float] = field(default_factory=list)  # per-episode returns or final distances
    final_distance: float | None = None
    unsupported: str | None = None
    reward_r2: float | None = None  # held-out R^2 of the reward on the agent's task features, if it reports one

    @property
    def domain(self) -> str:
        return self.task.split("-", 1)[0]


def _frame_stack(agent: Agent) -> int:
    """Frames the agent stacks (its ``frame_stack``, else its single sample request's)."""
    stack = getattr(agent, "frame_stack", None)
    if stack is None:
        spec = agent.sample_spec()
        stack = spec.frame_stack if isinstance(spec, SampleSpec) else 1
    return int(stack)


def _make_task_env(task: str, env_cfg: dict, num_envs: int, seed: int):
    return make_env(task, obs=tuple(env_cfg["obs"]), image_size=env_cfg["image_size"], camera=env_cfg.get("camera"),
                    action_repeat=env_cfg["action_repeat"], num_envs=num_envs, seed=seed,
                    floor=env_cfg["floor"], episode_length=env_cfg.get("episode_length"), num_workers=0)


def _domain(task: str) -> str:
    return task.split("-", 1)[0]


def _describe_agent(agent: Agent, env_cfg: dict) -> str:
    shape = getattr(agent, "obs_shape", None)
    key = getattr(getattr(agent, "config", None), "obs_type", None)
    seen = f"; it reads {key} of shape {list(shape)}" if shape is not None and key else ""
    actions = getattr(agent, "action_dim", None)
    drives = f" and drives {actions} actuators" if actions is not None else ""
    return f"trained on {env_cfg['task']} ({_domain(env_cfg['task'])}{seen}{drives})"


def check_tasks_fit(agent: Agent, env_cfg: dict, tasks: list[str], *, source: str = "the agent") -> None:
    """Zero-shot tasks are other rewards of the training domain: a walker agent reads walker observations and
    drives walker joints, so cheetah tasks are refused here, before anything runs (not as a shape error deep
    inside a network, or as rewards of states the task does not describe)."""
    home = _domain(env_cfg["task"])
    foreign = [t for t in tasks if _domain(t) != home]
    if foreign:
        domains = sorted({_domain(t) for t in foreign})
        raise ValueError(f"{source} was {_describe_agent(agent, env_cfg)}, but {', '.join(foreign)} "
                         f"{'is a task' if len(foreign) == 1 else 'are tasks'} of {', '.join(domains)}: zero-shot "
                         f"tasks must be of the training domain. Evaluate {home} tasks (tasks={home}/all), or a "
                         f"model trained on {domains[0]}")


def check_dataset_fits(agent: Agent, buffer: ReplayBuffer, env_cfg: dict, *, data: str = "the dataset") -> None:
    """The dataset whose transitions are relabelled must hold the training domain's physics and the
    observations the agent reads, in its shape."""
    home = _domain(env_cfg["task"])
    held = getattr(buffer, "domain", None)
    if held is not None and held != home:
        raise ValueError(f"dataset {data} holds {held} steps, but the agent was {_describe_agent(agent, env_cfg)}; "
                         f"give data=<a {home} dataset>")
    storage = buffer.storage
    if storage is None or len(buffer) == 0:
        raise ValueError(f"dataset {data} holds no transitions; give data=<a dataset collect_dataset.py wrote>")
    if "physics" not in storage.keys():
        raise ValueError(f"dataset {data} stores no physics states, so task rewards cannot be recomputed from it; "
                         "collect one with env.obs including physics")
    key = getattr(getattr(agent, "config", None), "obs_type", None)
    shape = getattr(agent, "obs_shape", None)
    if key is None or shape is None:
        return
    if key not in storage.keys():
        stored = [k for k in ("pixels", "state") if k in storage.keys()]
        raise ValueError(f"the agent reads {key}, but dataset {data} stores {', '.join(stored) or 'no observations'}; "
                         f"give data=<a dataset with {key}>")
    stored_shape = list(storage[key].shape[1:])
    if stored_shape != list(shape):
        raise ValueError(f"dataset {data} stores {key} of shape {stored_shape}, but the agent was "
                         f"{_describe_agent(agent, env_cfg)}: the dataset is of another domain or image size; give "
                         f"data=<a {home} dataset with {key} of shape {list(shape)}>")


def _observation(batch, keys: list[str]):
    return batch.select(*[k for k in keys if k in batch.keys()])


def evaluate_reward_tasks(agent: Agent, buffer: ReplayBuffer, tasks: list[str], env_cfg: dict, *,
                          num_samples: int = 10_000, episodes: int = 10, seed: int = 0,
                          progress=print) -> list[TaskResult]:
    """For each task: relabel ``num_samples`` buffer transitions, infer the task, roll out ``episodes``."""
    check_tasks_fit(agent, env_cfg, tasks)
    frame_stack = _frame_stack(agent)
    obs_keys = [k for k in ("pixels", "state") if k in env_cfg["obs"]]
    results = []
    for name in tasks:
        task = get_task(name)
        batch = buffer.sample(num_samples, frame_stack=frame_stack, keys=[*obs_keys, "physics"])
        buffer.relabel(task, batch)
        samples = RewardSamples(obs=_observation(batch["next"], obs_keys), reward=batch["next", "reward"])
        try:
            with torch.no_grad():
                inferred = agent.infer_task(samples)
        except UnsupportedTaskError as err:
            results.append(TaskResult(name, "reward", unsupported=str(err)))
            progress(f"[zero-shot] {name}: unsupported ({err})")
            continue
        env = _make_task_env(name, env_cfg, episodes, seed)
        try:
            out = rollout(env, agent.policy(inferred), episodes)
        finally:
            env.close()
        returns = [float(r) for r in out.returns]
        r2 = inferred.info.get("reward_r2")
        results.append(TaskResult(name, "reward", float(np.mean(returns)), float(np.std(returns)), returns,
                                  reward_r2=r2))
        fit = f"; reward R^2 on task features {r2:.2f}" if r2 is not None else ""
        progress(f"[zero-shot] {name}: return {np.mean(returns):.1f} +- {np.std(returns):.1f} over {episodes}{fit}")
    return results


def representation_losses(agent: Agent, buffer: ReplayBuffer, *, batches: int = 16, seed: int = 0) -> dict[str, float]:
    """The agent's representation loss and its terms on ``batches`` replay batches, without updating.

    The same computation as a training step's (``agent.world_model.loss`` on ``agent.sample_spec()``
    batches, the agent's own target action, augmentation included), averaged; nothing is stepped, and
    the global torch RNG is put back afterwards. On the training data it is the training loss at
    these weights; on episodes the agent never saw it is a held-out loss, so the gap between the two
    tells whether the representation overfits its dataset. Works for the zero-shot agents (TD-JEPA,
    FB), whose ``world_model.loss(batch, next_action)`` takes ``agent.target_action``.
    """
    loss = getattr(getattr(agent, "world_model", None), "loss", None)
    if loss is None or not hasattr(agent, "target_action"):
        raise TypeError(f"representation_losses needs a zero-shot agent (world_model.loss and target_action), "
                        f"got {type(agent).__name__}")
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    sums: dict[str, float] = {}
    try:
        with torch.no_grad():
            for _ in range(batches):
                batch = sample_batches(buffer, agent.sample_spec())
                out = loss(batch.to(agent.device), agent.target_action)
                for key, value in out.items():
                    if value.ndim == 0:
                        sums[key] = sums.get(key, 0.0) + float(value)
    finally:
        torch.random.set_rng_state(rng)
    return {key: value / batches for key, value in sums.items()}


def evaluate_goals(agent: Agent, buffer: ReplayBuffer, env_cfg: dict, *, num_goals: int = 10,
                   success_radius: float | None = None, seed: int = 0, progress=print) -> TaskResult:
    """Goals = stored states: render them, infer the goal task, run ``num_goals`` episodes (one per goal)
    and report success (final body position within ``success_radius`` of the goal's; ``None``: the task's
    :attr:`~latentrl.envs.Task.goal_radius`) and the final distance.

    The body position is the task's (:meth:`latentrl.envs.Task.body_position`): x for cheetah and
    walker, the free joint's x-y for quadruped, x-y for the point masses, the fingertip's x-y for reacher.
    Each goal frame is rendered after its episode's reset, in that episode's scene (reacher's target ball
    is drawn at reset and is not part of the physics state), and the start state is put back before the
    first step.
    """
    task_name = env_cfg["task"]
    task = get_task(task_name)
    radius = task.goal_radius if success_radius is None else float(success_radius)
    frame_stack = _frame_stack(agent)
    env = _make_task_env(task_name, env_cfg, num_goals, seed)
    goal_physics = buffer.sample(num_goals, keys=["physics"])["physics"]

    def goals_in_the_episodes_scene(td: TensorDict, first: int, n: int):
        start = td["physics"].clone()
        goal_obs = env.set_physics_state(goal_physics[first:first + n])
        if frame_stack > 1 and "pixels" in goal_obs.keys():
            goal_obs["pixels"] = goal_obs["pixels"].repeat(1, frame_stack, 1, 1)
        keys = [k for k in ("pixels", "state") if k in goal_obs.keys()]
        with torch.no_grad():
            inferred = agent.infer_task(GoalObservation(obs=goal_obs.select(*keys)))
        return env.set_physics_state(start), agent.policy(inferred)

    try:
        episodes = rollout(env, None, num_goals, final_physics=True,
                           after_reset=goals_in_the_episodes_scene).episodes
    except UnsupportedTaskError as err:
        progress(f"[zero-shot] goals: unsupported ({err})")
        return TaskResult(f"{task_name}-goals", "goal", unsupported=str(err))
    finally:
        env.close()
    final = torch.stack([e.final_physics for e in episodes]).cpu().numpy()
    distance = np.linalg.norm(task.body_position(final) - task.body_position(goal_physics.cpu().numpy()), axis=-1)
    success = float(np.mean(distance < radius))
    progress(f"[zero-shot] goals: success {success:.2f}, final distance {distance.mean():.2f}")
    return TaskResult(f"{task_name}-goals", "goal", success, None, distance.tolist(), float(distance.mean()))


def write_report(results: list[TaskResult], out_dir: str | Path) -> dict[str, Path]:
    """Table on stdout, ``results.json``, ``results.csv`` and ``returns.png`` (bar chart by domain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"domain": r.domain, "task": r.task, "kind": r.kind, "mean": r.mean, "std": r.std,
             "final_distance": r.final_distance, "reward_r2": r.reward_r2, "unsupported": r.unsupported}
            for r in results]
    domains: dict[str, list[float]] = {}
    for r in results:
        if r.kind == "reward" and r.mean is not None:
            domains.setdefault(r.domain, []).append(r.mean)
    summary = {d: float(np.mean(v)) for d, v in domains.items()}
    (out / "results.json").write_text(json.dumps({"tasks": [asdict(r) for r in results], "domain_mean": summary},
                                                 indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        writer.writeheader()
        writer.writerows(rows)

    print(f"\n{'task':<40} {'kind':<7} {'score':>16}")
    for r in results:
        if r.unsupported:
            score = "unsupported"
        elif r.kind == "reward":
            score = f"{r.mean:.1f} +- {r.std:.1f}"
        else:
            score = f"success {r.mean:.2f}, dist {r.final_distance:.2f}"
        print(f"{r.task:<40} {r.kind:<7} {score:>16}")
    for d, v in summary.items():
        print(f"{d + ' (mean of reward tasks)':<40} {'':<7} {v:>16.1f}")

    scored = [r for r in results if r.kind == "reward" and r.mean is not None]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(scored) + 1), 3.5))
    if scored:
        ax.bar(range(len(scored)), [r.mean for r in scored], yerr=[r.std for r in scored], capsize=3,
               color=[f"C{sorted(domains).index(r.domain)}" for r in scored])
        ax.set_xticks(range(len(scored)), [r.task for r in scored], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("zero-shot return")
    ax.set_title("zero-shot evaluation")
    fig.tight_layout()
    fig.savefig(out / "returns.png", dpi=120)
    plt.close(fig)
    return {"json": out / "results.json", "csv": out / "results.csv", "plot": out / "returns.png"}
