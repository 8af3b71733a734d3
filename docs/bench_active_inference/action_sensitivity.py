"""Does the world model's one-step prediction use the action? A diagnostic of check 1 / check 2 (issue 14).

    python docs/bench_active_inference/action_sensitivity.py --load-model <model.pt> --data <buffers> [bench options]

Takes the options of scripts/bench_active_inference.py (the model settings and buffers of the page's run). On
``--mse-cases`` held-out transitions it decodes the ensemble-mean transition from the posterior mean of o_t under
the true a_t, under the zero action and under another case's action (shuffled), and the posterior mean of o_t itself
(a copy in latent space). It reports each one's per-pixel MSE against o_{t+1} split into the static scene and the
moving pixels (as check 1 does), the copy-frame baseline, and in latent space the distance of each prediction to the
posterior mean of o_{t+1}. When the true action is no better than a wrong one, the transition has not learnt what the
action does, and neither check 1 nor check 2 can pass. Writes ``action_sensitivity_<name>.json`` beside itself with
``--name``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402


@torch.no_grad()
def sensitivity(agent, heldout, cases: int) -> dict:
    wm = agent.world_model
    batch = heldout.sample(cases, frame_stack=agent.frame_stack, keys=["pixels"])
    mean, _ = wm.posterior(batch["pixels"])
    target_latent = wm.posterior(batch["next", "pixels"])[0]
    target = wm.target(batch["next", "pixels"])
    current = wm.target(batch["pixels"])
    static = bench.static_pixels(current, target)
    action = batch["action"].float()
    actions = {"true": action, "zero": torch.zeros_like(action),
               "shuffled": action[torch.randperm(len(action), generator=torch.Generator().manual_seed(0))]}
    latents = {name: wm.transition_members(mean, a)[0].mean(0) for name, a in actions.items()}
    latents["latent_copy"] = mean
    out = {"cases": cases, "static_pixel_fraction": static.float().mean().item()}
    images = {name: wm.decode_mean(z) for name, z in latents.items()}
    images["copy_frame"] = current
    for name, image in images.items():
        split = bench.error_split(image, target, static)  # check 1's split
        out[name] = {**split, "moving_part": split["mse"] - split["static_part"]}
        if name in latents:
            out[name]["latent_distance"] = (latents[name] - target_latent).norm(dim=-1).mean().item()
    return out


def main() -> None:
    args = bench.parse_args([a for a in sys.argv[1:] if not a.startswith("--name=")])
    name = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--name=")), "run")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    _, heldout = bench.load_or_collect(args)
    result = sensitivity(bench.load_saved_agent(args), heldout, args.mse_cases)
    result["model"] = args.load_model
    for key, value in result.items():
        print(key, value)
    (Path(__file__).parent / f"action_sensitivity_{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
