"""Each objective term's gradient norm on each part of a saved active inference model, on two training batches.

    python docs/bench_active_inference/inverse_term/gradient_norms.py --load-model MODEL.pt --data BUFFERS_DIR \
        --inverse-weight W

``--data`` holds the benchmark's ``train`` buffer; ``--inverse-weight`` must be the model's own (its file has the
inverse head only when the weight is > 0). Prints ``ActiveInferenceAgent.gradient_norms_by_term`` for the encoder,
the posterior head, the inverse head and all parameters (gradient_norms.md beside this file has the readings).
"""

import argparse
import sys
from pathlib import Path

import torch

from latentrl.replay.buffer import ReplayBuffer

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-model", required=True, help="a bench_active_inference.py --save-model file")
    p.add_argument("--data", required=True, help="the benchmark's buffers (a folder holding train/)")
    p.add_argument("--inverse-weight", type=float, default=0.0, help="the model's inverse_weight (default 0)")
    p.add_argument("--batches", type=int, default=2, help="training batches to read (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    agent = bench.build_agent(bench.parse_args(["--set", f"inverse_weight={args.inverse_weight}"]))
    bench.load_model_file(agent, args.load_model)
    buffer = ReplayBuffer.load(Path(args.data) / "train")
    kwargs = agent.sample_spec().sample_kwargs()
    torch.manual_seed(0)
    for _ in range(args.batches):
        norms = agent.gradient_norms_by_term(buffer.sample(**kwargs))
        shown = ("encoder", "posterior", "inverse", "all")
        print({term: {part: f"{v:.3g}" for part, v in parts.items() if part in shown} for term, parts in norms.items()})


if __name__ == "__main__":
    main()
