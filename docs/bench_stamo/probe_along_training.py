"""Does check 4 (a linear probe from the tokens to the arm's joints, R^2 > 0.8) improve as the autoencoder trains
on? ``bench_stamo.py eval``'s linear state probe (ridge on the flattened tokens to (sin, cos) of each joint, fit on
the training episodes, scored on the held-out ones) read from several checkpoints of one run on one dataset.

    python docs/bench_stamo/probe_along_training.py --out-dir /tmp/stamo --checkpoints /tmp/stamo/snap/u*.pt

``--out-dir`` is the dir of ``bench_stamo.py data`` (its ``episodes.pt``); each checkpoint is a copy of the
``stamo_wm.pt`` that ``bench_stamo.py train`` writes every 500 updates. Writes ``--json`` (default
``probe_along_training.json`` beside this file; the rows of other checkpoints already in it, from the same
``--out-dir``, are kept) and a plot beside it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_stamo as bs  # noqa: E402


def probe(agent, path: Path, ns: argparse.Namespace, data: dict, train_eps, test_eps) -> dict:
    spec = bs.TASKS[ns.task]
    flat = bs.encode_all(agent.world_model, data["pixels"]).flatten(2)
    _, r2s = bs.state_readouts(flat, spec.coords(data["physics"]), spec, train_eps, test_eps, None, seed=0)
    r2s = r2s["linear"]
    recent = [h[1] for h in agent.history[-500:]]
    return {"checkpoint": str(path), "updates": agent.trained_updates, "r2_mean": float(r2s.mean()),
            "r2_per_output": [float(v) for v in r2s], "outputs": spec.feature_names(),
            "flow_mse_last_500": sum(recent) / max(len(recent), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(HERE / "probe_along_training.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ns, data, train_eps, test_eps, first = bs.open_run(args.out_dir, args.checkpoints[0])
    rows = []
    for i, path in enumerate(args.checkpoints):
        t0 = time.time()
        agent = first if i == 0 else bs.load_model(ns, path)
        rows.append(probe(agent, Path(path), ns, data, train_eps, test_eps))
        bs.log(f"{path}: update {rows[-1]['updates']}, linear probe R^2 {rows[-1]['r2_mean']:.3f} "
               f"{[round(v, 3) for v in rows[-1]['r2_per_output']]} ({time.time() - t0:.0f} s)")
    # rows of earlier invocations with the same --json and data are kept (one checkpoint read at a time as a run
    # goes on), a checkpoint read again replaces its row
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else None
    if previous is not None and previous.get("out_dir") == args.out_dir:
        done = {r["updates"] for r in rows}
        rows += [r for r in previous["rows"] if r["updates"] not in done]
    rows.sort(key=lambda r: r["updates"])
    out = {"out_dir": args.out_dir, "task": ns.task, "episodes": int(data["pixels"].shape[0]),
           "train_episodes": len(train_eps), "test_episodes": len(test_eps), "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [r["updates"] for r in rows]
    ax.plot(x, [r["r2_mean"] for r in rows], "k-o", label="mean (check 4)")
    for i, name in enumerate(rows[0]["outputs"]):
        ax.plot(x, [r["r2_per_output"][i] for r in rows], "--", alpha=0.7, label=name)
    ax.axhline(0.8, color="r", lw=0.8, label="threshold 0.8")
    ax.set_xlabel("autoencoder updates")
    ax.set_ylabel("held-out R^2, linear probe")
    ax.set_title(f"{ns.task}: tokens -> joints ({len(train_eps)} training episodes)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(Path(args.json).with_suffix(".png"), dpi=90)
    bs.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
