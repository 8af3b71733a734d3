"""How precisely must a model place the point mass to pass check 1, and how precisely does ours? (2026-12-03)

    python docs/bench_active_inference/position_precision.py --load-model <model.pt> --data <buffers> [bench options]

Takes the options of scripts/bench_active_inference.py (the model settings and the buffers of the page's run).

1. The camera's scale: the centroid of the pixels that differ from the median held-out frame (the mass) against
   the mass's physics position, fitted by least squares: pixels per metre and the residual.
2. How far the mass moves in one agent step (action repeat 4, uniform random actions), in metres and pixels. The
   copy-current-frame baseline of check 1 is wrong by exactly that displacement.
3. How precisely the belief locates the mass: an MLP probe from the posterior mean of q(s|o) (frame stack 2) to the
   physics position, trained on 8000 training frames, RMSE on 2000 held-out frames; a linear probe beside it. A
   model whose one-step prediction is to beat copying must place the mass closer than one step's displacement.

Writes ``position_precision.json`` to ``--fig-dir``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402


def camera_scale(frames: torch.Tensor, position: torch.Tensor) -> dict:
    """Pixels per metre along x and y from the mass's centroid (``frames`` uint8 ``[N, 3, H, W]``)."""
    pixels = frames.float() / 255
    mass = ~bench.static_pixels(pixels, pixels)[:, 0]  # [N, H, W]: off the median frame by > 0.1 in a channel
    ys, xs = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in mass.shape[1:]), indexing="ij")
    weight = mass.float()
    count = weight.sum((1, 2)).clamp(min=1)
    out = {"mass_pixels_median": float(count.median())}
    for axis, centroid in (("x", (weight * xs).sum((1, 2)) / count), ("y", (weight * ys).sum((1, 2)) / count)):
        design = torch.stack([position[:, "xy".index(axis)], torch.ones(len(position))], 1)
        fit = torch.linalg.lstsq(design, centroid[:, None]).solution
        out[f"pixels_per_metre_{axis}"] = abs(float(fit[0]))
        out[f"residual_pixels_{axis}"] = float((design @ fit - centroid[:, None]).std())
    return out


def probe_rmse(train_x, train_y, test_x, test_y, updates: int = 4000) -> tuple[float, float]:
    """Held-out position RMSE (metres) of an MLP probe and of a linear probe."""
    torch.manual_seed(0)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    net = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], 256), torch.nn.ELU(),
                              torch.nn.Linear(256, 256), torch.nn.ELU(), torch.nn.Linear(256, 2))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(updates):
        idx = torch.randint(0, len(train_x), (256,))
        loss = (net((train_x[idx] - mu) / sd) - 10 * train_y[idx]).square().mean()  # positions in decimetres
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mlp = (net((test_x - mu) / sd) / 10 - test_y).square().sum(1).mean().sqrt()

    def design(x):
        return torch.cat([x, torch.ones(len(x), 1)], 1)

    weights = torch.linalg.lstsq(design(train_x), train_y).solution
    linear = (design(test_x) @ weights - test_y).square().sum(1).mean().sqrt()
    return float(mlp), float(linear)


def main() -> None:
    args = bench.parse_args(sys.argv[1:])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, heldout = bench.load_or_collect(args)
    agent = bench.load_saved_agent(args)
    wm = agent.world_model

    def encode(buffer, n):
        batch = buffer.sample(n, frame_stack=agent.frame_stack, keys=["pixels", "physics"])
        with torch.no_grad():
            mean, std = wm.posterior(batch["pixels"])
        return mean, std, batch["physics"].float()[:, :2]

    steps = heldout.sample(2000, keys=["pixels", "physics"])
    result = camera_scale(steps["pixels"], steps["physics"].float()[:, :2])
    scale = (result["pixels_per_metre_x"] + result["pixels_per_metre_y"]) / 2
    moved = (steps["next", "physics"][:, :2] - steps["physics"][:, :2]).float().norm(dim=1)
    result.update({"step_metres_median": float(moved.median()), "step_metres_mean": float(moved.mean()),
                   "step_pixels_median": float(moved.median()) * scale})
    (train_x, _, train_y), (test_x, test_std, test_y) = encode(train, 8000), encode(heldout, 2000)
    mlp, linear = probe_rmse(train_x, train_y, test_x, test_y)
    result.update({"probe_rmse_metres_mlp": mlp, "probe_rmse_metres_linear": linear,
                   "probe_rmse_pixels_mlp": mlp * scale, "posterior_std_median": float(test_std.median()),
                   "model": args.load_model})
    print(json.dumps(result, indent=1))
    fig_dir = Path(args.fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    (fig_dir / "position_precision.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
