#!/usr/bin/env python
"""Small-scale zero-shot benchmark: an RND dataset, then TD-JEPA vs FB vs a random policy.

    python scripts/bench_zero_shot.py --domain walker --dataset-steps 100000 --updates 20000 --seeds 0 1 2 --jobs 2
    python scripts/bench_zero_shot.py --obs pixels --dataset-steps 30000 --updates 4000 --eval-points 2 --episodes 3

``--obs pixels`` is the paper's RGB setting at CPU scale: the same RND collection (RND explores from
states) also records 64x64 frames, the agents train from 3-frame stacks (``small`` preset with the
pixel shrink of spec §10: DrQ trunk 32 channels, batch 64), the policies act from rendered frames,
and the page (default ``docs/bench_zero_shot_pixels.md``) sets the paper's RGB Table 1 beside ours.

1. ``collect_dataset.py agent=rnd`` writes a reward-free dataset (states + physics) of
   ``--dataset-steps`` transitions (1000-step episodes), RND making ``--collect-updates-per-step``
   updates per env step (and 64x64 frames with ``--obs pixels``).
2. ``train_agent.py agent=td_jepa|fb data=<dataset>`` trains each agent offline (``small`` preset,
   from ``--obs``) for ``--updates`` updates per seed, keeping ``--eval-points`` evenly spaced checkpoints;
   ``--jobs`` runs train in parallel processes (one torch thread each).
3. For every kept checkpoint the zero-shot harness relabels ``--samples`` transitions per task,
   infers the task and rolls out ``--episodes`` 1000-step episodes; a uniform random policy is
   evaluated on the same tasks.
4. For every kept checkpoint the agent's representation loss (TD-JEPA's ``phi_loss``, FB's ``fb_loss``)
   is measured, without updating, on the training data and on ``--heldout-steps`` transitions of a
   second, shorter RND run (another seed) that no agent trains on: the gap says whether a
   representation overfits its dataset.

Writes a markdown report (per-task mean +- s.e. over seeds at the last checkpoint, the domain average
along training, the paper's Table 1 proprio figures beside them for scale) to ``--out``, a plot of
the domain average against updates beside it (``.png``), and the raw numbers to
``<workdir>/results.json``. Finished runs and evaluations are reused, so an interrupted benchmark
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

from latentrl.agents.base import UniformRandomPolicy
from latentrl.envs import make_env
from latentrl.envs.tasks import resolve_task_list
from latentrl.replay import ReplayBuffer
from latentrl.training.checkpoint import load_agent
from latentrl.training.evaluation import rollout
from latentrl.training.logger import machine_description, write_report_page
from latentrl.training.zero_shot import evaluate_reward_tasks, representation_losses

ROOT = Path(__file__).resolve().parents[1]
# TD-JEPA paper, Table 1 (DMC proprio, mean +- s.e.; 5,000 RND episodes, 2M updates), for scale.
PAPER_PROPRIO = {"walker": {"fb": "811.5 +- 5.9", "td_jepa": "785.2 +- 6.7"},
                 "point_mass_maze": {"fb": "513.0", "td_jepa": "479.3"}}
# The same table's DMC RGB half (64x64 frames, frame stack 3; 5,000 RND episodes rendered, 2M updates).
PAPER_RGB = {"walker": {"fb": "324.4 +- 16.6", "td_jepa": "738.9 +- 3.5"},
             "cheetah": {"fb": "622.4 +- 23.1", "td_jepa": "706.0 +- 4.1"},
             "quadruped": {"fb": "475.4 +- 16.7", "td_jepa": "626.7 +- 13.6"},
             "point_mass_maze": {"fb": "402.8 +- 16.8", "td_jepa": "443.7 +- 10.9"}}
# The representation loss reported train vs held-out (the predictive term; ``loss`` adds the regularisers).
MAIN_LOSS = {"td_jepa": "phi_loss", "fb": "fb_loss"}
HELDOUT_SEED_OFFSET = 10_000  # the held-out RND run's seed: --dataset-seed + this (never another dataset's)
QUIET = ["log.progress=false", "log.tensorboard=false", "eval.every=0", "eval.at_end=false", "eval.video=false"]


def env_obs(obs: str) -> str:
    """The env's observation keys for ``--obs``: physics always (the harness relabels rewards from it)."""
    return "env.obs=[pixels,state,physics]" if obs == "pixels" else "env.obs=[state,physics]"


