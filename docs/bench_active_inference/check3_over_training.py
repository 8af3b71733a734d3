"""Check 3 read along training: goal-reaching success and mean final distance against the updates (issue 14)

    python docs/bench_active_inference/check3_over_training.py --figure check3_over_training.png \
        --point "seed 1:2700=goal_motion_2700.json" --point "seed 1:13510=check3_h5_still_13510.json" ...

Each ``--point LABEL:UPDATES=FILE`` is one reading of one model: ``FILE`` is a record of the benchmark (its
``results.json``, read from ``check3``) or of ``goal_motion.py`` (read from ``goal_reaching``; its ``still`` run is
check 3's agent). Points sharing a label are one training run, drawn as one line; the random and zero-action
policies' readings are drawn as the band check 3 is judged against (the bar: the better of the two + 0.20).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_active_inference import CHECK3_MARGIN  # noqa: E402


def parse_point(text: str) -> tuple[str, int, Path]:
    """``LABEL:UPDATES=FILE`` -> (label, updates, file)."""
    head, sep, file = text.partition("=")
    label, colon, updates = head.rpartition(":")
    if not (sep and colon and label and file) or not updates.isdigit():
        raise SystemExit(f"--point {text!r}: expected LABEL:UPDATES=FILE (e.g. 'seed 1:13510=results.json')")
    return label, int(updates), Path(file)


def reading(path: Path) -> dict[str, dict]:
    """A record's check 3 policies, ``{"agent": {"success", "mean_distance"}, "random": ..., "zero": ...}``."""
    if not path.is_file():
        raise SystemExit(f"--point: no file {path}")
    record = json.loads(path.read_text())
    if "check3" in record:
        runs = record["check3"]
        agent = runs["agent"]
    elif "goal_reaching" in record:
        runs = record["goal_reaching"]
        agent = runs["still"]  # the spec's goal: goal_motion.py's still run is check 3's agent row
    else:
        raise SystemExit(f"{path}: neither a benchmark record (check3) nor a goal_motion.py record (goal_reaching)")
    return {"agent": agent, "random": runs["random"], "zero": runs["zero"]}


def collect(points: list[str]) -> dict[str, list[tuple[int, dict]]]:
    """Readings grouped by label, each label's sorted by updates."""
    runs: dict[str, list[tuple[int, dict]]] = {}
    for text in points:
        label, updates, path = parse_point(text)
        runs.setdefault(label, []).append((updates, reading(path)))
    return {label: sorted(r, key=lambda p: p[0]) for label, r in runs.items()}


def draw(runs: dict[str, list[tuple[int, dict]]], out: Path, xlabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = [r[name] for points in runs.values() for _, r in points for name in ("random", "zero")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "success", "success (final distance < 0.05)"),
                           (axes[1], "mean_distance", "mean final distance")):
        low, high = min(b[key] for b in baselines), max(b[key] for b in baselines)
        ax.axhspan(low, high, color="0.85", label="random / zero actions")
        if key == "success":
            ax.axhline(high + CHECK3_MARGIN, color="0.4", ls="--", lw=1,
                       label=f"bar: best baseline + {CHECK3_MARGIN:.2f}")
        for label, points in runs.items():
            ax.plot([u for u, _ in points], [r["agent"][key] for _, r in points], "o-", label=label)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Check 3 on point_mass along training: 50 goal images, 50 steps, H = 5", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--figure", required=True, type=Path, help="the PNG to write")
    p.add_argument("--point", action="append", required=True, help="LABEL:UPDATES=FILE (repeatable)")
    p.add_argument("--xlabel", default="updates", help="what UPDATES counts")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    runs = collect(args.point)
    draw(runs, args.figure, args.xlabel)
    for label, points in runs.items():
        print(label + ": " + ", ".join(f"{u}: {r['agent']['success']:.2f} / {r['agent']['mean_distance']:.3f}"
                                       for u, r in points))
    return runs


if __name__ == "__main__":
    main()
