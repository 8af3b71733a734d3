"""Why do the zero-shot agents score below a random walker on walker-spin? A diagnosis on bench_zero_shot runs.

    python docs/bench_zero_shot/spin_gap.py <workdir> [<workdir> ...] --out docs/bench_zero_shot/spin_gap.json

``<workdir>`` is a ``scripts/bench_zero_shot.py --workdir`` (its ``data/`` and ``<agent>-s<seed>/`` runs with
their last checkpoint). walker-spin pays ``clip(L / 10, 0, 1)`` per step for the walker's angular momentum
``L`` about +y, in any posture. For the dataset, a uniform random policy and each trained agent (spin task
inferred as the benchmark does: 10000 relabelled samples), this measures per step:

- ``spin``: the mean spin reward (x 1000 = the episode return), and ``spin_steps``: the share of steps paid
  more than 0.5;
- ``upright``: the share of steps with the suite's stand reward above 0.5 (torso high and vertical);
- ``fit_r2``: the R^2 of the spin reward on the agent's task features (TD-JEPA ``psi``, FB ``B``) by a
  least-squares fit on the dataset's relabelled samples, scored on these states; and ``predicted``, the mean
  reward that fit predicts on them. A fit that predicts the random walker's reward where it is paid means
  the features see spinning; the policy then has to find it. The fit predicting more for the agent's rollout
  than for the random walker's, while the true reward says the opposite, puts the gap in the features (the
  policy climbs the fitted reward, which is wrong there); predicting less puts it in the policy (it does not
  reach what its own features would pay);
- ``implied``: the mean of ``task features . z`` (z the inferred task), the per-step reward the agent's Q sums
  (TD-JEPA: ``psi . z``, z the projected least-squares fit; FB: ``B . z`` with FB's ``z = project(sum r B)``);
  its scale is the agent's, so compare it between trajectories of one agent only.

The rollouts are the benchmark's (5 deterministic 1000-step episodes, env seed = agent seed).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from latentrl.agents.base import RewardSamples, UniformRandomPolicy
from latentrl.envs import make_env
from latentrl.envs.tasks import get_task
from latentrl.replay import ReplayBuffer
from latentrl.training.checkpoint import load_agent

SPIN, STAND = get_task("walker-spin"), get_task("walker-stand")


def trajectory(policy, seed: int, episodes: int = 5) -> tuple[np.ndarray, torch.Tensor]:
    """Physics states ``[episodes * 1000, P]`` and state observations after each step of ``episodes``
    walker-spin episodes."""
    env = make_env("walker-spin", obs=("state", "physics"), num_envs=episodes, seed=seed, num_workers=0)
    td = env.reset()
    carry = policy.init_carry(episodes)
    is_first = torch.ones(episodes, dtype=torch.bool)
    physics, states = [], []
    with torch.no_grad():
        while True:
            action, carry = policy.step(td.select("state"), carry, is_first)
            td["action"] = action
            out = env.step(td)
            td = out["next"]
            physics.append(td["physics"].double().numpy())
            states.append(td["state"].clone())
            is_first = torch.zeros_like(is_first)
            if bool(td["done"].all()):
                break
    env.close()
    return np.concatenate(physics), torch.cat(states)


def describe(physics: np.ndarray, states: torch.Tensor | None = None, fit=None, implied=None) -> dict:
    spin = SPIN.rewards_from_states(physics)
    stand = STAND.rewards_from_states(physics)
    out = {"spin": float(spin.mean()), "spin_steps": float((spin > 0.5).mean()), "upright": float((stand > 0.5).mean()),
           "steps": int(len(spin))}
    if fit is not None:
        predicted = fit(states)
        out["predicted"] = float(predicted.mean())
        out["fit_r2"] = float(1 - ((spin - predicted) ** 2).sum() / max(((spin - spin.mean()) ** 2).sum(), 1e-12))
    if implied is not None:
        out["implied"] = float(implied(states).mean())
    return out


def feature_fit(agent, buffer: ReplayBuffer, samples: int):
    """Least-squares fit of the spin reward on the agent's task features over relabelled dataset samples; the
    returned function predicts the reward of state observations."""
    batch = buffer.sample(samples, keys=["state", "physics"])
    buffer.relabel(SPIN, batch)
    feats = agent.task_embedding(batch["next", "state"]).double()
    w = torch.linalg.lstsq(feats, batch["next", "reward"].double().reshape(-1, 1)).solution

    def predict(states: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return (agent.task_embedding(states).double() @ w).reshape(-1).numpy()

    return predict


def implied_reward(agent, z: torch.Tensor):
    """``states -> task features . z``: the per-step reward the agent's Q sums."""

    def implied(states: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return (agent.task_embedding(states) @ z.to(agent.device).reshape(-1)).cpu().numpy()

    return implied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--out", default="docs/bench_zero_shot/spin_gap.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    for work in map(Path, args.workdirs):
        buffer = ReplayBuffer.load(work / "data")
        torch.manual_seed(0)  # the dataset sample below, so a rerun gives the same dataset rows
        data = buffer.sample(min(len(buffer), 50000), keys=["state", "physics"])["next"]
        entry = {"dataset": describe(data["physics"].double().numpy()), "random": {}, "agents": {}}
        random_runs = {}  # seed -> the random walker's trajectory (deterministic: simulated once per seed)
        runs = [p for p in work.iterdir() if re.fullmatch(r"(td_jepa|fb)-s\d+", p.name)
                and (p / "checkpoints" / "latest.pt").exists()]  # not collect/, the RND run
        for run in sorted(runs):
            agent_name, seed = run.name.rsplit("-s", 1)
            seed = int(seed)
            if seed not in random_runs:
                random_policy = UniformRandomPolicy(6, torch.Generator().manual_seed(seed))
                random_runs[seed] = trajectory(random_policy, seed, args.episodes)
                entry["random"][seed] = describe(random_runs[seed][0])
            agent, _ = load_agent(run / "checkpoints" / "latest.pt")
            agent.eval()
            torch.manual_seed(seed)
            batch = buffer.sample(args.samples, keys=["state", "physics"])
            buffer.relabel(SPIN, batch)
            task = agent.infer_task(RewardSamples(obs=batch["next", "state"], reward=batch["next", "reward"]))
            fit = feature_fit(agent, buffer, args.samples)
            implied = implied_reward(agent, task.z)
            entry["agents"][run.name] = {
                "agent": agent_name, "seed": seed,
                "rollout": describe(*trajectory(agent.policy(task), seed, args.episodes), fit=fit, implied=implied),
                "on_random_states": describe(*random_runs[seed], fit=fit, implied=implied),
                "on_dataset": describe(data["physics"][:10000].double().numpy(), data["state"][:10000], fit=fit,
                                       implied=implied)}
            a = entry["agents"][run.name]
            print(f"[spin] {work.name} {run.name}: spin return {1000 * a['rollout']['spin']:.0f} (random "
                  f"{1000 * a['on_random_states']['spin']:.0f}); upright {a['rollout']['upright']:.2f}; fit R^2 "
                  f"dataset {a['on_dataset']['fit_r2']:.2f} / random states {a['on_random_states']['fit_r2']:.2f}; "
                  f"fit's prediction on its rollout {1000 * a['rollout']['predicted']:.0f} and on random states "
                  f"{1000 * a['on_random_states']['predicted']:.0f}; implied reward psi.z (B.z) on its rollout "
                  f"{a['rollout']['implied']:.3f}, on random states {a['on_random_states']['implied']:.3f}, on the "
                  f"dataset {a['on_dataset']['implied']:.3f}", flush=True)
        report[str(work)] = entry
        d = entry["dataset"]
        print(f"[spin] {work.name} dataset: spin {1000 * d['spin']:.0f} per 1000 steps, paid > 0.5 on "
              f"{d['spin_steps']:.3f} of steps, upright {d['upright']:.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"[spin] wrote {args.out}")


if __name__ == "__main__":
    main()