def collect_task(domain: str) -> str:
    return "point_mass_maze-reach_top_left" if domain == "point_mass_maze" else f"{domain}-walk"


def reuse_problems(work: Path, jobs: list[dict], args) -> list[str]:
    """What in ``work`` was made with other settings than this invocation asks for.

    The benchmark reuses its dataset and runs by folder name; a shared ``--workdir`` given to a state and a pixel
    benchmark (or to two domains) would otherwise train pixel agents from state data or report one setting's runs
    under the other's name.
    """
    problems = []
    datasets = [("data", args.dataset_steps, "--dataset-steps")]
    if getattr(args, "heldout_steps", 0):
        datasets.append(("heldout", args.heldout_steps, "--heldout-steps"))
    for folder, steps, flag in datasets:
        meta = work / folder / "replay.json"
        if not meta.exists():
            continue
        head = json.loads(meta.read_text())
        keys = set(head["schema"]["obs"])
        need = {"pixels", "physics"} if args.obs == "pixels" else {"state", "physics"}
        if not need <= keys:
            problems.append(f"{meta.parent} holds {sorted(keys)}; --obs {args.obs} needs {sorted(need)}")
        if head.get("domain") not in (None, args.domain):
            problems.append(f"{meta.parent} was collected on {head['domain']}, not --domain {args.domain}")
        if head["num_transitions"] != steps:
            problems.append(f"{meta.parent} holds {head['num_transitions']} transitions, {flag} asks {steps}")
    for job in jobs:
        config = Path(job["run"]) / "config.yaml"
        if not config.exists():
            continue
        cfg = yaml.safe_load(config.read_text())
        have = {"agent": cfg["agent"]["name"], "obs": (cfg["agent"].get("overrides") or {}).get("obs_type"),
                "seed": cfg["seed"], "data": str(Path(cfg["data"]).resolve()) if cfg.get("data") else None}
        want = {"agent": job["agent"], "obs": job["obs"], "seed": job["seed"], "data": str(Path(job["data"]).resolve())}
        diff = [f"{k} {have[k]} (asked: {want[k]})" for k in want if have[k] != want[k]]
        if diff:
            problems.append(f"{config.parent} was trained with " + ", ".join(diff))
    return problems


