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
from latentrl.agents.pv_rnn import PVRNNAgent, PVRNNPolicy, branch_side, branching_paths, pd_control
from latentrl.replay import ReplayBuffer
from latentrl.training.checkpoint import CheckpointError, load_plain, save_atomic

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
    """Every complete stored episode, stacked ``[S, T]`` (the spec's full-batch training), ordered by env
    stream, then id: with one episode per env that is the env order (the FSM branch / goal order)."""
    table = buffer.episodes()
    table = table[table["complete"]]
    order = torch.argsort(table["env"] * (int(table["id"].max()) + 1) + table["id"])
    eps = [buffer.episode(int(i), keys=("state",)).select("state", "segment_id", "segment_step")
           for i in table["id"][order]]
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
def glean_paths(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GLean's own branching-path data (``oist-cnru/GLean`` ``data/branching_path``, spec §7): the 60
    training and 20 test paths, stored as 10-bin softmax codes over [0, 1] per dimension, decoded by
    their expectation (GLean ``ops.unsoftmax``). Returns ``train [60, 30, 2]``, ``train_left``,
    ``test [20, 30, 2]``, ``test_left``."""
    refs = torch.linspace(0.0, 1.0, 10, dtype=torch.float64)

    def decode(code: np.ndarray) -> torch.Tensor:
        code = torch.from_numpy(code).double()
        return torch.stack([code[..., 10 * i:10 * (i + 1)] @ refs for i in range(code.shape[-1] // 10)], -1).float()

    train_file = root / "train" / "path_2g_60_softmax10.npy"
    test_files = sorted((root / "test").glob("path_2g_test_*_softmax10.npy"),
                        key=lambda f: int(f.name.split("_")[3]))
    if not train_file.exists() or len(test_files) != 20:
        raise FileNotFoundError(f"{root} must hold GLean's train/path_2g_60_softmax10.npy and 20 "
                                "test/path_2g_test_<i>_softmax10.npy files (oist-cnru/GLean data/branching_path)")
    train = decode(np.load(train_file))
    test = torch.stack([decode(np.load(f)).reshape(30, 2) for f in test_files])
    return train, branch_side(train), test, branch_side(test)


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


def trained_agent_a(args, batch: TensorDict, level: str, w: list[float], seed: int):
    """The Setting A agent of ``level`` trained from ``seed`` (full batch, ``--epochs-a`` epochs at ``--lr-a``),
    or loaded from ``--model-dir`` when an earlier run saved it there (it is saved there after training).
    Returns the agent (eval mode), its training seconds and its loss history."""
    torch.manual_seed(seed)
    config = PVRNNAgent.make_config(
        "paper", d_sizes=[20, 10], z_sizes=[2, 1], taus=[4.0, 8.0], meta_prior=w, w1=[0.01, 0.01],
        recon_weight=args.recon_weight, num_sequences=60, max_steps=30, seq_len=30, batch_size=60, lr=args.lr_a,
        er_window=args.er_window, er_iters=args.er_iters, er_lr=0.09, plan_horizon=30, plan_iters=args.plan_iters,
        plan_lr=0.05, plan_candidates=8, control_dims=[0, 1], kp=1.0, kd=0.0)
    agent = PVRNNAgent(config, (2,), 2)
    name = (f"A_{level}_rw{args.recon_weight:g}_lr{args.lr_a:g}_ep{args.epochs_a}_seed{seed}"
            f"{'_glean' if args.glean_data else ''}.pt")
    path = None if args.model_dir is None else args.model_dir / name
    if path is not None and path.exists():
        try:  # tensors, numbers and lists only: opening a file in --model-dir never runs code
            saved = load_plain(path, pickled_advice="Delete it to train that model again.")
        except CheckpointError as err:
            raise SystemExit(str(err)) from None
        agent.load_state_dict(saved["agent"])
        train_s, history = saved["train_seconds"], saved["history"]
        log(f"A/{level} seed {seed}: loaded {path}")
    else:
        t0 = time.time()
        history = train_full_batch(agent, batch, args.epochs_a, f"A/{level}/seed{seed}")
        train_s = time.time() - t0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic({"agent": agent.state_dict(), "train_seconds": train_s, "history": history}, path)
    agent.eval()
    return agent, train_s, history


def table5(args, wm, test: torch.Tensor, test_left: torch.Tensor, seed: int) -> dict:
    """GLean Table 5: plans for the untrained test paths given their start and goal, RMSE to the whole
    ground-truth path, the plan's KL (per step / z, summed over steps and layers) and the goal deviation.

    ``glean``: GLean's protocol (plan.py / model.py): every forward pass samples z, the accuracy is
    reweighted as if every step were observed (planning_auto_weight 1), ``--plan-runs`` runs (GLean: 10)
    of 8 candidates x ``--plan-iters`` iterations (GLean: 500) at 0.05. ``mean``: posterior means (the
    deterministic plan the agent tracks), no reweighting, one run."""
    out: dict = {}
    for name, sample, rec_weighting, runs in (("glean", True, 1.0, args.plan_runs), ("mean", False, 0.0, 1)):
        rmses, goal_devs, klds, follows = [], [], [], []
        t0 = time.time()
        for run in range(runs):
            torch.manual_seed(1000 * seed + run)  # the sampled z
            plan = wm.plan(test[:, -1], 30, start=test[:, 0], candidates=8, iters=args.plan_iters, lr=0.05,
                           generator=torch.Generator().manual_seed(1000 * seed + 17 * run), sample=sample,
                           rec_weighting=rec_weighting)
            rmses.append((plan["x_hat"] - test).square().mean((1, 2)).sqrt().mean().item())
            goal_devs.append((plan["x_hat"][:, -1] - test[:, -1]).square().mean(-1).mean().item())
            klds.append(plan["kl_layers"].sum(-1).mean().item())
            follows.append((branch_side(plan["x_hat"]) == test_left).float().mean().item())
            if name == "glean" and run == 0:
                out["plan_example"] = plan["x_hat"][:6].tolist()
        out[name] = {"rmse": float(np.mean(rmses)), "rmse_runs": rmses,
                     "rmse_std_over_runs": float(np.std(rmses)), "kld": float(np.mean(klds)),
                     "goal_deviation": float(np.mean(goal_devs)), "plan_branch_follows_goal": float(np.mean(follows)),
                     "seconds": time.time() - t0}
    return out


def setting_a(args, fig_dir: Path) -> dict:
    torch.manual_seed(args.seed)
    if args.glean_data is not None:
        train, train_left, test, test_left = glean_paths(args.glean_data)
    else:
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
        res: dict = {"meta_prior": w, "table5_seeds": {}}
        for seed in args.seeds:
            agent, train_s, history = trained_agent_a(args, batch, level, w, seed)
            wm = agent.world_model
            res["table5_seeds"][seed] = t5 = table5(args, wm, test, test_left, seed)
            log(f"A/{level} seed {seed}: Table 5 " + ", ".join(
                f"{k}: RMSE {v['rmse']:.4f} KLD {v['kld']:.3g} goal dev. {v['goal_deviation']:.2e}"
                for k, v in t5.items() if isinstance(v, dict)))
            if seed != args.seeds[0]:
                continue
            config = agent.config
            res.update({"train_seconds": train_s, "history": history, "plan_example": t5.pop("plan_example")})
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
                         "curve": curve.tolist(), "seconds_per_step": er_seconds / (20 * 29) * 20,
                         "per_t_er": (pred_er - test[:, 1:]).square().mean((0, 2)).sqrt().tolist(),
                         "per_t_prior": (pred_prior - test[:, 1:]).square().mean((0, 2)).sqrt().tolist()}
            # other ER windows (W = 30 keeps the whole path, A_1 included, in the window)
            res["er_by_window"] = {}
            for window_len in args.er_windows_extra:
                cfg_w = PVRNNAgent.make_config("paper", **{**config.__dict__, "er_window": window_len})
                pred_w = run_policy_on_sequence(PVRNNPolicy(wm, cfg_w, 2).eval(), test)["pred"]
                res["er_by_window"][window_len] = {
                    "one_step_rmse_er": (pred_w - test[:, 1:]).square().mean().sqrt().item(),
                    "per_t_er": (pred_w - test[:, 1:]).square().mean((0, 2)).sqrt().tolist()}
        t5_all = [r["glean"] for r in res["table5_seeds"].values()]
        res["table5"] = {k: float(np.mean([r[k] for r in t5_all])) for k in ("rmse", "kld", "goal_deviation")}
        res["table5"]["rmse_std_over_seeds"] = float(np.std([r["rmse"] for r in t5_all]))
        results[level] = res
        log(f"A/{level}: T3 {res['table3_left_right']} T4 {res['table4_left_right']} T5 {res['table5']} "
            f"KL {res['kl_layers']} ER {res['er']['one_step_rmse_er']:.4f} vs prior "
            f"{res['er']['one_step_rmse_prior']:.4f}")
    plot_setting_a(results, train, test, fig_dir)
    return results


def plot_setting_a(results: dict, train: torch.Tensor, test: torch.Tensor, fig_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(results)
    fig, axes = plt.subplots(1, len(levels) + 1, figsize=(4 * (len(levels) + 1), 4))
    for p in train[::3]:  # every third: GLean's files list the left paths first
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
    ax.set_ylabel("window reconstruction term / step\n(recon_weight x sq. error / dim)")
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
    lines += ["", "Table 5 (plans for the 20 untrained test paths, start + goal given). `glean`: GLean's protocol "
              "(z sampled in every pass, accuracy reweighted x T/3, mean over runs); `mean`: posterior means, one run:",
              "", "| meta-prior | seed | RMSE glean (runs) | KLD glean | goal dev. glean | branch follows goal | "
              "RMSE mean | KLD mean | published KLD / RMSE / goal dev. |", "|---|---|---|---|---|---|---|---|---|"]
    for lv, r in results.items():
        p = PUBLISHED_T5[lv]
        for seed, t5 in r["table5_seeds"].items():
            g, m = t5["glean"], t5["mean"]
            runs = ", ".join(f"{x:.4f}" for x in g["rmse_runs"])
            lines.append(f"| {lv} | {seed} | {g['rmse']:.4f} ({runs}) | {g['kld']:.3g} | {g['goal_deviation']:.2e} | "
                         f"{100 * g['plan_branch_follows_goal']:.0f}% | {m['rmse']:.4f} | {m['kld']:.3g} | "
                         f"{p[0]} / {p[1]} / {p[2]:.1e} |")
        t5 = r["table5"]
        lines.append(f"| **{lv}** | mean | **{t5['rmse']:.4f}** ± {t5['rmse_std_over_seeds']:.4f} (seeds) | "
                     f"{t5['kld']:.3g} | {t5['goal_deviation']:.2e} | | | | |")
    lines += ["", "Per-layer KL (training, per step, divided by z) and error regression on the 20 held-out paths:", "",
              "| meta-prior | KL layer 0 | KL layer 1 | window recon iter 0 | after ER | one-step RMSE, ER | "
              "prior only |", "|---|---|---|---|---|---|---|"]
    for lv, r in results.items():
        e = r["er"]
        lines.append(f"| {lv} | {r['kl_layers'][0]:.4g} | {r['kl_layers'][1]:.4g} | {e['window_recon_iter0']:.2e} | "
                     f"{e['window_recon_final']:.2e} | {e['one_step_rmse_er']:.4f} | {e['one_step_rmse_prior']:.4f} |")
    extra = sorted({w for r in results.values() for w in r.get("er_by_window", {})})
    if extra:
        lines += ["", "One-step-ahead RMSE with other ER windows (same iterations and rate):", "",
                  "| meta-prior | " + " | ".join(f"ER, W = {w}" for w in extra) + " | prior only |",
                  "|---|" + "---|" * (len(extra) + 1)]
        for lv, r in results.items():
            cells = [f"{r['er_by_window'][w]['one_step_rmse_er']:.4f}" for w in extra]
            lines.append(f"| {lv} | " + " | ".join(cells) + f" | {r['er']['one_step_rmse_prior']:.4f} |")
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


def reacher_env(num_envs: int, seed: int, episode_length: int):
    """``num_envs`` reacher-easy envs through :func:`latentrl.envs.make_env` (state + physics, stepped in this
    process), each episode ``episode_length`` steps long."""
    from latentrl.envs import make_env

    env = make_env("reacher-easy", obs=("state", "physics"), num_envs=num_envs, num_workers=0, seed=seed,
                   episode_length=episode_length)
    if env.physics_dim != 4:
        raise RuntimeError(f"expected reacher's physics state [qpos(2), qvel(2)], got {env.physics_dim} dims")
    return env


def reset_home(env, rng: np.random.Generator) -> TensorDict:
    """Reset every env, then put both joints at ``HOME`` (+ 0.03 rad noise) at rest through
    ``env.set_physics_state``; returns the first step's TensorDict (``state``: position (2),
    to_target (2), velocity (2))."""
    td = env.reset()
    physics = td["physics"].clone()
    n = physics.shape[0]
    physics[:, :2] = torch.tensor(HOME, dtype=physics.dtype) + 0.03 * torch.from_numpy(rng.standard_normal((n, 2)))
    physics[:, 2:] = 0.0
    td.update(env.set_physics_state(physics))
    return td


def run_episodes(env, act, steps: int, rng: np.random.Generator, buffer: ReplayBuffer | None = None) -> torch.Tensor:
    """One episode of ``steps`` steps in every env of ``env`` from home: ``act(t, td) -> actions [N, 2]``;
    every step goes into ``buffer`` (TorchRL step TensorDicts, as the trainer writes them). Returns the
    states ``[N, steps + 1, 6]``."""
    from torchrl.envs.utils import step_mdp

    td = reset_home(env, rng)
    states = [td["state"]]
    for t in range(steps):
        td["action"] = act(t, td)
        td = env.step(td)
        if buffer is not None:
            buffer.extend(td)
        td = step_mdp(td)
        states.append(td["state"])
    return torch.stack(states, 1)


def fsm_actor(branches: list[str], steps: int, split: int, rng: np.random.Generator):
    """The scripted FSM for one episode per env: primitive A, then the env's branch, tracked by the PD."""
    targets = torch.from_numpy(np.stack([primitive_targets(b, steps, split, rng) for b in branches])).float()

    def act(t: int, td: TensorDict) -> torch.Tensor:
        state = td["state"]
        return pd_control(state[:, :2], targets[:, t], state[:, 4:], KP, KD)

    return act


