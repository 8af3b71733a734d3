"""Can a network learned from the benchmark's data read a_t off (o_t, o_{t+1}) well enough for check 2? (issue 14)

    python docs/bench_active_inference/inverse_ceiling.py --data <buffers> [--updates N] [--seconds S] [--out F]

Check 2 asks that the true a_t rank in the best 20% of 1000 uniform random candidates in >= 80% of held-out cases,
with the goal set to o_{t+1}. Every world model on the page ranked it there in 26-39% of cases. This diagnostic asks
what the data allows a *learned* model, with none of the world model's constraints: an inverse-dynamics CNN trained
by supervised regression, on the very buffers the world model trains on (``--data``: the ``train/`` and ``heldout/``
folders of ``scripts/bench_active_inference.py``; point_mass-easy_visible, 64x64, frame stack 2, action repeat 4,
200 random episodes), to map the frames t-1, t, t+1 (o_t's stack of two and o_{t+1}'s last frame) to a_t.

Candidates are then ranked as check 2 ranks them, by how far each lies from what the frames say: here the squared
distance to the predicted action, ||a - a_hat||^2, so the true action is in the best 20% when about a fifth of the
square [-1, 1]^2 or less lies nearer to a_hat than it does (|a_t - a_hat| of about 0.5 in the middle of the square).
The same ranking from the simulator's state (a least-squares fit from the physics state at t and t+1 to a_t) shows
what the motion itself allows, without pixels.

Prints and writes (``--out``) the rank fraction and median rank on held-out cases (``--cases``; and ``spec_100``,
100 other held-out cases, the spec's count, not check 2's very draws), the held-out action MSE against the mean
action's, and the curve over training (``--eval-every`` updates), so a plateau below 0.8 can be told from a run cut
short.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402

from latentrl.replay import ReplayBuffer  # noqa: E402


def frames_and_actions(buffer: ReplayBuffer, n: int, pixels: bool = True) -> tuple:
    """``n`` random transitions: uint8 frames t-1, t, t+1 ``[n, 9, H, W]`` (None with ``pixels=False``: the
    physics fit's 20k transitions would otherwise gather 0.7 GB of frames it never reads), actions ``[n, A]``, and
    the physics state at t and t+1 side by side ``[n, 2P]``. The same transitions are drawn either way."""
    batch = buffer.sample(n, frame_stack=2, keys=["pixels", "physics"] if pixels else ["physics"])
    frames = torch.cat([batch["pixels"], batch["next", "pixels"][:, -3:]], dim=1) if pixels else None
    physics = torch.cat([batch["physics"], batch["next", "physics"]], dim=1).double()
    return frames, batch["action"].float(), physics


class InverseDynamics(nn.Module):
    """Frames t-1, t, t+1 and their two differences (x8, so that sub-pixel motion is not lost in the scale) ->
    a_t, through the benchmark encoder's four k4 s2 convolutions (overlapping kernels: every pixel is seen)."""

    def __init__(self, action_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(15, 32, 4, 2, 1), nn.ELU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ELU(),
            nn.Conv2d(64, 64, 4, 2, 1), nn.ELU(), nn.Conv2d(64, 64, 4, 2, 1), nn.ELU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ELU(), nn.Linear(256, action_dim))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.float() / 255 - 0.5
        before, now, after = x[:, 0:3], x[:, 3:6], x[:, 6:9]
        return self.net(torch.cat([before, now, after, 8 * (now - before), 8 * (after - now)], dim=1))


def ranks(predicted: torch.Tensor, true: torch.Tensor, candidates: int, seed: int) -> torch.Tensor:
    """Per case, the fraction of ``candidates`` uniform random actions nearer to ``predicted`` than the true
    action is (ties half), as check 2's ``true_action_rank`` counts them."""
    gen = torch.Generator().manual_seed(seed)
    cand = torch.rand(len(true), candidates, true.shape[-1], generator=gen, dtype=predicted.dtype) * 2 - 1
    score = torch.cat([true[:, None], cand], dim=1).sub(predicted[:, None]).square().sum(-1)
    return bench.true_action_rank(score)


def reading(predicted: torch.Tensor, true: torch.Tensor, candidates: int, seed: int) -> dict:
    """A predictor's row of the record: its action MSE and check 2's reading of its :func:`ranks`."""
    return {"action_mse": float((predicted - true).square().mean()),
            **bench.rank_summary(ranks(predicted, true, candidates, seed))}


@torch.no_grad()
def predict(net: nn.Module, frames: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    net.eval()
    out = torch.cat([net(frames[i : i + chunk]) for i in range(0, len(frames), chunk)])
    net.train()
    return out


def least_squares(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The coefficients ``[X + 1, Y]`` of the least-squares fit y ~ [x, 1] (the bias last).

    Without contacts the state at t+1 is linear in the state at t and the action, so a design holding both is
    linearly dependent up to the float32 rounding of the stored states; a solver that keeps that direction puts
    huge weights on rounding noise (a CI run of the test's tiny data: action MSE 12). The SVD-based driver drops
    singular values below 1e-5 of the largest (the minimum-norm solution of the rest)."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return torch.linalg.lstsq(design, y, rcond=1e-5, driver="gelsd").solution


def physics_ceiling(train: tuple, test: tuple, candidates: int, seed: int) -> dict:
    """Least squares from [physics_t, physics_{t+1}, 1] to a_t: what the motion allows without pixels."""
    (_, a_train, p_train), (_, a_test, p_test) = train, test
    fit = least_squares(p_train, a_train.double())
    pred = (torch.cat([p_test, torch.ones(len(p_test), 1, dtype=p_test.dtype)], 1) @ fit).float()
    return reading(pred, a_test, candidates, seed)


def read_world_models(items: list[str]) -> list[tuple[str, int, dict]]:
    """``[LABEL@]UPDATES=JSON`` items (latent_ranking.py records) as (label, updates, record); no label: "world
    model"."""
    out = []
    for item in items:
        key, file = item.split("=", 1)
        label, _, updates = key.rpartition("@")
        out.append((label or "world model", int(updates), json.loads(Path(file).read_text())))
    return out


def plot(records: list[str], world_models: list[str], path: str) -> dict:
    """Check 2's fraction over training: each ``LABEL=JSON`` record's held-out curve, and, as points at their
    update counts, ``[LABEL@]UPDATES=JSON`` records of latent_ranking.py (the benchmark's G and the probe on the
    belief means), one series per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    drawn = {}
    for item in records:
        label, file = item.split("=", 1)
        curve = json.loads(Path(file).read_text())["curve"]
        drawn[label] = [(row["update"], row["heldout"]["fraction_in_best_20pct"]) for row in curve]
        ax.plot(*zip(*drawn[label], strict=True), marker="o", ms=3, label=f"inverse CNN, {label}")
    series: dict[str, list[tuple[int, float, float]]] = {}
    for label, updates, rec in read_world_models(world_models):
        series.setdefault(label, []).append(
            (updates, rec["G_benchmark"]["G_nonconstant_fraction_in_best_20pct"],
             rec["latent_inverse_probe"]["fraction_in_best_20pct"]))
    for (label, points), color in zip(series.items(), ("black", "purple", "green", "tab:brown", "tab:cyan"),
                                      strict=False):
        points.sort()
        ax.plot([u for u, _, _ in points], [g for _, g, _ in points], "s-", color=color, label=f"{label}: check 2 by G")
        ax.plot([u for u, _, _ in points], [q for _, _, q in points], "^--", color=color, alpha=0.5,
                label=f"{label}: probe on its belief means")
    ax.axhline(0.8, color="red", lw=1, ls=":", label="check 2's threshold (0.8)")
    ax.axhline(0.2, color="grey", lw=1, ls=":", label="chance (0.2)")
    ax.set_xlabel("updates")
    ax.set_ylabel("true a_t in the best 20% of 1000")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: nothing hidden
    ax.set_title("point_mass 64x64: reading a_t off (o_t, o_{t+1})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"curves": drawn, "world_models": series}


def plot_state(world_models: list[str], path: str) -> dict:
    """What each world model's belief knows of the state (``latent_ranking.py``'s ``state_probe``), at the latest
    of its ``[LABEL@]UPDATES=JSON`` records that has one: R^2 of the position and the velocity read off the belief
    mean, and their errors in units of how far one random action moves them at the next step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest: dict[str, tuple[int, dict]] = {}
    for label, updates, rec in read_world_models(world_models):
        if "state_probe" in rec and updates >= latest.get(label, (-1, None))[0]:
            latest[label] = (updates, rec["state_probe"])
    if not latest:
        raise SystemExit("none of the --world-models records has a state_probe (latent_ranking.py writes one)")
    names = [f"{label}\n{updates:,} updates" for label, (updates, _) in latest.items()]
    probes = [probe for _, probe in latest.values()]
    x = list(range(len(names)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for offset, part, color in ((-0.2, "position", "tab:blue"), (0.2, "velocity", "tab:orange")):
        at = [i + offset for i in x]
        left.bar(at, [p[f"{part}_r2"] for p in probes], 0.4, color=color, label=part)
        right.bar(at, [p[f"{part}_rmse_over_action_effect"] for p in probes], 0.4, color=color, label=part)
    left.set_ylabel("R^2 of a probe on the belief mean (held out)")
    left.set_ylim(min(-0.2, *(p["velocity_r2"] for p in probes)), 1.05)
    left.axhline(0, color="grey", lw=0.8)
    right.set_yscale("log")
    right.set_ylim(0.5, 2 * max(max(p["position_rmse_over_action_effect"], p["velocity_rmse_over_action_effect"])
                                for p in probes))
    right.axhline(1, color="red", lw=1, ls=":", label="what one random action changes")
    right.set_ylabel("probe RMSE / the action's effect on the next step")
    for ax in (left, right):
        ax.set_xticks(x, names, fontsize=7, rotation=25, ha="right")
        ax.legend(fontsize=7)
    fig.suptitle("point_mass 64x64: what the world model's belief knows of the state", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {label: {"updates": u, **probe} for label, (u, probe) in latest.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="a bench_active_inference --data folder (train/, heldout/)")
    p.add_argument("--updates", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=3600, help="stop training after this long")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--cases", type=int, default=1000,
                   help="held-out cases for the curve (100 more beside: the spec's count)")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON record (written at every evaluation)")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="draw the records of --records (and latent_ranking.py's --world-models) instead of training")
    p.add_argument("--records", nargs="*", default=[], metavar="LABEL=JSON")
    p.add_argument("--world-models", nargs="*", default=[], metavar="[LABEL@]UPDATES=JSON",
                   help="latent_ranking.py records of world models, one series per LABEL")
    p.add_argument("--state-figure", default=None, metavar="PNG",
                   help="draw what each --world-models series' belief knows of the state (with or without --figure)")
    args = p.parse_args(argv)
    if args.figure or args.state_figure:
        drawn = plot(args.records, args.world_models, args.figure) if args.figure else {}
        if args.state_figure:
            drawn["state"] = plot_state(args.world_models, args.state_figure)
        return drawn
    if args.data is None:
        p.error("--data is needed to train (or give --figure with --records to draw)")
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    train_buf, heldout = ReplayBuffer.load(data / "train"), ReplayBuffer.load(data / "heldout")
    with bench.fixed_draws(args.seed + 100):
        test = frames_and_actions(heldout, args.cases)
        spec_cases = frames_and_actions(heldout, 100)
        train_probe = frames_and_actions(train_buf, args.cases)
        physics_fit = frames_and_actions(train_buf, 20000, pixels=False)
    torch.manual_seed(args.seed)
    action_dim = test[1].shape[-1]
    mean_action = physics_fit[1].mean(0)
    record = {
        "data": str(data), "transitions_train": len(train_buf), "settings": vars(args),
        "mean_action": reading(mean_action.expand_as(test[1]), test[1], args.candidates, args.seed),
        "physics_least_squares": physics_ceiling(physics_fit, test, args.candidates, args.seed),
        "curve": [],
    }
    print(json.dumps({k: record[k] for k in ("mean_action", "physics_least_squares")}), flush=True)
    net = InverseDynamics(action_dim)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    started, update = time.time(), 0
    while True:
        done = update >= args.updates or time.time() - started > args.seconds
        if update % args.eval_every == 0 or done:
            row = {"update": update, "seconds": round(time.time() - started, 1)}
            for name, (frames, actions, _) in (("heldout", test), ("spec_100", spec_cases), ("train", train_probe)):
                row[name] = reading(predict(net, frames), actions, args.candidates, args.seed)
            record["curve"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(record, indent=1))
        if done:
            break
        frames, actions, _ = frames_and_actions(train_buf, args.batch)
        loss = (net(frames) - actions).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update += 1
        if not math.isfinite(loss.item()):
            raise SystemExit(f"inverse_ceiling: the loss went to {loss.item()} at update {update}")
    return record


if __name__ == "__main__":
    main()