def train_and_evaluate(job: dict) -> dict:
    """One (agent, seed): train offline in a child process (kept checkpoints), evaluate each checkpoint.

    Runs in a worker process; evaluations already on disk (``zero_shot.json``) are reused.
    """
    torch.set_num_threads(1)

    run = Path(job["run"])
    points = job["points"]
    cache = run / "zero_shot.json"
    done = json.loads(cache.read_text()) if cache.exists() else {"scores": {}, "train_seconds": None}
    ckpts = {u: run / "checkpoints" / f"{u:09d}.pt" for u in points}
    if not all(p.exists() for p in ckpts.values()):
        started = time.time()
        cmd = [sys.executable, str(ROOT / "scripts" / "train_agent.py"), f"agent={job['agent']}", "agent.preset=small",
               f"agent.obs_type={job['obs']}", f"data={job['data']}", f"env={collect_task(job['domain'])}",
               env_obs(job["obs"]), f"steps={points[-1]}", f"seed={job['seed']}", "threads=1",
               f"checkpoint_every={points[0]}", "keep_checkpoints=true", f"run_dir={run}", *QUIET]
        # train_agent.py continues a run only from its checkpoint (resume=true), starts a new one only in a
        # missing or empty folder, and replaces a run that stopped before its first checkpoint only with
        # overwrite=true; so the log lives beside the run folder, not in it
        if (run / "checkpoints" / "latest.pt").exists():
            cmd.append("resume=true")
        elif run.is_dir() and any(run.iterdir()):
            cmd.append("overwrite=true")
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(run.parent / f"{run.name}.train.log", "a") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        # a run extended by a later invocation (a larger --updates) adds its time to the earlier one's
        done["train_seconds"] = (done.get("train_seconds") or 0.0) + time.time() - started
    buffer = ReplayBuffer.load(job["data"])
    heldout = ReplayBuffer.load(job["heldout"]) if job.get("heldout") else None
    tasks = resolve_task_list(f"{job['domain']}/all")
    for updates, path in ckpts.items():
        need_scores = str(updates) not in done["scores"]
        need_losses = heldout is not None and str(updates) not in done.get("losses", {})
        if not (need_scores or need_losses):
            continue
        agent, cfg = load_agent(path)  # its env settings are the evaluation's, as in eval_zero_shot.py
        if need_losses:
            done.setdefault("losses", {})[str(updates)] = checkpoint_losses(agent, buffer, heldout, job)
            cache.write_text(json.dumps(done, indent=2))
        if need_scores:
            torch.manual_seed(job["seed"])
            results = evaluate_reward_tasks(agent, buffer, tasks, cfg["env"], num_samples=job["samples"],
                                            episodes=job["episodes"], seed=job["seed"], progress=lambda *_: None)
            done["scores"][str(updates)] = {r.task: r.mean for r in results}
            done.setdefault("reward_r2", {})[str(updates)] = {r.task: r.reward_r2 for r in results}
            cache.write_text(json.dumps(done, indent=2))
        avg = np.mean(list(done["scores"][str(updates)].values()))
        print(f"[bench] {job['agent']} seed {job['seed']} at {updates} updates: {job['domain']} average {avg:.1f}",
              flush=True)
    return {**job, **done}


def checkpoint_losses(agent, buffer, heldout, job: dict) -> dict[str, dict[str, float]]:
    """The agent's loss terms on the training data and on the held-out run, the same draws' seed for both."""
    return {name: representation_losses(agent, data, batches=job["loss_batches"], seed=job["seed"])
            for name, data in (("train", buffer), ("heldout", heldout))}


def random_scores(domain: str, seeds: list[int], episodes: int) -> dict[str, list[float]]:

    out: dict[str, list[float]] = {}
    for seed in seeds:
        for task in resolve_task_list(f"{domain}/all"):
            env = make_env(task, obs=("state", "physics"), num_envs=episodes, seed=seed, num_workers=0)
            policy = UniformRandomPolicy(env.action_spec.shape[-1], torch.Generator().manual_seed(seed))
            result = rollout(env, policy, episodes)
            env.close()
            out.setdefault(task, []).append(float(np.mean(result.returns)))
    return out


def mean_se(values, mean_format: str = ".1f", se_format: str = ".1f") -> str:
    values = np.asarray(values, dtype=float)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{values.mean():{mean_format}} +- {se:{se_format}}"


