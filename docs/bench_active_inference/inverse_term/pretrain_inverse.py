"""Train a fresh active inference model's encoder on the inverse-dynamics task alone, before the free energy.

    python docs/bench_active_inference/inverse_term/pretrain_inverse.py --data BUFFERS_DIR --inverse-weight W \
        --updates 3000 --save-model pre.pt --record pre.json
    python scripts/bench_active_inference.py ... --set inverse_weight=W --load-model pre.pt --resume --save-model m.pt

The encoder, the posterior head and the inverse head are trained on the head's error alone (the model's
``inverse_error``: a_t read from the belief means (mu_t, mu_{t+1})), with the agent's own Adam and gradient clip;
the transition, the decoder and the reward head are left untouched. The result is a ``--save-model`` file with an
empty training record, so ``bench_active_inference.py --resume`` trains it on the free energy (plus the inverse
term at ``W``) from update 0 with the Adam state continued. ``--record`` gets the error curves: the training
batches' mean per log window and the error on a fixed held-out set, against the mean action's error.

Used for docs/bench_active_inference.md, "The encoder trained on the inverse task first".
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latentrl.replay.buffer import ReplayBuffer

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402


def plot(pretrained: list[str], joint: list[str], path: str) -> dict:
    """The inverse head's error over updates, over its mean-action value: left, each ``LABEL=JSON`` record of this
    script (held out); right, each ``LABEL=JSON`` training record of the bench (a ``--save-model`` file's
    ``train``, or a results.json holding one) trained with the term. Returns the curves drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    drawn: dict[str, dict] = {"pretrained": {}, "joint": {}}
    for item in pretrained:
        label, file = item.split("=", 1)
        rec = json.loads(Path(file).read_text())
        ratio = [h / rec["mean_action_heldout"] for h in rec["heldout"]]
        drawn["pretrained"][label] = list(zip(rec["updates"], ratio, strict=True))
        left.plot(rec["updates"], ratio, label=label)
    for item in joint:
        label, file = item.split("=", 1)
        rec = (torch.load(file, weights_only=False, map_location="cpu") if file.endswith(".pt")
               else json.loads(Path(file).read_text()))["train"]
        # the bench logs the term beside the free energy (the last len(inverse) logs: a record may have begun
        # without it); the training batches' mean action is not kept, so the ratio is to uniform actions' 2/3
        steps = rec["free_energy_steps"][-len(rec["inverse"]):]
        ratio = [v / MEAN_ACTION_ERROR for v in rec["inverse"]]
        drawn["joint"][label] = list(zip(steps, ratio, strict=True))
        # each log is one batch's error: drawn as the running mean of SMOOTH logs
        n = min(SMOOTH, len(ratio))
        right.plot(steps[n - 1:], np.convolve(ratio, np.ones(n) / n, mode="valid"), label=label)
    for ax, title in ((left, "inverse task alone (held out)"),
                      (right, f"with the free energy (training batches, mean of {SMOOTH} logs)")):
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="mean action")
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.legend(fontsize=8)
    left.set_ylabel("inverse error / mean action's error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


SMOOTH = 20
MEAN_ACTION_ERROR = 2 / 3  # the mean action's error for uniform random actions in [-1, 1]^2 (2 x 1/3)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--figure", help="draw --pretrained / --joint records into this PNG instead of training")
    p.add_argument("--pretrained", nargs="*", default=[], metavar="LABEL=JSON", help="with --figure: --record files")
    p.add_argument("--joint", nargs="*", default=[], metavar="LABEL=FILE",
                   help="with --figure: bench --save-model files (or their results.json) trained with the term")
    p.add_argument("--data", help="the benchmark's buffers (a folder holding train/ and heldout/)")
    p.add_argument("--inverse-weight", type=float,
                   help="the inverse_weight the model will be trained on with (> 0; the head exists only then)")
    p.add_argument("--preset", default="small", help="the model's preset, as the bench's --preset (default small)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the model's other settings, as the bench's --set (repeatable; must match the bench run)")
    p.add_argument("--updates", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=float("inf"), help="stop after this long as well")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--heldout", type=int, default=1024, help="held-out transitions in the fixed reading set")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-model", help="the model file to write (bench --load-model ... --resume)")
    p.add_argument("--record", help="a JSON file for the error curves")
    args = p.parse_args(argv)
    if args.figure:
        return plot(args.pretrained, args.joint, args.figure)
    if args.data is None or args.save_model is None or args.record is None:
        p.error("training needs --data, --save-model and --record")
    if not (args.inverse_weight or 0) > 0:
        p.error("--inverse-weight must be > 0 (the model has no inverse head otherwise)")
    for path in (args.save_model, args.record):
        if Path(path).exists():
            p.error(f"{path} exists; nothing was written (give a new path)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    settings = [x for kv in [*args.overrides, f"inverse_weight={args.inverse_weight}"] for x in ("--set", kv)]
    agent = bench.build_agent(bench.parse_args(["--preset", args.preset, *settings]))
    model, adam = agent.world_model, agent.optimizers()["model"]
    train_buf = ReplayBuffer.load(Path(args.data) / "train")
    heldout_buf = ReplayBuffer.load(Path(args.data) / "heldout")
    kwargs = agent.sample_spec().sample_kwargs()
    heldout = heldout_buf.sample(**{**kwargs, "batch_size": args.heldout})
    actions = heldout["action"].float()
    mean_action_error = float((actions - actions.mean(0)).pow(2).sum(-1).mean())
    curve = {"updates": [], "train": [], "heldout": [], "mean_action_heldout": mean_action_error}
    window, start = [], time.perf_counter()
    for update in range(1, args.updates + 1):
        error = model.inverse_error(train_buf.sample(**kwargs))
        adam.zero_grad(set_to_none=True)
        error.backward()
        adam.step()  # clipped at the config's max_grad_norm, as in agent.update
        window.append(float(error.detach()))
        out_of_time = time.perf_counter() - start > args.seconds  # the last (partial) window is logged too
        if update % args.log_every == 0 or update == args.updates or out_of_time:
            with torch.no_grad():
                held = float(model.inverse_error(heldout))
            curve["updates"].append(update)
            curve["train"].append(sum(window) / len(window))
            curve["heldout"].append(held)
            window = []
            print(f"[pretrain_inverse] update {update}: train {curve['train'][-1]:.3f}, held out {held:.3f} "
                  f"(mean action {mean_action_error:.3f}), {time.perf_counter() - start:.0f} s", flush=True)
        if out_of_time:
            break
    curve["seconds"] = time.perf_counter() - start
    bench.save_model_file(agent, {}, args.save_model)
    Path(args.record).write_text(json.dumps({"args": vars(args), **curve}, indent=1))


if __name__ == "__main__":
    main()
