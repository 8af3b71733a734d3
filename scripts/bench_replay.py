"""Benchmark: latentrl's ReplayBuffer against TorchRL's buffer holding precomputed frame stacks.

Both buffers hold the same number of steps of 64x64 pixels from ``--num-envs`` parallel envs.
TorchRL's ``TensorDictReplayBuffer(storage=LazyTensorStorage(N))`` stores each step's 3-frame stacks
(``pixels`` and ``("next", "pixels")`` as ``[9, 64, 64]`` uint8) plus action / reward / done flags;
ours stores each frame once and builds the stacks at sample time. Reports samples/s (median over
repetitions, the two buffers interleaved) and stored bytes per step, prints a markdown table and
writes it to ``docs/bench_replay.md``.

    python scripts/bench_replay.py            # ~1-2 minutes, 50k steps
    python scripts/bench_replay.py --quick    # ~20 s, 10k steps

``--baseline`` adds a per-call A/B of the current buffer against another version of ``replay/buffer.py``
(the two filled with the same steps, every call of one alternating with a call of the other, so both
see the same load on a shared machine):

    git show <rev>:replay/buffer.py > /tmp/buffer_before.py
    python scripts/bench_replay.py --baseline /tmp/buffer_before.py
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from latentrl.replay import ReplayBuffer
from latentrl.training.logger import machine_description

REPO = Path(__file__).resolve().parents[1]
ACTION_DIM = 6
POOL = 512  # distinct random frames the synthetic episodes are drawn from
DONE_KEYS = ("terminated", "truncated", "done")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50_000, help="stored steps in each buffer")
    parser.add_argument("--num-envs", type=int, default=10, help="parallel env streams")
    parser.add_argument("--episode-length", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--frame-stack", type=int, default=3)
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per buffer (medians reported)")
    parser.add_argument("--iters", type=int, default=20, help="samples per repetition")
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count()}),
                        help="torch.set_num_threads settings to measure (each applied to both buffers)")
    parser.add_argument("--quick", action="store_true", help="~20 s run: 10k steps, fewer repetitions")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench_replay.md", help="markdown report")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another version's replay/buffer.py: adds a per-call A/B against it (1 thread)")
    parser.add_argument("--ab-calls", type=int, default=1500, help="calls per buffer and setting in the A/B")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.reps, args.iters = 10_000, 5, 10
    return args


def synthetic_chunks(args, pool: torch.Tensor, chunk: int):
    """TorchRL env-step TensorDicts ``[num_envs, chunk]`` of episodes of ``--episode-length`` steps."""
    num_envs, length = args.num_envs, args.episode_length
    per_env = args.steps // num_envs
    env = torch.arange(num_envs)[:, None]
    for start in range(0, per_env, chunk):
        t = start + torch.arange(min(chunk, per_env - start))
        step = t % length
        done = (step == length - 1)[None].expand(num_envs, -1)
        frame = (env * 7919 + t * 31) % POOL
        next_frame = torch.where(done, (frame + 101) % POOL, (env * 7919 + (t + 1) * 31) % POOL)
        shape = [num_envs, len(t)]
        yield TensorDict({
            "pixels": pool[frame],
            "action": torch.rand(*shape, ACTION_DIM) * 2 - 1,
            "episode": (t // length)[None].expand(*shape) + 1000 * env,
            "step": step[None].expand(*shape),
            "next": {
                "pixels": pool[next_frame],
                "reward": torch.rand(*shape, 1),
                "terminated": torch.zeros(*shape, 1, dtype=torch.bool),
                "truncated": done[..., None],
                "done": done[..., None],
            },
        }, batch_size=shape)


def stacks(frames: torch.Tensor, k: int) -> torch.Tensor:
    """Frame stacks ``[num_envs, T, 3k, H, W]`` of one episode's frames ``[num_envs, T, 3, H, W]``."""
    t = torch.arange(frames.shape[1])
    return frames[:, (t[:, None] + torch.arange(1 - k, 1)).clamp_min(0)].flatten(2, 3)