# The README's first command: reward-free data, two agents and a zero-shot table on 8 tasks in ~5 minutes on 2 cores
# (2026-12-06: TD-JEPA 76, FB 54, random 6 on seed 0; 40, 64, 0.2 on seed 1). Flags given beside it win.
FIRST_LOOK = {"domain": "point_mass_maze", "dataset_steps": 10000, "updates": 2000, "eval_points": 1, "episodes": 1,
              "seeds": [0], "workdir": "runs/first_look", "out": "runs/first_look/zero_shot.md"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first-look", action="store_true",
                        help="a few minutes' version for a first look (the README's first command): "
                             + ", ".join(f"--{k.replace('_', '-')} {v[0] if isinstance(v, list) else v}"
                                         for k, v in FIRST_LOOK.items())
                             + "; flags given beside it win")
    parser.add_argument("--domain", default="walker", choices=["walker", "point_mass_maze", "cheetah", "quadruped"])
    parser.add_argument("--dataset-steps", type=int, default=100000)
    parser.add_argument("--dataset-seed", type=int, default=0,
                        help="seed of the RND collection run (another seed: another dataset of the same size)")
    parser.add_argument("--collect-updates-per-step", type=float, default=0.25,
                        help="RND updates per env step while collecting (URLB: 0.5)")
    parser.add_argument("--updates", type=int, default=20000)
    parser.add_argument("--eval-points", type=int, default=4, help="evenly spaced checkpoints evaluated per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--agents", nargs="+", default=["td_jepa", "fb"])
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained and evaluated in parallel")
    parser.add_argument("--obs", default="state", choices=["state", "pixels"],
                        help="what the agents read: the physics state (proprio) or 64x64 frames (RGB)")
    parser.add_argument("--heldout-steps", type=int, default=None,
                        help="transitions of the held-out RND run (another seed) on which each checkpoint's "
                             "representation loss is measured beside the training data's (default: a tenth of "
                             "--dataset-steps, at least 2 episodes; 0: off)")
    parser.add_argument("--loss-batches", type=int, default=16,
                        help="replay batches (the agent's batch size) per loss measurement")
    parser.add_argument("--workdir", default=None, help="default runs/bench_zero_shot[_pixels]")
    parser.add_argument("--out", default=None, help="default docs/bench_zero_shot[_pixels].md")
    first_look = argparse.ArgumentParser(add_help=False)  # read first, as argparse reads it (--first too)
    first_look.add_argument("--first-look", action="store_true")
    if first_look.parse_known_args(argv)[0].first_look:
        parser.set_defaults(**FIRST_LOOK)
    args = parser.parse_args(argv)
    suffix = "_pixels" if args.obs == "pixels" else ""
    args.workdir = args.workdir or f"runs/bench_zero_shot{suffix}"
    args.out = args.out or f"docs/bench_zero_shot{suffix}.md"
    if args.updates % args.eval_points:
        parser.error(f"--updates ({args.updates}) must be a multiple of --eval-points ({args.eval_points})")
    if args.heldout_steps is None:
        args.heldout_steps = max(2000, args.dataset_steps // 10 // 1000 * 1000)
    if args.heldout_steps < 0 or args.loss_batches < 1:
        parser.error("--heldout-steps must be >= 0 and --loss-batches >= 1")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    started = time.time()
    work = Path(args.workdir)
    data = work / "data"
    heldout = work / "heldout" if args.heldout_steps else None
    points = [args.updates // args.eval_points * (i + 1) for i in range(args.eval_points)]
    jobs = [{"agent": a, "seed": s, "run": str(work / f"{a}-s{s}"), "data": str(data), "domain": args.domain,
             "obs": args.obs, "points": points, "samples": args.samples, "episodes": args.episodes,
             "heldout": str(heldout) if heldout else None, "loss_batches": args.loss_batches}
            for s in args.seeds for a in args.agents]
    problems = reuse_problems(work, jobs, args)
    if problems:
        sys.exit("bench_zero_shot: --workdir " + str(work) + " holds results of other settings; nothing was "
                 "changed. Give another --workdir (or the settings it was made with):\n  " + "\n  ".join(problems))
    collections = [(data, args.dataset_steps, args.dataset_seed, "collect")]
    if heldout:
        collections.append((heldout, args.heldout_steps, args.dataset_seed + HELDOUT_SEED_OFFSET, "collect_heldout"))
    for out, steps, seed, run_name in collections:
        if (out / "replay.json").exists():
            continue
        print(f"[bench] collecting {steps} RND steps of {collect_task(args.domain)} (seed {seed}) -> {out}",
              flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_dataset.py"), "agent=rnd",
                        f"env={collect_task(args.domain)}", "agent.preset=small", f"steps={steps}",
                        "learning_starts=1000", f"updates_per_step={args.collect_updates_per_step}", "threads=1",
                        env_obs(args.obs), f"seed={seed}", f"out={out}",
                        f"run_dir={work / run_name}", *QUIET], check=True)
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        random_future = pool.submit(random_scores, args.domain, args.seeds, args.episodes)
        results = list(pool.map(train_and_evaluate, jobs))
        random = random_future.result()

    buffer = ReplayBuffer.load(data)
    raw = {"random": random, "runs": results, "points": points}
    (work / "results.json").write_text(json.dumps(raw, indent=2))
    write_report(args, raw, time.time() - started, buffer)


def write_report(args, raw: dict, seconds: float, buffer) -> None:
    points, random = raw["points"], raw["random"]
    tasks = list(random)
    final = str(points[-1])
    scores = {"random": random}  # agent -> task -> [per seed], at the last checkpoint
    curves: dict[str, dict[int, list[float]]] = {}  # agent -> updates -> [domain average per seed]
    train_min: dict[str, list[float]] = {}
    for run in raw["runs"]:
        for task in tasks:
            scores.setdefault(run["agent"], {}).setdefault(task, []).append(run["scores"][final][task])
        for u in points:
            curves.setdefault(run["agent"], {}).setdefault(u, []).append(
                float(np.mean([run["scores"][str(u)][t] for t in tasks])))
        if run["train_seconds"]:
            train_min.setdefault(run["agent"], []).append(run["train_seconds"] / 60)
    names = ["random", *args.agents]
    random_avg = [float(np.mean([random[t][i] for t in tasks])) for i in range(len(args.seeds))]
    averages = {"random": random_avg, **{a: curves[a][points[-1]] for a in args.agents}}
    machine = f"{machine_description()}; 1 torch thread per run"
    lines = [
        f"# Zero-shot benchmark: {args.domain}{' from pixels' if args.obs == 'pixels' else ''}, TD-JEPA vs FB vs "
        "random (small scale, CPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {machine}",
        f"- command: `python {' '.join(sys.argv)}` (this invocation took {seconds / 60:.0f} min; finished runs "
        "are reused)",
        f"- data: RND (`small` preset, {args.collect_updates_per_step} updates per env step) on "
        f"{collect_task(args.domain)}, {len(buffer)} transitions in {buffer.num_episodes} episodes, "
        f"{'64x64 frames + ' if args.obs == 'pixels' else ''}states + physics, reward-free",
        f"- training: `small` presets from {'3-frame stacks of 64x64 pixels' if args.obs == 'pixels' else 'states'}, "
        f"{points[-1]} updates per run, seeds {args.seeds}, "
        f"{args.jobs} runs in parallel; train time per run: "
        + ", ".join(f"{k} {np.mean(v):.1f} min" for k, v in train_min.items()),
        f"- evaluation: {args.samples} relabelled samples per task, lstsq (TD-JEPA) / sum r B (FB) task inference, "
        f"{args.episodes} deterministic 1000-step episodes per task and seed; mean +- s.e. over seeds",
        "",
        f"Returns after {points[-1]} updates:",
        "",
        "| task | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(mean_se(scores[n][task]) for n in names) + " |")
    lines.append(f"| **{args.domain} average** | " + " | ".join(f"**{mean_se(averages[n])}**" for n in names) + " |")
    paper = (PAPER_RGB if args.obs == "pixels" else PAPER_PROPRIO).get(args.domain, {})
    if paper:
        lines.append(f"| paper Table 1 ({'RGB' if args.obs == 'pixels' else 'proprio'}, 2M updates, 5k episodes) | - | "
                     + " | ".join(paper.get(n, "-") for n in args.agents) + " |")
    lines += ["", "Held-out R^2 of each task's relabelled reward on the agent's task features (TD-JEPA: psi(s'), "
              f"FB: B(s'); fit on {args.samples // 2} samples, scored on the other {args.samples - args.samples // 2}; "
              "spec §12.5 wants > 0), mean over seeds:",
              "", "| task | " + " | ".join(args.agents) + " |", "|---|" + "---:|" * len(args.agents)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(
            f"{np.mean([r['reward_r2'][final][task] for r in raw['runs'] if r['agent'] == a]):.2f}"
            for a in args.agents) + " |")
    lines += loss_table(args, raw)
    lines += ["", f"{args.domain} average along training (random: {mean_se(random_avg)}):", "",
              "| updates | " + " | ".join(args.agents) + " |", "|---:|" + "---:|" * len(args.agents)]
    for u in points:
        lines.append(f"| {u} | " + " | ".join(mean_se(curves[a][u]) for a in args.agents) + " |")
    seeds = {a: [r["seed"] for r in raw["runs"] if r["agent"] == a] for a in args.agents}
    columns = [f"{a} s{seed}" for a in args.agents for seed in seeds[a]]
    lines += ["", f"{args.domain} average per seed (random per seed: "
              + ", ".join(f"{v:.1f}" for v in random_avg) + "):", "",
              "| updates | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    for u in points:
        lines.append(f"| {u} | " + " | ".join(f"{v:.1f}" for a in args.agents for v in curves[a][u]) + " |")
    plot = Path(args.out).with_suffix(".png")
    plot_curves(plot, args, points, curves, random_avg)
    lines += ["", f"![{args.domain} average against updates]({plot.name})", ""]
    write_report_page(args.out, "\n".join(lines))  # keeps the page's hand-written reading
    print("\n".join(lines))
    print(f"[bench] zero-shot table: {args.out}; plot: {plot}")


def loss_table(args, raw: dict) -> list[str]:
    """Each agent's representation loss (``MAIN_LOSS``) on the training data and on the held-out run, at every
    checkpoint, mean +- s.e. over seeds, with held-out / train per seed averaged; [] when none was measured."""
    runs = [r for r in raw["runs"] if r.get("losses")]
    if not runs:
        return []
    agents = [a for a in args.agents if any(r["agent"] == a for r in runs)]
    heldout = getattr(args, "heldout_steps", None)
    lines = ["", "Representation loss on the training data and on a held-out RND run"
             + (f" ({heldout} transitions, another seed, never trained on)" if heldout else "")
             + ", measured at each checkpoint without updating (" + ", ".join(
                 f"{a}: `{MAIN_LOSS.get(a, 'loss')}`" for a in agents)
             + "; same draws on both; mean +- s.e. over seeds; ratio: held-out / train, mean of the seeds' ratios):",
             "", "| updates | " + " | ".join(f"{a} train | {a} held-out | {a} ratio" for a in agents) + " |",
             "|---:|" + "---:|" * (3 * len(agents))]
    for u in raw["points"]:
        cells = []
        for a in agents:
            key = MAIN_LOSS.get(a, "loss")
            pairs = [(r["losses"][str(u)]["train"][key], r["losses"][str(u)]["heldout"][key])
                     for r in runs if r["agent"] == a and str(u) in r["losses"]]
            if not pairs:
                cells += ["-"] * 3
                continue
            train, held = np.array(pairs, dtype=float).T
            # three significant digits: losses span orders of magnitude
            cells += [mean_se(train, ".3g", ".2g"), mean_se(held, ".3g", ".2g"), f"{np.mean(held / train):.2f}"]
        lines.append(f"| {u} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(path: Path, args, points: list[int], curves: dict, random_avg: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for agent, curve in curves.items():
        values = np.array([curve[u] for u in points])  # [points, seeds]
        mean = values.mean(1)
        se = values.std(1, ddof=1) / np.sqrt(values.shape[1]) if values.shape[1] > 1 else 0 * mean
        ax.plot(points, mean, "o-", label=agent)
        ax.fill_between(points, mean - se, mean + se, alpha=0.2)
    ax.axhline(float(np.mean(random_avg)), color="gray", ls="--", label="uniform random")
    ax.set_xlabel("offline updates")
    ax.set_ylabel(f"{args.domain} average return")
    source = "from pixels, " if args.obs == "pixels" else ""
    ax.set_title(f"zero-shot {args.domain} (4 tasks), {source}{len(args.seeds)} seeds, mean +- s.e.", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