def policy_actor(policy: PVRNNPolicy, num_envs: int):
    """``policy`` (its carry kept across steps) as an actor for :func:`run_episodes`."""
    box = {"carry": policy.init_carry(num_envs)}

    def act(t: int, td: TensorDict) -> torch.Tensor:
        action, box["carry"] = policy.step(td.select("state"), box["carry"], torch.full((num_envs,), t == 0))
        return action

    return act


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
    t0 = time.time()
    branches = ["B" if i % 2 == 0 else "C" for i in range(args.episodes_b)]
    rng.shuffle(branches)
    # the FSM's episodes, all envs at once through make_env, every step recorded into the shared buffer
    env = reacher_env(args.episodes_b, args.seed, steps)
    buffer = ReplayBuffer(args.episodes_b * (steps + 2))
    run_episodes(env, fsm_actor(branches, steps, split, rng), steps, rng, buffer)
    env.close()
    batch = full_batch(buffer)
    states = batch["state"]  # [episodes, steps + 1, 6]: every episode's rows, its last observation included
    log(f"B: recorded {len(branches)} FSM episodes of {steps} steps into the buffer through make_env "
        f"({time.time() - t0:.0f}s); batch {list(batch.batch_size)}")
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
    planned = task.z
    # every goal's plan executed at once (one env per goal) through make_env; the steps go to a buffer
    env = reacher_env(args.goals_b, args.seed + 1, steps + args.settle_b)
    eval_buffer = ReplayBuffer(args.goals_b * (steps + args.settle_b + 2))
    policy = agent.policy(Task(z=planned, info={"kind": "plan"}))
    run_episodes(env, policy_actor(policy, args.goals_b), steps + args.settle_b, rng, eval_buffer)
    env.close()
    executed = full_batch(eval_buffer)["state"][:, :, :2]  # [goals, steps + settle + 1, 2], goal order
    final = executed[:, -1]
    dist = (final - goals).norm(dim=-1)
    took_b = (final - ends["B"]).norm(dim=-1) < (final - ends["C"]).norm(dim=-1)
    follows = (took_b == torch.tensor([s == "B" for s in sides])).float().mean().item()
    # random-primitive baseline: the FSM's own coin flip, same PD controller
    env = reacher_env(args.goals_b, args.seed + 2, steps)
    coin = ["B" if rng.random() < 0.5 else "C" for _ in range(args.goals_b)]
    base_final = run_episodes(env, fsm_actor(coin, steps, split, rng), steps, rng)[:, -1, :2]
    env.close()
    base_dist = (base_final - goals).norm(dim=-1)
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
    env = reacher_env(4, args.seed + 3, steps)
    held = run_episodes(env, fsm_actor(["B", "C", "B", "C"], steps, split, rng), steps, rng)
    env.close()
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
        f"kp {KP}, kd {KD}), one env each of `make_env('reacher-easy')` with the joints put at home by "
        "`set_physics_state`, recorded step by step into a `ReplayBuffer` and trained on its stacked episodes; "
        "PV-RNN 40/4/2 + 20/2/8 on the two joint angles, "
        f"meta-prior {r['meta_prior']}, trained full batch for {r['history'][-1]['epoch'] + 1} epochs "
        f"({r['train_seconds']:.0f} s; final train RMSE {r['train_rmse']:.4f} rad). GLean plans "
        f"({r['plan_seconds']:.0f} s for all goals) executed through `PVRNNPolicy` (plan -> PD) in `make_env` "
        "(one env per goal, the steps recorded into a second buffer, the final states read from it) "
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
    parser.add_argument("--recon-weight", type=float, default=10.0,
                        help="Setting A: reconstruction weight against the KL (10: GLean's softmax-code balance)")
    parser.add_argument("--glean-data", type=Path, default=None,
                        help="Setting A: GLean's data/branching_path folder (oist-cnru/GLean), not synthesised paths")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="Setting A training seeds (Table 5 per seed; the other tables from the first)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="Setting A: save trained agents here, and load them instead of training when present")
    parser.add_argument("--plan-iters", type=int, default=300)
    parser.add_argument("--plan-runs", type=int, default=2)
    parser.add_argument("--er-window", type=int, default=10)
    parser.add_argument("--er-iters", type=int, default=50)
    parser.add_argument("--er-windows-extra", type=int, nargs="*", default=[30],
                        help="Setting A: further ER windows for the one-step prediction check")
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
