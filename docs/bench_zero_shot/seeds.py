"""Per-seed table and plot of several ``scripts/bench_zero_shot.py`` results files (one per dataset).

    python docs/bench_zero_shot/seeds.py "dataset 0=runs/d0/results.json" "dataset 1=runs/d1/results.json" \
        --out docs/bench_zero_shot/seeds.png

Each argument is ``label=results.json``; several files may share a label (another set of seeds of the same
dataset): their runs are merged, and a seed run twice must give the same scores (checked: it shows whether the
benchmark reproduces). Prints a markdown table per dataset (per seed and task, the walker average, mean +- s.e.
over seeds, TD-JEPA minus FB per seed) and writes a dot plot of the per-seed walker averages.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

TASKS = ["walker-stand", "walker-walk", "walker-run", "walker-spin"]
NAMES = {"td_jepa": "TD-JEPA", "fb": "FB"}


def load(items: list[str]) -> dict[str, dict]:
    """label -> {"runs": {(agent, seed): scores}, "random": {task: [per seed]}}."""
    out: dict[str, dict] = defaultdict(lambda: {"runs": {}, "random": defaultdict(dict)})
    for item in items:
        label, _, path = item.rpartition("=")
        raw = json.loads(Path(path).read_text())
        last = str(raw["points"][-1])
        entry = out[label]
        for run in raw["runs"]:
            key = (run["agent"], run["seed"])
            scores = run["scores"][last]
            if key in entry["runs"]:
                before = entry["runs"][key]
                if any(abs(before[t] - scores[t]) > 1e-6 for t in TASKS):
                    raise SystemExit(f"{label}: {key} scored {before} in one file and {scores} in another")
                entry["reproduced"] = [*entry.get("reproduced", []), key]
            entry["runs"][key] = scores
        seeds = list(dict.fromkeys(run["seed"] for run in raw["runs"]))  # the order random_scores ran them
        for task, values in raw["random"].items():
            for seed, value in zip(seeds, values, strict=True):
                entry["random"][task][seed] = value
    return {label: {**e, "random": {t: list(v.values()) for t, v in e["random"].items()}} for label, e in out.items()}


def walker_average(scores: dict[str, float]) -> float:
    return float(np.mean([scores[t] for t in TASKS]))


def mean_se(values) -> str:
    v = np.asarray(values, dtype=float)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return f"{v.mean():.1f} +- {se:.1f}"


def table(label: str, entry: dict) -> str:
    runs = entry["runs"]
    lines = [f"**{label}**", "", "| agent | seed | stand | walk | run | spin | walker average |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for agent in NAMES:
        seeds = sorted(s for a, s in runs if a == agent)
        for s in seeds:
            sc = runs[(agent, s)]
            lines.append(f"| {NAMES[agent]} | {s} | " + " | ".join(f"{sc[t]:.1f}" for t in TASKS)
                         + f" | {walker_average(sc):.1f} |")
        lines.append(f"| **{NAMES[agent]}** | mean +- s.e. ({len(seeds)}) | "
                     + " | ".join(mean_se([runs[(agent, s)][t] for s in seeds]) for t in TASKS)
                     + f" | **{mean_se([walker_average(runs[(agent, s)]) for s in seeds])}** |")
    rnd = entry["random"]
    lines.append(f"| random | mean ({len(rnd[TASKS[0]])} seeds) | "
                 + " | ".join(f"{np.mean(rnd[t]):.1f}" for t in TASKS)
                 + f" | {np.mean([np.mean(rnd[t]) for t in TASKS]):.1f} |")
    both = sorted({s for a, s in runs if a == "td_jepa"} & {s for a, s in runs if a == "fb"})
    diffs = [walker_average(runs[("td_jepa", s)]) - walker_average(runs[("fb", s)]) for s in both]
    lines += ["", f"TD-JEPA minus FB, walker average, per seed {both}: " + ", ".join(f"{d:+.1f}" for d in diffs)
              + f" (ahead on {sum(d > 0 for d in diffs)} of {len(diffs)})"]
    if entry.get("reproduced"):
        lines.append(f"Run twice with identical scores: {sorted(set(entry['reproduced']))}")
    return "\n".join(lines)


def plot(data: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.6 + 2.2 * len(data), 3.4))
    colors = {"td_jepa": "tab:blue", "fb": "tab:orange"}
    for i, entry in enumerate(data.values()):
        for j, agent in enumerate(NAMES):
            vals = [walker_average(sc) for (a, _), sc in sorted(entry["runs"].items()) if a == agent]
            x = i + (j - 0.5) * 0.3
            ax.scatter(np.full(len(vals), x) + np.linspace(-0.05, 0.05, len(vals)), vals, color=colors[agent],
                       s=18, label=NAMES[agent] if i == 0 else None, zorder=3)
            ax.hlines(np.mean(vals), x - 0.1, x + 0.1, color=colors[agent], lw=2)
        rnd = np.mean([np.mean(entry["random"][t]) for t in TASKS])
        ax.hlines(rnd, i - 0.35, i + 0.35, color="gray", ls="--", label="random" if i == 0 else None)
    ax.set_xticks(range(len(data)), list(data))
    ax.set_ylabel("walker average return (4 tasks)")
    ax.set_title("zero-shot walker, 10k updates: one dot per seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="label=results.json")
    parser.add_argument("--out", default="docs/bench_zero_shot/seeds.png")
    args = parser.parse_args()
    data = load(args.results)
    for label, entry in data.items():
        print(table(label, entry), end="\n\n")
    plot(data, Path(args.out))
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
