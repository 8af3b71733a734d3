"""Each objective term's gradient norm on each part of a saved active inference model, on two training batches.

    python docs/bench_active_inference/inverse_term/gradient_norms.py MODEL.pt BUFFERS_DIR INVERSE_WEIGHT

``BUFFERS_DIR`` holds the benchmark's ``train`` buffer; ``INVERSE_WEIGHT`` must be the model's own (its file has the
inverse head only when the weight is > 0). Prints ``ActiveInferenceAgent.gradient_norms_by_term`` for the encoder,
the posterior head, the inverse head and all parameters (gradient_norms.md beside this file has the readings).
"""

import importlib.util
import sys
from pathlib import Path

import torch

from latentrl.replay.buffer import ReplayBuffer

ROOT = Path(__file__).resolve().parents[3]


def main(model: str, buffers: str, weight: str) -> None:
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench_active_inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.set_num_threads(1)
    agent = bench.build_agent(bench.parse_args(["--set", f"inverse_weight={weight}"]))
    bench.load_model_file(agent, model)
    buffer = ReplayBuffer.load(Path(buffers) / "train")
    kwargs = agent.sample_spec().sample_kwargs()
    torch.manual_seed(0)
    for _ in range(2):
        norms = agent.gradient_norms_by_term(buffer.sample(**kwargs))
        shown = ("encoder", "posterior", "inverse", "all")
        print({term: {part: f"{v:.3g}" for part, v in parts.items() if part in shown} for term, parts in norms.items()})


if __name__ == "__main__":
    main(*sys.argv[1:4])