def fill(args, pool):
    """Both buffers, filled with the same episodes (one chunk = one episode of every env)."""
    ours = ReplayBuffer(args.steps + args.steps // args.episode_length + args.num_envs)
    torchrl_rb = TensorDictReplayBuffer(storage=LazyTensorStorage(args.steps), batch_size=args.batch_size)
    for td in synthetic_chunks(args, pool, args.episode_length):
        ours.extend(td)
        frames = stacks(torch.cat([td["pixels"], td["next", "pixels"][:, -1:]], 1), args.frame_stack)
        torchrl_rb.extend(TensorDict({
            "pixels": frames[:, :-1],
            "action": td["action"],
            "next": {"pixels": frames[:, 1:]} | {key: td["next", key] for key in ("reward", *DONE_KEYS)},
        }, batch_size=td.batch_size).reshape(-1))
    return ours, torchrl_rb


def load_baseline(path: Path):
    """The ``ReplayBuffer`` class of another version's ``replay/buffer.py``."""
    spec = importlib.util.spec_from_file_location("baseline_replay_buffer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReplayBuffer


def ab_lines(args, pool) -> list[str]:
    """Per-call A/B (1 thread): the baseline's and this buffer's samples/s (median time per call)."""
    baseline_cls = load_baseline(args.baseline)
    capacity = args.steps + args.steps // args.episode_length + args.num_envs
    buffers = {"baseline": baseline_cls(capacity), "current": ReplayBuffer(capacity)}
    for td in synthetic_chunks(args, pool, args.episode_length):
        for buffer in buffers.values():
            buffer.extend(td)
    tmp = tempfile.TemporaryDirectory()
    disk = {}
    for name, buffer in buffers.items():
        buffer.save(Path(tmp.name) / name)
        disk[name] = type(buffer).load(Path(tmp.name) / name)
    batch, k = args.batch_size, args.frame_stack
    settings = {
        f"frame_stack={k}": lambda b, d: b.sample(batch, frame_stack=k),
        f"frame_stack={k}, goal=future": lambda b, d: b.sample(batch, frame_stack=k, goal="future"),
        f"frame_stack={k}, horizon=8 (B/8 slices)": lambda b, d: b.sample(batch // 8, frame_stack=k, horizon=8),
        f"loaded from disk (memmap), frame_stack={k}": lambda b, d: d.sample(batch, frame_stack=k),
    }
    torch.set_num_threads(1)
    rng = random.Random(0)
    lines = ["| setting | baseline samples/s | current samples/s | current / baseline |", "|---|---:|---:|---:|"]
    for setting, fn in settings.items():
        times = {name: [] for name in buffers}
        for name in buffers:  # warm up
            fn(buffers[name], disk[name])
        for _ in range(args.ab_calls):
            order = list(buffers)
            rng.shuffle(order)
            for name in order:
                start = time.perf_counter()
                fn(buffers[name], disk[name])
                times[name].append(time.perf_counter() - start)
        rate = {name: batch / statistics.median(t) for name, t in times.items()}
        lines.append(f"| {setting} | {rate['baseline']:,.0f} | {rate['current']:,.0f} "
                     f"| {rate['current'] / rate['baseline']:.3f} |")
    tmp.cleanup()
    return lines


def storage_bytes(data: TensorDict) -> int:
    return sum(x.numel() * x.element_size() for x in data.values(include_nested=True, leaves_only=True))


def time_sampler(fn, batch: int, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch * iters / (time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    load = os.getloadavg()
    torch.manual_seed(0)
    size, batch, k = args.image_size, args.batch_size, args.frame_stack
    pool = torch.randint(0, 256, (POOL, 3, size, size), dtype=torch.uint8)
    t0 = time.perf_counter()
    ours, torchrl_rb = fill(args, pool)
    fill_s = time.perf_counter() - t0
    tmp = tempfile.TemporaryDirectory()
    ours.save(tmp.name)
    on_disk = ReplayBuffer.load(tmp.name)

    samplers = {
        "TorchRL TensorDictReplayBuffer, stored stacks": (lambda: torchrl_rb.sample(), batch),
        f"latentrl ReplayBuffer, frame_stack={k}": (lambda: ours.sample(batch, frame_stack=k), batch),
        f"latentrl ReplayBuffer, frame_stack={k}, goal=future": (
            lambda: ours.sample(batch, frame_stack=k, goal="future"), batch),
        f"latentrl ReplayBuffer, frame_stack={k}, horizon=8 (B/8 slices)": (
            lambda: ours.sample(batch // 8, frame_stack=k, horizon=8), batch),
        f"latentrl ReplayBuffer loaded from disk (memmap), frame_stack={k}": (
            lambda: on_disk.sample(batch, frame_stack=k), batch),
        f"latentrl ReplayBuffer, frame_stack={k}, offset=4 pairs (o_t, o_t+4, a_t:t+4)": (
            lambda: ours.sample(batch, frame_stack=k, offset=4), batch),
    }
    check = ours.sample(batch, frame_stack=k)
    reference = torchrl_rb.sample()
    assert check["pixels"].shape == reference["pixels"].shape == (batch, 3 * k, size, size)
    assert check["next", "pixels"].shape == reference["next", "pixels"].shape

    bytes_ours = storage_bytes(ours.storage) / len(ours)
    # TorchRL allocates its storage at max_size rows of one layout: bytes of one row times max_size
    bytes_torchrl = storage_bytes(torchrl_rb.storage[:1]) * torchrl_rb.storage.max_size / len(torchrl_rb)
    base_name = next(iter(samplers))
    main_name = f"latentrl ReplayBuffer, frame_stack={k}"
    lines = [
        "| buffer | threads | samples/s (median) | speed vs TorchRL | stored bytes / step "
        "| memory vs TorchRL |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    speedups = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        rates = {name: [] for name in samplers}
        for fn, _ in samplers.values():  # warm up
            fn()
        for _ in range(args.reps):
            for name, (fn, n) in samplers.items():
                rates[name].append(time_sampler(fn, n, args.iters))
        median = {name: statistics.median(r) for name, r in rates.items()}
        base = median[base_name]
        speedups[threads] = median[main_name] / base
        for name in samplers:
            stored = bytes_torchrl if name == base_name else bytes_ours
            lines.append(f"| {name} | {threads} | {median[name]:,.0f} | {median[name] / base:.2f}x "
                         f"| {stored:,.0f} | {stored / bytes_torchrl:.3f} (1/{bytes_torchrl / stored:.1f}) |")
    table = "\n".join(lines)
    saving = bytes_torchrl / bytes_ours
    verdict = " ".join(
        f"Target (>= 3x samples/s at <= 1/2.5 of the memory) with {threads} thread(s): "
        f"{'met' if speedup >= 3 and saving >= 2.5 else 'NOT met'} ({speedup:.2f}x samples/s, "
        f"1/{saving:.1f} of the memory)." for threads, speedup in speedups.items())
    machine = (f"{machine_description()}; load average at start {load[0]:.2f} (other processes "
               "competing for the cores stall multi-threaded ops, so compare rows of one thread setting)")
    command = " ".join(["python scripts/bench_replay.py", *(sys.argv[1:] if argv is None else argv)])
    report = "\n".join([
        "# Replay buffer benchmark",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {machine}",
        f"- command: `{command}`",
        f"- setup: {len(ours):,} stored steps in each buffer ({args.num_envs} env streams, episodes of "
        f"{args.episode_length} steps), {size}x{size} RGB frames, batch {batch}, frame_stack {k}; "
        f"median of {args.reps} repetitions of {args.iters} samples each, buffers interleaved; "
        f"fill time {fill_s:.1f} s",
        "- TorchRL: `TensorDictReplayBuffer(storage=LazyTensorStorage(N))` holding `pixels` and "
        f"`(\"next\", \"pixels\")` as precomputed [{3 * k}, {size}, {size}] uint8 stacks, action, reward, "
        "done flags",
        "- latentrl: `ReplayBuffer` storing each frame once (plus action, reward, done flags, episode, step "
        "and its bookkeeping columns), stacks gathered at sample time; its batches also carry `is_first`, "
        "`has_action`, `segment_id`, `segment_step`",
        "",
        table,
        "",
        verdict,
        "",
    ])
    if args.baseline is not None:
        del samplers, ours, torchrl_rb, on_disk, check, reference  # free their memory for the A/B's two buffers
        report += "\n".join([
            "",
            f"## Per-call A/B against `{args.baseline}` (1 thread)",
            "",
            f"Both buffers filled with the same steps; {args.ab_calls:,} calls per buffer and setting, every call of "
            "one alternating with a call of the other (random order per pair); samples/s from the median call.",
            "",
            *ab_lines(args, pool),
            "",
        ])
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    tmp.cleanup()


if __name__ == "__main__":
    main()
