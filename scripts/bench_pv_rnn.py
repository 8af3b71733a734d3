#!/usr/bin/env python
"""Small-scale benchmark of the PV-RNN agent (issue 15; spec ``shared/algorithms/pv_rnn.md`` §8, §11, §13).

    python scripts/bench_pv_rnn.py                        # the default run (~1 h on 2 shared CPU cores)
    python scripts/bench_pv_rnn.py --quick --out /tmp/pv.md --fig-dir /tmp/pv

**Setting A** (GLean Exp. 1, synthesised branching 2-D paths, :func:`latentrl.agents.pv_rnn.branching_paths`):
60 training paths x 30 steps are written into a ``ReplayBuffer`` as episodes; for each meta-prior
(weak 1e-5/5e-6, intermediate 0.01/0.005, strong 0.2/0.1; w1 = 0.01) a PV-RNN 20/2/4 + 10/1/8 is trained
full batch through ``PVRNNAgent.update`` (the buffer's episodes stacked, so the adaptive vectors are keyed
by the buffer's segment ids) for ``--epochs-a`` epochs. Then:

- Table 3: 60 prior generations, % ending at the left / right goal;
- Table 4: 60 regenerations from A_1 (the step-1 posterior) of a left training path, prior afterwards;
- Table 5: GLean plans for 20 untrained test paths (start + goal given) x ``--plan-runs`` runs: KLD,
  RMSE to the ground-truth path, goal deviation;
- per-layer KL against the meta-prior;
- error regression on the 20 held-out paths, through ``PVRNNPolicy`` (window ``--er-window``, ``--er-iters``
  iterations, lr 0.09): window reconstruction at iteration 0 vs the last, and the one-step-ahead
  prediction error with ER vs prior-only (the same policy with 0 iterations: vectors at the prior).

**Setting B** (dm_control reacher-easy, no target): a scripted probabilistic FSM of joint-space motion
primitives (A: home -> via point, then B or C with p = 0.5) tracked by the same PD controller the
policy uses, recorded into a ``ReplayBuffer``; PV-RNN (40/4/2 + 20/2/8, model_dims = the two joint
angles) is trained on the recorded episodes; for goals at the B and C end areas, GLean plans are
executed in the simulator by ``PVRNNPolicy`` (plan -> PD -> torques) and compared with a
random-primitive baseline (the FSM's own coin flip): success (final joint-space distance to the goal
< ``--success-radius`` rad), final distance, and whether the branch taken follows the goal.

Writes the markdown report (``--out``), ``results.json`` and the figures under ``--fig-dir``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from latentrl.agents import GoalObservation, Task
from latentrl.agents.pv_rnn import PVRNNAgent, PVRNNPolicy, branch_side, branching_paths
from latentrl.replay import ReplayBuffer

PUBLISHED_T3 = {"weak": (38.3, 61.7), "intermediate": (46.7, 53.3), "strong": (55.0, 45.0)}
PUBLISHED_T4 = {"weak": (56.7, 43.3), "intermediate": (70.0, 30.0), "strong": (100.0, 0.0)}
PUBLISHED_T5 = {"weak": (159.1, 0.0615, 5.2e-6), "intermediate": (3.36, 0.0344, 7.8e-5),
                "strong": (0.17, 0.0375, 6.7e-4)}
META_PRIORS = {"weak": [1e-5, 5e-6], "intermediate": [0.01, 0.005], "strong": [0.2, 0.1]}


def log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc).strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------- data
def record_sequences(buffer: ReplayBuffer, states: torch.Tensor, actions: torch.Tensor) -> None:
    """Write ``N`` episodes of ``states`` ``[N, T, D]`` (and ``actions`` ``[N, T - 1, A]`` between them)
    into ``buffer`` as one env step batch ``[N, T - 1]`` per episode stream."""
    n, t_len = states.shape[:2]
    last = torch.zeros(n, t_len - 1, 1, dtype=torch.bool)
    last[:, -1] = True
    td = TensorDict({
        "state": states[:, :-1].float(), "action": actions.float(),
        "next": {"state": states[:, 1:].float(), "reward": torch.zeros(n, t_len - 1, 1),
                 "terminated": torch.zeros(n, t_len - 1, 1, dtype=torch.bool), "truncated": last, "done": last},
    }, batch_size=[n, t_len - 1])
    buffer.extend(td)


def full_batch(buffer: ReplayBuffer) -> TensorDict:
    """Every complete stored episode, stacked ``[S, T]`` (the spec's full-batch training)."""
    table = buffer.episodes()
    eps = [buffer.episode(int(i), keys=("state",)).select("state", "segment_id", "segment_step")
           for i in table["id"][table["complete"]]]
    return torch.stack(eps)


def train_full_batch(agent: PVRNNAgent, batch: TensorDict, epochs: int, label: str) -> list[dict]:
    history, t0 = [], time.time()
    for epoch in range(epochs):
        metrics = {k: float(v) for k, v in agent.update(batch).items()}
        if epoch % max(1, epochs // 20) == 0 or epoch == epochs - 1:
            history.append({"epoch": epoch, **metrics})
            log(f"{label} epoch {epoch}: recon {metrics['recon']:.4f} kl {metrics['kl']:.4f} "
                f"rmse {metrics['rmse']:.4f} ({time.time() - t0:.0f}s)")
    return history


# ---------------------------------------------------------------------------------- Setting A
def regenerate_from_first(agent: PVRNNAgent, segment_id: int, runs: int, steps: int) -> torch.Tensor:
    """Sample step 1 from the posterior A_1 of a training segment, the prior afterwards: ``[runs, steps, x]``."""
    wm = agent.world_model
    row = agent.adaptive_vectors.rows(torch.tensor([segment_id]), create=False)
    a1 = agent.adaptive_vectors.values[row, 0].detach().expand(runs, -1)
    state = wm.zero_state(runs)
    xs = []
    with torch.no_grad():
        state, x, _, _ = wm.step(state, a1, torch.ones(runs, dtype=torch.bool), sample=True)
        xs.append(x)
        for _ in range(steps - 1):
            state, x, _, _ = wm.step(state, None, torch.zeros(runs, dtype=torch.bool), sample=True)
            xs.append(x)
    return torch.stack(xs, 1)


def run_policy_on_sequence(policy: PVRNNPolicy, seq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Feed observations ``[N, T, x]`` step by step; returns the one-step-ahead predictions ``[N, T-1, x]``."""
    n, t_len = seq.shape[:2]
    carry = policy.init_carry(n)
    preds = []
    for t in range(t_len - 1):
        obs = TensorDict({"state": seq[:, t]}, batch_size=[n])
        _, carry = policy.step(obs, carry, torch.full((n,), t == 0))
        preds.append(carry["x_hat"])
    return {"pred": torch.stack(preds, 1)}


def setting_a(args, fig_dir: Path) -> dict:
    torch.manual_seed(args.seed)
    train, train_left = branching_paths(60, generator=torch.Generator().manual_seed(args.seed))
    test, test_left = branching_paths(20, generator=torch.Generator().manual_seed(args.seed + 1000))
    buffer = ReplayBuffer(60 * 31)
    record_sequences(buffer, train, torch.zeros(60, 29, 1))
    batch = full_batch(buffer)
    assert batch.batch_size == (60, 30)
    results: dict = {}
    for level, w in META_PRIORS.items():
        if level not in args.levels:
            continue
        torch.manual_seed(args.seed)
        config = PVRNNAgent.make_config(
            "paper", d_sizes=[20, 10], z_sizes=[2, 1], taus=[4.0, 8.0], meta_prior=w, w1=[0.01, 0.01],
            num_sequences=60, max_steps=30, seq_len=30, batch_size=60, lr=args.lr_a, er_window=args.er_window,
            er_iters=args.er_iters, er_lr=0.09, plan_horizon=30, plan_iters=args.plan_iters, plan_lr=0.05,
            plan_candidates=8, control_dims=[0, 1], kp=1.0, kd=0.0)
        agent = PVRNNAgent(config, (2,), 2)
        t0 = time.time()
        history = train_full_batch(agent, batch, args.epochs_a, f"A/{level}")
        train_s = time.time() - t0
        agent.eval()
        wm = agent.world_model
        res: dict = {"meta_prior": w, "train_seconds": train_s, "history": history}
        with torch.no_grad():
            gens = wm.generate(60, 30, sample=True)
            left = branch_side(gens).float().mean().item() * 100
            res["table3_left_right"] = (left, 100 - left)
            seg_left = int(batch["segment_id"][train_left.nonzero()[0, 0], 0])
            regen = regenerate_from_first(agent, seg_left, 60, 30)
            rl = branch_side(regen).float().mean().item() * 100
            res["table4_left_right"] = (rl, 100 - rl)
            res["gens_example"], res["regen_example"] = gens[:20].tolist(), regen[:20].tolist()
            out = wm.loss(batch, adaptive=agent.adaptive_vectors.gather(
                agent.adaptive_vectors.rows(batch["segment_id"][:, 0], create=False), batch["segment_step"]))
            res["kl_layers"] = [float(out[f"kl_layer{layer}"]) for layer in range(wm.num_layers)]
            res["train_rmse"] = float(out["rmse"])
        # Table 5: plans for untrained test paths
        rmses, goal_devs, klds, plans = [], [], [], []
        t0 = time.time()
        for run in range(args.plan_runs):
            g = torch.Generator().manual_seed(args.seed + 17 * run)
            plan = wm.plan(test[:, -1], 30, start=test[:, 0], candidates=8, iters=args.plan_iters, lr=0.05,
                           generator=g)
            rmses.append((plan["x_hat"] - test).square().mean((1, 2)).sqrt())
            goal_devs.append((plan["x_hat"][:, -1] - test[:, -1]).square().mean(-1))
            klds.append(plan["kl_layers"].sum(-1))
            plans.append(plan["x_hat"])
        rmse = torch.stack(rmses)  # [runs, 20]
        res["table5"] = {"kld": torch.stack(klds).mean().item(), "rmse": rmse.mean().item(),
                         "rmse_std_over_runs": rmse.mean(1).std().item() if args.plan_runs > 1 else 0.0,
                         "goal_deviation": torch.stack(goal_devs).mean().item(),
                         "plan_branch_follows_goal": (branch_side(plans[0]) == test_left).float().mean().item(),
                         "seconds": time.time() - t0}
        res["plan_example"] = plans[0][:6].tolist()
        # error regression on held-out paths through the policy (ER vs prior-only)
        er_policy = agent.policy()
        er_policy.eval()
        prior_cfg = PVRNNAgent.make_config("paper", **{**config.__dict__, "er_iters": 0})
        prior_policy = PVRNNPolicy(wm, prior_cfg, 2)
        t0 = time.time()
        pred_er = run_policy_on_sequence(er_policy, test)["pred"]
        er_seconds = time.time() - t0
        pred_prior = run_policy_on_sequence(prior_policy, test)["pred"]
        err_er = (pred_er - test[:, 1:]).square().mean().sqrt().item()
        err_prior = (pred_prior - test[:, 1:]).square().mean().sqrt().item()
        # window reconstruction over ER iterations: windows ending at t = 10, 15, 20, 25, from zero state
        curves = []
        for end in (10, 15, 20, 25):
            window = TensorDict({"x": test[:, end - args.er_window:end]}, batch_size=[20, args.er_window])
            state = wm.initial_state(20)
            state["steps"] = torch.full((20,), end - args.er_window)
            first = torch.zeros(20, args.er_window, dtype=torch.bool)
            first[:, 0] = end - args.er_window == 0
            window["first"] = first
            out = wm.infer(window, state, args.er_iters, history=True)
            curves.append(out["recon_history"].mean(0) / args.er_window)
        curve = torch.stack(curves).mean(0)
        res["er"] = {"one_step_rmse_er": err_er, "one_step_rmse_prior": err_prior,
                     "window_recon_iter0": curve[0].item(), "window_recon_final": curve[-1].item(),
                     "curve": curve.tolist(), "seconds_per_step": er_seconds / (20 * 29) * 20}
        results[level] = res
        log(f"A/{level}: T3 {res['table3_left_right']} T4 {res['table4_left_right']} T5 {res['table5']} "
            f"KL {res['kl_layers']} ER {res['er']['one_step_rmse_er']:.4f} vs prior {err_prior:.4f}")
    plot_setting_a(results, train, test, fig_dir)
    return results


def plot_setting_a(results: dict, train: torch.Tensor, test: torch.Tensor, fig_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(results)
    fig, axes = plt.subplots(1, len(levels) + 1, figsize=(4 * (len(levels) + 1), 4))
    for p in train[:20]:
        axes[0].plot(p[:, 0], p[:, 1], color="grey", alpha=0.6)
    axes[0].set_title("training paths (20 of 60)")
    for ax, level in zip(axes[1:], levels, strict=True):
        for p in torch.tensor(results[level]["gens_example"]):
            ax.plot(p[:, 0], p[:, 1], alpha=0.6)
        lr = results[level]["table3_left_right"]
        ax.set_title(f"{level}: prior generations\nleft {lr[0]:.0f}% / right {lr[1]:.0f}%")
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(fig_dir / "prior_generations.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ws = [results[lv]["meta_prior"][0] for lv in levels]
    for layer in range(len(results[levels[0]]["kl_layers"])):
        ax.plot(ws, [results[lv]["kl_layers"][layer] for lv in levels], "o-", label=f"layer {layer}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("meta-prior w (bottom layer)")
    ax.set_ylabel("KL per step / z (training)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(fig_dir / "kl_vs_meta_prior.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for lv in levels:
        ax.plot(results[lv]["er"]["curve"], label=lv)
    ax.set_xlabel("ER iteration")
    ax.set_ylabel("window reconstruction (sq. error / dim / step)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(fig_dir / "er_curves.png", dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 4), squeeze=False)
    axes = axes[0]
    for ax, lv in zip(axes, levels, strict=True):
        for i, p in enumerate(torch.tensor(results[lv]["plan_example"])):
            ax.plot(test[i, :, 0], test[i, :, 1], color="grey", alpha=0.6)
            ax.plot(p[:, 0], p[:, 1], alpha=0.8)
        ax.set_title(f"{lv}: plans (colour), test paths (grey)", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(fig_dir / "plans_setting_a.png", dpi=80)
    plt.close(fig)


def report_a(results: dict) -> list[str]:
    lines = ["## Setting A: branching 2-D paths (GLean Exp. 1)", "",
             "| meta-prior | w | Table 3 left/right (ours) | published | Table 4 left/right from A_1 (ours) | "
             "published | train RMSE | train s |", "|---|---|---|---|---|---|---|---|"]
    for lv, r in results.items():
        t3, t4 = r["table3_left_right"], r["table4_left_right"]
        lines.append(f"| {lv} | {r['meta_prior']} | {t3[0]:.1f} / {t3[1]:.1f} | {PUBLISHED_T3[lv][0]} / "
                     f"{PUBLISHED_T3[lv][1]} | {t4[0]:.1f} / {t4[1]:.1f} | {PUBLISHED_T4[lv][0]} / "
                     f"{PUBLISHED_T4[lv][1]} | {r['train_rmse']:.4f} | {r['train_seconds']:.0f} |")
    lines += ["", "Table 5 (plans for 20 untrained test paths, start + goal given):", "",
              "| meta-prior | KLD (ours) | RMSE (ours) | goal deviation (ours) | branch follows goal | "
              "published KLD / RMSE / goal dev. |", "|---|---|---|---|---|---|"]
    for lv, r in results.items():
        t5 = r["table5"]
        p = PUBLISHED_T5[lv]
        lines.append(f"| {lv} | {t5['kld']:.3g} | {t5['rmse']:.4f} ± {t5['rmse_std_over_runs']:.4f} | "
                     f"{t5['goal_deviation']:.2e} | {100 * t5['plan_branch_follows_goal']:.0f}% | "
                     f"{p[0]} / {p[1]} / {p[2]:.1e} |")
    lines += ["", "Per-layer KL (training, per step, divided by z) and error regression on the 20 held-out paths:", "",
              "| meta-prior | KL layer 0 | KL layer 1 | window recon iter 0 | after ER | one-step RMSE, ER | "
              "prior only |", "|---|---|---|---|---|---|---|"]
    for lv, r in results.items():
        e = r["er"]
        lines.append(f"| {lv} | {r['kl_layers'][0]:.4g} | {r['kl_layers'][1]:.4g} | {e['window_recon_iter0']:.2e} | "
                     f"{e['window_recon_final']:.2e} | {e['one_step_rmse_er']:.4f} | {e['one_step_rmse_prior']:.4f} |")
    lines += ["", "![prior generations](bench_pv_rnn/prior_generations.png)",
              "![KL vs meta-prior](bench_pv_rnn/kl_vs_meta_prior.png)", "![ER curves](bench_pv_rnn/er_curves.png)",
              "![plans](bench_pv_rnn/plans_setting_a.png)", ""]
    return lines


# ---------------------------------------------------------------------------------- Setting B
HOME, VIA = (0.0, 0.0), (0.6, 0.6)
BRANCH_ENDS = {"B": (1.6, -0.6), "C": (-0.4, 1.6)}
KP, KD = 3.0, 0.3


def primitive_targets(branch: str, steps: int, split: int, rng: np.random.Generator) -> np.ndarray:
    """Joint-angle targets ``[steps, 2]`` of the FSM: primitive A (home -> via) for ``split`` steps, then B or C."""
    via = np.asarray(VIA) + 0.05 * rng.standard_normal(2)
    end = np.asarray(BRANCH_ENDS[branch]) + 0.05 * rng.standard_normal(2)

    def ease(a, b, n):
        s = np.linspace(0, 1, n + 1)[1:, None]
        return a + (b - a) * (0.5 - 0.5 * np.cos(np.pi * s))

    return np.concatenate([ease(np.asarray(HOME), via, split), ease(via, end, steps - split)])


def reacher_env(seed: int):
    from dm_control import suite

    return suite.load("reacher", "easy", task_kwargs={"random": seed})


def reset_home(env, rng: np.random.Generator) -> np.ndarray:
    env.reset()
    with env.physics.reset_context():
        env.physics.named.data.qpos[:] = np.asarray(HOME) + 0.03 * rng.standard_normal(2)
        env.physics.named.data.qvel[:] = 0.0
    return reacher_state(env)


def reacher_state(env) -> np.ndarray:
    """latentrl's flattened reacher ``state``: position (2), to_target (2), velocity (2)."""
    obs = env.task.get_observation(env.physics)
    return np.concatenate([obs["position"], obs["to_target"], obs["velocity"]]).astype(np.float32)


def run_fsm_episode(env, branch: str, steps: int, split: int, rng: np.random.Generator):
    """One scripted episode: states ``[steps + 1, 6]``, actions ``[steps, 2]``."""
    targets = primitive_targets(branch, steps, split, rng)
    states, actions = [reset_home(env, rng)], []
    for t in range(steps):
        q, qdot = states[-1][:2], states[-1][4:]
        a = np.clip(KP * (targets[t] - q) - KD * qdot, -1, 1).astype(np.float32)
        env.step(a)
        actions.append(a)
        states.append(reacher_state(env))
    return np.stack(states), np.stack(actions)


def execute_policy(env, policy: PVRNNPolicy, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Run ``policy`` (batch 1) for ``steps`` steps from home; returns joint angles ``[steps + 1, 2]``."""
    state = reset_home(env, rng)
    carry, qs = policy.init_carry(1), [state[:2]]
    for t in range(steps):
        obs = TensorDict({"state": torch.from_numpy(state)[None]}, batch_size=[1])
        action, carry = policy.step(obs, carry, torch.full((1,), t == 0))
        env.step(action[0].numpy())
        state = reacher_state(env)
        qs.append(state[:2])
    return np.stack(qs)


def step_latency(policy: PVRNNPolicy, states: torch.Tensor, repeats: int) -> dict:
    """p50 / p99 wall time (ms) of ``policy.step`` at batch 1 along recorded states ``[T, 6]``."""
    times, carry = [], policy.init_carry(1)
    for i in range(repeats):
        t = i % states.shape[0]
        obs = TensorDict({"state": states[t][None]}, batch_size=[1])
        t0 = time.perf_counter()
        _, carry = policy.step(obs, carry, torch.full((1,), t == 0))
        times.append(1000 * (time.perf_counter() - t0))
    times = np.asarray(times[5:])
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)), "n": len(times)}


def setting_b(args, fig_dir: Path) -> dict:
    steps, split = args.steps_b, args.steps_b * 3 // 8
    rng = np.random.default_rng(args.seed)
    env = reacher_env(args.seed)
    t0 = time.time()
    branches = ["B" if i % 2 == 0 else "C" for i in range(args.episodes_b)]
    rng.shuffle(branches)
    states, actions = zip(*[run_fsm_episode(env, b, steps, split, rng) for b in branches], strict=True)
    states, actions = torch.from_numpy(np.stack(states)), torch.from_numpy(np.stack(actions))
    buffer = ReplayBuffer(args.episodes_b * (steps + 2))
    record_sequences(buffer, states, actions)
    batch = full_batch(buffer)
    log(f"B: recorded {len(branches)} FSM episodes of {steps} steps into the buffer ({time.time() - t0:.0f}s); "
        f"batch {list(batch.batch_size)}")
    torch.manual_seed(args.seed)
    config = PVRNNAgent.make_config(
        "paper", model_dims=[0, 1], velocity_dims=[4, 5], kp=KP, kd=KD, meta_prior=[args.meta_prior_b] * 2,
        num_sequences=args.episodes_b, max_steps=steps + 1, seq_len=steps, batch_size=args.episodes_b, lr=args.lr_b,
        plan_horizon=steps + 1, plan_iters=args.plan_iters, plan_candidates=8, goal_dims=[0, 1])
    agent = PVRNNAgent(config, (6,), 2)
    t0 = time.time()
    history = train_full_batch(agent, batch, args.epochs_b, "B")
    train_s = time.time() - t0
    agent.eval()
    # goals at the B / C end areas; GLean plans executed through the PD controller in the simulator
    sides = ["B" if i % 2 == 0 else "C" for i in range(args.goals_b)]
    # the goal areas are where the recorded B / C primitives end (the PD lags its targets a little)
    is_b = torch.tensor([b == "B" for b in branches])
    ends = {"B": states[is_b, -1, :2].mean(0), "C": states[~is_b, -1, :2].mean(0)}
    goals = torch.stack([ends[s] + 0.05 * torch.from_numpy(rng.standard_normal(2)).float() for s in sides])
    start = torch.zeros(args.goals_b, 6)
    start[:, :2] = torch.tensor(HOME)
    goal_obs = torch.zeros(args.goals_b, 6)
    goal_obs[:, :2] = goals
    t0 = time.time()
    task = agent.infer_task(GoalObservation(TensorDict({"state": goal_obs, "start": {"state": start}},
                                                        batch_size=[args.goals_b])),
                            generator=torch.Generator().manual_seed(args.seed))
    plan_s = time.time() - t0
    executed, planned = [], task.z
    for i in range(args.goals_b):
        policy = agent.policy(Task(z=planned[i:i + 1], info={"kind": "plan"}))
        executed.append(execute_policy(env, policy, steps + args.settle_b, rng))
    executed = np.stack(executed)
    final = torch.from_numpy(executed[:, -1])
    dist = (final - goals).norm(dim=-1)
    took_b = (final - ends["B"]).norm(dim=-1) < (final - ends["C"]).norm(dim=-1)
    follows = (took_b == torch.tensor([s == "B" for s in sides])).float().mean().item()
    # random-primitive baseline: the FSM's own coin flip, same PD controller
    base_final = []
    for _ in range(args.goals_b):
        branch = "B" if rng.random() < 0.5 else "C"
        base_final.append(run_fsm_episode(env, branch, steps, split, rng)[0][-1, :2])
    base_dist = (torch.from_numpy(np.stack(base_final)) - goals).norm(dim=-1)
    # step latency at batch 1 (ER window x iterations of the presets), on the trained model
    latency = {}
    for name in ("paper", "small"):
        cfg = PVRNNAgent.make_config(name, **{k: v for k, v in config.__dict__.items()
                                              if k not in ("er_window", "er_iters", "plan_iters", "plan_candidates")})
        pol = PVRNNPolicy(agent.world_model, cfg, 2)
        pol.eval()
        latency[name] = {"er_window": cfg.er_window, "er_iters": cfg.er_iters,
                         **step_latency(pol, states[0], args.latency_steps)}
    # one-step prediction on held-out FSM episodes: ER vs prior-only
    held = torch.from_numpy(np.stack([run_fsm_episode(env, b, steps, split, rng)[0] for b in ("B", "C", "B", "C")]))
    er_pol = PVRNNPolicy(agent.world_model, config, 2)
    prior_pol = PVRNNPolicy(agent.world_model, PVRNNAgent.make_config("paper", **{**config.__dict__, "er_iters": 0}), 2)
    q = held[:, :, :2]

    def one_step(pol):
        carry, errs = pol.init_carry(4), []
        for t in range(steps):
            _, carry = pol.step(TensorDict({"state": held[:, t]}, batch_size=[4]), carry, torch.full((4,), t == 0))
            errs.append((carry["x_hat"] - q[:, t + 1]).square().mean())
        return torch.stack(errs).mean().sqrt().item()

    res = {"episodes": args.episodes_b, "steps": steps, "train_seconds": train_s, "history": history,
           "train_rmse": history[-1]["rmse"], "plan_seconds": plan_s,
           "success": (dist < args.success_radius).float().mean().item(), "final_distance": dist.mean().item(),
           "baseline_success": (base_dist < args.success_radius).float().mean().item(),
           "baseline_final_distance": base_dist.mean().item(), "branch_follows_goal": follows,
           "plan_goal_error": task.info["goal_error"], "latency": latency,
           "one_step_rmse_er": one_step(er_pol), "one_step_rmse_prior": one_step(prior_pol),
           "meta_prior": args.meta_prior_b, "goal_areas": {k: v.tolist() for k, v in ends.items()},
           "success_radius": args.success_radius, "settle": args.settle_b}
    log(f"B: success {res['success']:.2f} (baseline {res['baseline_success']:.2f}), final distance "
        f"{res['final_distance']:.3f} (baseline {res['baseline_final_distance']:.3f}), follows {follows:.2f}, "
        f"latency {latency}, ER one-step {res['one_step_rmse_er']:.4f} vs prior {res['one_step_rmse_prior']:.4f}")
    plot_setting_b(states, planned, executed, goals, fig_dir)
    return res


def plot_setting_b(states: torch.Tensor, planned: torch.Tensor, executed: np.ndarray, goals: torch.Tensor,
                   fig_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for s in states:
        ax.plot(s[:, 0], s[:, 1], color="lightgrey", lw=0.8)
    for i in range(len(goals)):
        line, = ax.plot(planned[i, :, 0], planned[i, :, 1], "--", lw=1.5)
        ax.plot(executed[i, :, 0], executed[i, :, 1], "-", color=line.get_color(), lw=1.5)
        ax.plot(goals[i, 0], goals[i, 1], "*", color=line.get_color(), ms=12)
    ax.set_xlabel("shoulder angle (rad)")
    ax.set_ylabel("wrist angle (rad)")
    ax.set_title("reacher: FSM data (grey), GLean plans (dashed),\nexecuted through PD (solid), goals (*)")
    fig.tight_layout()
    fig.savefig(fig_dir / "planned_vs_executed.png", dpi=80)
    plt.close(fig)


def report_b(r: dict) -> list[str]:
    lat = r["latency"]
    return [
        "## Setting B: dm_control reacher, scripted probabilistic FSM of motion primitives", "",
        f"{r['episodes']} FSM episodes of {r['steps']} steps (primitive A home -> via, then B or C, p = 0.5; PD "
        f"kp {KP}, kd {KD}) recorded into a `ReplayBuffer`; PV-RNN 40/4/2 + 20/2/8 on the two joint angles, "
        f"meta-prior {r['meta_prior']}, trained full batch for {r['history'][-1]['epoch'] + 1} epochs "
        f"({r['train_seconds']:.0f} s; final train RMSE {r['train_rmse']:.4f} rad). GLean plans "
        f"({r['plan_seconds']:.0f} s for all goals) executed in the simulator through `PVRNNPolicy` (plan -> PD) "
        f"for the plan's {r['steps']} steps plus {r['settle']} steps holding its last point (the PD lags the plan; "
        "the FSM baseline runs its primitives for the same 40 steps the data was recorded with).", "",
        f"Goal areas (mean recorded end of each primitive): {r['goal_areas']}; goals drawn around them (std 0.05 "
        f"rad); success = final joint-space distance < {r['success_radius']} rad.", "",
        "| | success (final joint distance < radius) | mean final distance (rad) | branch follows goal |",
        "|---|---|---|---|",
        f"| PV-RNN GLean plan + PD | {100 * r['success']:.0f}% | {r['final_distance']:.3f} | "
        f"{100 * r['branch_follows_goal']:.0f}% |",
        f"| random primitive (FSM coin flip) + PD | {100 * r['baseline_success']:.0f}% | "
        f"{r['baseline_final_distance']:.3f} | - |", "",
        f"One-step-ahead joint-angle RMSE on 4 held-out FSM episodes: with error regression "
        f"{r['one_step_rmse_er']:.4f} rad, prior only {r['one_step_rmse_prior']:.4f} rad.", "",
        "Step latency, `PVRNNPolicy.step` at batch 1 on this CPU (1 thread, machine shared with other jobs):", "",
        "| preset | ER window | ER iterations | p50 (ms) | p99 (ms) |", "|---|---|---|---|---|",
        *[f"| {k} | {v['er_window']} | {v['er_iters']} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} |"
          for k, v in lat.items()],
        "", "![planned vs executed](bench_pv_rnn/planned_vs_executed.png)", ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run (fewer epochs, iterations)")
    parser.add_argument("--only", choices=["A", "B", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs-a", type=int, default=4000)
    parser.add_argument("--levels", nargs="+", choices=list(META_PRIORS), default=list(META_PRIORS),
                        help="Setting A meta-prior levels to run")
    parser.add_argument("--lr-a", type=float, default=5e-3)
    parser.add_argument("--plan-iters", type=int, default=300)
    parser.add_argument("--plan-runs", type=int, default=2)
    parser.add_argument("--er-window", type=int, default=10)
    parser.add_argument("--er-iters", type=int, default=50)
    parser.add_argument("--episodes-b", type=int, default=48)
    parser.add_argument("--steps-b", type=int, default=40)
    parser.add_argument("--epochs-b", type=int, default=1500)
    parser.add_argument("--lr-b", type=float, default=5e-3)
    parser.add_argument("--meta-prior-b", type=float, default=1e-3)
    parser.add_argument("--settle-b", type=int, default=10,
                        help="steps the executed plan runs past its horizon, holding the planned goal (PD lag)")
    parser.add_argument("--latency-steps", type=int, default=60)
    parser.add_argument("--goals-b", type=int, default=10)
    parser.add_argument("--success-radius", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_pv_rnn.md"))
    parser.add_argument("--fig-dir", type=Path, default=Path("docs/bench_pv_rnn"))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs_a, args.plan_iters, args.plan_runs, args.er_iters = 300, 50, 1, 10
        args.episodes_b, args.epochs_b, args.goals_b, args.latency_steps = 16, 200, 4, 40
    torch.set_num_threads(1)
    args.fig_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    lines = ["# PV-RNN benchmark (issue 15)", "",
             f"Command: `python scripts/bench_pv_rnn.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
             f"({dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, 1 thread).", ""]
    t0 = time.time()
    if args.only in ("A", "both"):
        results["A"] = setting_a(args, args.fig_dir)
        lines += report_a(results["A"])
    if args.only in ("B", "both"):
        results["B"] = setting_b(args, args.fig_dir)
        lines += report_b(results["B"])
    lines.append(f"Total wall time: {time.time() - t0:.0f} s.")
    (args.fig_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    args.out.write_text("\n".join(lines) + "\n")
    log(f"wrote {args.out} and {args.fig_dir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
