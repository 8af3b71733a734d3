"""Learner benchmark: updates/s and peak memory of every agent's ``update`` at its paper preset, with our speed-ups
off and on, beside the authors' own TD-JEPA / FB update; writes docs/bench_learner.md (+ docs/bench_learner/*.json).

Every row runs in a fresh subprocess (so its peak memory is its own): the agent is built at the preset on the
device, a small replay buffer is filled with random observations and actions (plus the agent's policy extras,
e.g. METRA's skill), a few batches are sampled from it with the agent's own ``sample_spec``, and after warm-up
updates the script times updates on those batches (sampling is not timed). Updates/s is the median over timed
blocks (1 update per block on the CPU; 10 between two ``torch.cuda.synchronize`` on CUDA). Peak memory is the
process's peak RSS (``resource.getrusage``; it includes the buffer and the batches) and, on CUDA,
``torch.cuda.max_memory_allocated``.

Variants (what changes between them; the maths is the same in all):

- ``off``: the update as before issue 19: the per-parameter Adam loop (PyTorch's CPU default), NCHW pixel encoders,
  and one host sync per update reading the metrics (the old ``update -> dict[str, float]`` contract);
- ``on``: the defaults now (exact on the CPU): ``foreach`` Adam (fused on CUDA), metrics left on the device,
  METRA's Dreamer CNN on channels_last as before;
- ``fast``: ``on`` plus the opt-ins that round differently: fused Adam on the CPU, channels_last for every pixel
  encoder;
- ``bf16``: ``on`` under bfloat16 autocast (``learner.amp=bf16``); its losses after the same updates are compared
  with ``on``'s in the page;
- ``compile``: ``on`` with ``learner.compile=true`` (CUDA: CUDA graphs); slow to compile on a CPU, so only when
  asked (``--variants``).

The authors' code: ``--authors /path/to/td_jepa_public`` (a checkout of the authors' repository) and
``--authors-python`` (a Python with torch, pydantic, gymnasium and safetensors, e.g. a separate venv) time their
``TDJEPAAgent.update`` / ``FBAgent.update`` at the same batch and network sizes (their DMC launchers' settings;
uncompiled on the CPU, ``compile=True`` as they run it on CUDA). METRA's authors' code (garage, TF-free PyTorch
but tied to garage's sampler) is not run; ``tests/test_reference_updates.py`` holds a faithful transcription of
its update, timed here as "METRA authors' update (transcribed)".

Usage::

    python scripts/bench_learner.py                       # CPU, 1 and 2 threads, every agent, off / on / fast / bf16
    python scripts/bench_learner.py --device cuda --threads 16 --variants off on fast bf16 compile
    python scripts/bench_learner.py --authors /tmp/td_jepa_public --authors-python /tmp/authors_venv/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_MD = ROOT / "docs" / "bench_learner.md"
OUT_DIR = ROOT / "docs" / "bench_learner"

# (agent, obs_type or None for the preset's own); the paper preset of each.
CASES = [("metra", "pixels"), ("metra", "physics"), ("td_jepa", "pixels"), ("td_jepa", "state"), ("fb", "pixels"),
         ("fb", "state"), ("rnd", None), ("active_inference", None), ("pv_rnn", None), ("stamo", None)]
# Walker-like shapes: one 64x64 RGB frame, 24 state dims, 18 physics dims, 6 action dims.
OBS_SHAPES = {"pixels": (3, 64, 64), "state": (24,), "physics": (18,)}
ACTION_DIM = 6
VARIANTS = {
    "off": {"adam": "loop", "channels_last": False, "sync_each_update": True, "amp": None, "compile": False},
    "on": {"adam": "auto", "channels_last": "auto", "sync_each_update": False, "amp": None, "compile": False},
    "fast": {"adam": "fused", "channels_last": True, "sync_each_update": False, "amp": None, "compile": False},
    "bf16": {"adam": "auto", "channels_last": "auto", "sync_each_update": False, "amp": "bf16", "compile": False},
    "compile": {"adam": "auto", "channels_last": "auto", "sync_each_update": False, "amp": None, "compile": True},
}
# The authors' DMC launchers (scripts/train/{pixel,proprio}/launch_{td_jepa,fb}_dmc.py) at 9152a32.
AUTHORS_ARCHI = {
    "td_jepa": {
        "phi_predictor": {"name": "ForwardArchi", "hidden_dim": 1024, "hidden_layers": 1},
        "psi_predictor": {"name": "ForwardArchi", "hidden_dim": 1024, "hidden_layers": 1},
        "actor": {"hidden_dim": 1024, "hidden_layers": 1, "name": "simple"},
        "phi_mlp_encoder": {"name": "BackwardArchi", "hidden_dim": 256, "hidden_layers": 0, "norm": True},
        "psi_mlp_encoder": {"name": "BackwardArchi", "hidden_dim": 256, "hidden_layers": 2, "norm": True},
        "phi_dim": 256, "psi_dim": 50, "norm_z": True,
    },
    "fb": {
        "f": {"name": "ForwardArchi", "hidden_dim": 1024, "hidden_layers": 1},
        "actor": {"hidden_dim": 1024, "hidden_layers": 1, "name": "simple"},
        "b": {"name": "BackwardArchi", "hidden_dim": 256, "hidden_layers": 2, "norm": True},
        "left_encoder": {"name": "BackwardArchi", "hidden_dim": 256, "hidden_layers": 0, "norm": True},
        "L_dim": 256, "z_dim": 50, "norm_z": True,
    },
}
AUTHORS_TRAIN = {
    "td_jepa": {"discount": 0.98, "phi_ortho_coef": 0.1, "psi_ortho_coef": 0.1, "predictor_target_tau": 0.001,
                "encoder_target_tau": 0.001},
    "fb": {"discount": 0.98, "ortho_coef": 1, "f_target_tau": 0.001, "b_target_tau": 0.001},
}


# ------------------------------------------------------------------------------------------------ timing helpers
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _time_updates(step, *, device: str, warmup: int, min_blocks: int, max_seconds: float, block: int) -> list[float]:
    """Seconds per update of each timed block: ``warmup`` calls of ``step()`` first, then blocks of ``block`` calls
    until ``min_blocks`` blocks and ``max_seconds`` (whichever comes later, at most 4 * min_blocks blocks)."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    times, started = [], time.perf_counter()
    while len(times) < min_blocks or (time.perf_counter() - started < max_seconds and len(times) < 4 * min_blocks):
        t0 = time.perf_counter()
        for _ in range(block):
            step()
        sync()
        times.append((time.perf_counter() - t0) / block)
    return times


# ------------------------------------------------------------------------------------------------- our agents
def _fill_buffer(agent, obs_type: str, obs_shape, *, num_envs: int, steps: int, device: str):
    """A replay buffer of ``num_envs`` streams of one ``steps``-step episode each: random observations and actions,
    plus the agent's policy extras (e.g. METRA's skill) drawn once per episode."""
    import torch
    from tensordict import TensorDict

    from latentrl.replay import ReplayBuffer

    g = torch.Generator().manual_seed(0)

    def obs() -> TensorDict:
        if obs_type == "pixels":
            value = torch.randint(0, 256, (num_envs, *obs_shape), dtype=torch.uint8, generator=g)
        else:
            value = torch.randn(num_envs, *obs_shape, generator=g)
        return TensorDict({obs_type: value}, [num_envs])

    policy = agent.policy(explore=True)
    with torch.no_grad():
        _, carry = policy.step(obs().to(device), policy.init_carry(num_envs), torch.ones(num_envs, dtype=torch.bool,
                                                                                           device=device))
    extras = {k: v.detach().cpu() for k, v in policy.extras(carry).items()}
    buffer = ReplayBuffer(num_envs * (steps + 2), device=torch.device(device))
    current = obs()
    for t in range(steps):
        nxt = obs()
        last = torch.full((num_envs, 1), t == steps - 1)
        td = current.clone()
        td["action"] = torch.rand(num_envs, agent.action_dim, generator=g) * 2 - 1
        for key, value in extras.items():
            td[key] = value
        td["next"] = nxt.clone().update({"reward": torch.rand(num_envs, 1, generator=g),
                                          "terminated": torch.zeros(num_envs, 1, dtype=torch.bool),
                                          "truncated": last, "done": last})
        buffer.extend(td)
        current = nxt
    return buffer


def _steps_needed(config) -> int:
    """Episode length for the buffer: long enough for the agent's slices, within a keyed store's step limit."""
    need = 64
    for field in ("seq_len", "horizon"):
        need = max(need, 2 * int(getattr(config, field, 0) or 0) + 8)
    offsets = getattr(config, "probe_offsets", None)
    if offsets:
        need = max(need, 2 * max(offsets) + 8)
    limit = getattr(config, "max_steps", None)
    return min(need, int(limit)) if limit else need


def run_ours(args) -> dict:
    import torch

    from latentrl.agents import agent_class
    from latentrl.agents.base import sample_batches
    from latentrl.world_models.encoders import set_channels_last
    from latentrl.world_models.layers import adam_implementation, compile_networks

    torch.set_num_threads(args.threads)
    variant = VARIANTS[args.variant]
    device = args.device
    cls = agent_class(args.agent)
    overrides = {"obs_type": args.obs} if args.obs else {}
    config = cls.make_config(args.preset, **overrides)
    obs_type = config.obs_type
    obs_shape = OBS_SHAPES.get(obs_type, OBS_SHAPES["state"])
    rss_start = _peak_rss_mb()
    torch.manual_seed(0)
    with adam_implementation(variant["adam"]):
        agent = cls(config, obs_shape, ACTION_DIM, device=device)
    if variant["channels_last"] != "auto":
        set_channels_last(agent, variant["channels_last"])
    if variant["compile"]:
        compile_networks(agent)
    buffer = _fill_buffer(agent, obs_type, obs_shape, num_envs=8, steps=_steps_needed(config), device=device)
    spec = agent.sample_spec()
    batches = [sample_batches(buffer, spec) for _ in range(3)]
    del buffer
    params = sum(p.numel() for p in agent.parameters())
    calls = {"n": 0}
    recorded: dict = {}
    record_at = args.warmup + args.min_blocks  # same update for every variant: their losses compare
    cudagraphs = variant["compile"] and device.startswith("cuda")

    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=variant["amp"] == "bf16"):
            metrics = agent.update(batches[calls["n"] % len(batches)])
        calls["n"] += 1
        if variant["sync_each_update"]:
            torch.stack([v.reshape(()) for v in metrics.values()]).tolist()  # the old contract's per-update read
        if calls["n"] == record_at:
            recorded.update({k: float(v) for k, v in metrics.items()})

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    block = 1 if device == "cpu" else 10
    times = _time_updates(step, device=device, warmup=args.warmup, min_blocks=args.min_blocks,
                          max_seconds=args.max_seconds, block=block)
    if not recorded:  # a CUDA block ran past record_at before it was read
        recorded = {}
    median = statistics.median(times)
    return {
        "kind": "ours", "agent": args.agent, "obs_type": obs_type, "preset": args.preset,
        "batch_size": _batch_size(spec), "threads": args.threads, "variant": args.variant, "device": device,
        "params": params, "updates_per_s": 1.0 / median, "median_s": median, "times_s": times,
        "updates": calls["n"], "peak_rss_mb": _peak_rss_mb(), "rss_at_start_mb": rss_start,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "metrics_at_update": record_at, "metrics": recorded,
    }


def run_ab(args) -> dict:
    """Same-process A/B: the ``--ab`` variants built side by side from the same weights and batches, their updates
    interleaved (one of each per round, the order alternating), so a change in the machine's load hits all of them
    alike. Returns each variant's median seconds per update and the median over rounds of the per-round ratios to
    the first variant."""
    import torch

    from latentrl.agents import agent_class
    from latentrl.agents.base import sample_batches
    from latentrl.world_models.encoders import set_channels_last
    from latentrl.world_models.layers import adam_implementation

    torch.set_num_threads(args.threads)
    names = args.ab
    cls = agent_class(args.agent)
    config = cls.make_config(args.preset, **({"obs_type": args.obs} if args.obs else {}))
    obs_shape = OBS_SHAPES.get(config.obs_type, OBS_SHAPES["state"])
    agents = {}
    for name in names:
        variant = VARIANTS[name]
        if variant["compile"] or variant["amp"]:
            raise ValueError(f"--ab compares exact and rounding variants only, not {name}")
        torch.manual_seed(0)
        with adam_implementation(variant["adam"]):
            agents[name] = cls(config, obs_shape, ACTION_DIM, device=args.device)
        if variant["channels_last"] != "auto":
            set_channels_last(agents[name], variant["channels_last"])
    first = agents[names[0]]
    buffer = _fill_buffer(first, config.obs_type, obs_shape, num_envs=8, steps=_steps_needed(config),
                          device=args.device)
    batches = [sample_batches(buffer, first.sample_spec()) for _ in range(3)]
    del buffer

    def one(name: str, k: int) -> float:
        torch.manual_seed(100 + k)
        t0 = time.perf_counter()
        metrics = agents[name].update(batches[k % len(batches)])
        if VARIANTS[name]["sync_each_update"]:
            torch.stack([v.reshape(()) for v in metrics.values()]).tolist()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for k in range(args.warmup):
        for name in names:
            one(name, k)
    times = {name: [] for name in names}
    started, rounds = time.perf_counter(), 0
    more = lambda: time.perf_counter() - started < args.max_seconds and rounds < 4 * args.min_blocks  # noqa: E731
    while rounds < args.min_blocks or more():
        order = names if rounds % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(one(name, args.warmup + rounds))
        rounds += 1
    base = times[names[0]]
    return {"kind": "ab", "agent": args.agent, "obs_type": config.obs_type, "preset": args.preset,
            "batch_size": _batch_size(first.sample_spec()), "threads": args.threads, "device": args.device,
            "variants": names, "rounds": rounds, "median_s": {n: statistics.median(t) for n, t in times.items()},
            "ratio_vs_first": {n: statistics.median(b / x for b, x in zip(base, t, strict=True))
                               for n, t in times.items()},
            "times_s": times, "peak_rss_mb": _peak_rss_mb()}


def _batch_size(spec) -> int:
    specs = spec.values() if isinstance(spec, dict) else [spec]
    return sum(int(s.batch_size) for s in specs)


# ------------------------------------------------------------------------------ METRA authors' update (transcribed)
def run_metra_transcribed(args) -> dict:
    """The transcription of METRA's official update in tests/test_reference_updates.py, on our agent's networks
    and batch (its own Adams, plain loop as in the official code), timed like ours."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import test_reference_updates as ref  # the transcription lives with its test

    from latentrl.agents import agent_class
    from latentrl.agents.base import sample_batches
    from latentrl.world_models.layers import adam_implementation

    torch.set_num_threads(args.threads)
    cls = agent_class("metra")
    config = cls.make_config(args.preset, obs_type=args.obs)
    obs_shape = OBS_SHAPES[config.obs_type]
    rss_start = _peak_rss_mb()
    torch.manual_seed(0)
    with adam_implementation("loop"):
        agent = cls(config, obs_shape, ACTION_DIM, device=args.device)
    buffer = _fill_buffer(agent, config.obs_type, obs_shape, num_envs=8, steps=64, device=args.device)
    batches = [sample_batches(buffer, agent.sample_spec()) for _ in range(3)]
    del buffer
    reference = ref._metra_reference(agent)  # the update, on the agent's networks as layers
    calls = {"n": 0}

    def step():
        reference(batches[calls["n"] % len(batches)])
        calls["n"] += 1

    times = _time_updates(step, device=args.device, warmup=args.warmup, min_blocks=args.min_blocks,
                          max_seconds=args.max_seconds, block=1 if args.device == "cpu" else 10)
    median = statistics.median(times)
    return {"kind": "metra_transcribed", "agent": "metra", "obs_type": config.obs_type, "preset": args.preset,
            "batch_size": config.batch_size, "threads": args.threads, "variant": "authors (transcribed)",
            "device": args.device, "updates_per_s": 1.0 / median, "median_s": median, "times_s": times,
            "updates": calls["n"], "peak_rss_mb": _peak_rss_mb(), "rss_at_start_mb": rss_start}


# ----------------------------------------------------------------------------------------- the authors' update
def run_authors(args) -> dict:
    """The authors' ``TDJEPAAgent.update`` / ``FBAgent.update`` (their code, imported from ``--authors``) at their
    DMC launchers' sizes; runs under ``--authors-python`` without latentrl."""
    import gymnasium
    import numpy as np
    import torch

    sys.path.insert(0, args.authors)
    torch.set_num_threads(args.threads)
    pixels = args.obs == "pixels"
    if args.agent == "td_jepa":
        from metamotivo.agents.td_jepa.agent import TDJEPAAgentConfig as AgentConfig
        name = "TDJEPAAgent"
    else:
        from metamotivo.agents.fb.agent import FBAgentConfig as AgentConfig
        name = "FBAgent"
    archi = dict(AUTHORS_ARCHI[args.agent])
    if pixels:
        archi["rgb_encoder"] = {"name": "drq", "feature_dim": 256}
        archi["augmentator"] = {"name": "random_shifts", "pad": 2}
    compile_ = args.device.startswith("cuda")  # as their launchers: compile=True (on their GPUs)
    cfg = AgentConfig(**{"name": name, "compile": compile_, "model": {
        "device": args.device, "archi": archi,
        "obs_normalizer": {"name": "RGBNormalizerConfig" if pixels else "IdentityNormalizerConfig"}},
        "train": {**AUTHORS_TRAIN[args.agent], "batch_size": args.batch_size}})
    if pixels:
        obs_space = gymnasium.spaces.Box(0, 255, (9, 64, 64), dtype=np.uint8)
    else:
        obs_space = gymnasium.spaces.Box(-np.inf, np.inf, (24,), dtype=np.float32)
    rss_start = _peak_rss_mb()
    torch.manual_seed(0)
    agent = cfg.build(obs_space, ACTION_DIM)
    n = args.batch_size
    g = torch.Generator().manual_seed(0)

    def obs():
        if pixels:
            return torch.randint(0, 256, (n, 9, 64, 64), dtype=torch.uint8, generator=g)
        return torch.randn(n, 24, generator=g)

    batches = [{"observation": obs(), "action": torch.rand(n, ACTION_DIM, generator=g) * 2 - 1,
                "next": {"observation": obs(), "terminated": torch.zeros(n, 1, dtype=torch.bool)}}
               for _ in range(3)]
    calls = {"n": 0}

    class Buffer:  # what their update reads: replay_buffer["train"].sample(batch_size)
        def sample(self, batch_size):
            return batches[calls["n"] % len(batches)]

    replay = {"train": Buffer()}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step():
        agent.update(replay, calls["n"])
        calls["n"] += 1

    times = _time_updates(step, device=args.device, warmup=args.warmup + (3 if compile_ else 0),
                          min_blocks=args.min_blocks, max_seconds=args.max_seconds,
                          block=1 if args.device == "cpu" else 10)
    median = statistics.median(times)
    return {"kind": "authors", "agent": args.agent, "obs_type": "pixels" if pixels else "state", "preset": "paper",
            "batch_size": n, "threads": args.threads, "variant": "authors" + (" (compiled)" if compile_ else ""),
            "device": args.device, "params": sum(p.numel() for p in agent._model.parameters()),
            "updates_per_s": 1.0 / median, "median_s": median, "times_s": times, "updates": calls["n"],
            "peak_rss_mb": _peak_rss_mb(), "rss_at_start_mb": rss_start,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None}


# ------------------------------------------------------------------------------------------------- orchestration
def _worker_argv(kind: str, agent: str, obs: str | None, preset: str, threads: int, variant: str, args,
                 batch_size: int | None = None) -> list[str]:
    argv = [f"--worker={kind}", f"--agent={agent}", f"--preset={preset}", f"--threads={threads}",
            f"--variant={variant}", f"--device={args.device}", f"--warmup={args.warmup}",
            f"--min-blocks={args.min_blocks}", f"--max-seconds={args.max_seconds}"]
    if obs:
        argv.append(f"--obs={obs}")
    if batch_size:
        argv.append(f"--batch-size={batch_size}")
    if kind == "authors":
        argv.append(f"--authors={args.authors}")
    return argv


def _run_worker(python: str, argv: list[str], threads: int, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    started = time.time()
    try:
        proc = subprocess.run([python, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "argv": argv, "load_before": load}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[:400], "argv": argv, "load_before": load}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(load_before=load, load_after=os.getloadavg()[0], wall_s=time.time() - started)
    return row


def _label(row: dict) -> str:
    return f"{row['agent']} {row['obs_type']}"


def _fmt_mem(row: dict) -> str:
    if row.get("peak_cuda_mb") is not None:
        return f"{row['peak_cuda_mb']:,.0f} (CUDA)"
    return f"{row['peak_rss_mb']:,.0f}"


def write_page(results: dict, path: Path) -> None:
    rows = [r for r in results["rows"] if "error" not in r]
    errors = [r for r in results["rows"] if "error" in r]
    machine = results["machine"]
    lines = ["# Learner benchmark: updates/s and memory of every agent's update", "",
             "Written by `scripts/bench_learner.py` (see its docstring for the method). Each row is a fresh process; "
             "updates/s is the median over timed updates after warm-up on batches sampled with the agent's own "
             "`sample_spec` from a replay buffer of random observations (sampling not timed); peak memory is the "
             "process's peak RSS in MB (buffer, batches and the torch runtime included; `rss0` is the RSS before "
             "the agent was built) or, on CUDA, `torch.cuda.max_memory_allocated`. The load average (1 min) beside "
             "each row was read just before it started: on a shared machine, compare rows of one run, and ratios "
             "within one agent and thread count.", "",
             f"- machine: {machine['description']}", f"- date: {results['date']}",
             f"- torch {machine['torch']}, Python {machine['python']}",
             f"- command: `{results['command']}`", f"- total wall time: {results['wall_s'] / 60:.1f} min", "",
             "Variants: **off** = per-parameter Adam loop, NCHW encoders, one host sync per update (before issue 19); "
             "**on** = today's defaults (exact: `foreach` Adam on the CPU / fused on CUDA, metrics stay on the "
             "device, METRA's Dreamer CNN channels_last as before); **fast** = on + opt-ins that round differently "
             "(fused Adam on the CPU, channels_last for every pixel encoder); **bf16** = on + bfloat16 autocast; "
             "**compile** = on + `torch.compile` of the networks.", ""]
    by_device: dict[str, list[dict]] = {}
    for r in rows:
        by_device.setdefault(r["device"], []).append(r)
    for device, drows in by_device.items():
        lines += [f"## {device.upper()}", ""]
        ours = [r for r in drows if r["kind"] == "ours"]
        lines += ["| agent | preset (batch) | threads | variant | updates/s | s/update | vs off | peak MB (rss0) | "
                  "load |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        keyed = {(_label(r), r["threads"], r["variant"]): r for r in ours}
        for r in ours:
            off = keyed.get((_label(r), r["threads"], "off"))
            ratio = f"{r['updates_per_s'] / off['updates_per_s']:.2f}x" if off else ""
            lines.append(f"| {_label(r)} | {r['preset']} ({r['batch_size']}) | {r['threads']} | {r['variant']} | "
                         f"{r['updates_per_s']:.3g} | {r['median_s']:.3g} | {ratio} | {_fmt_mem(r)} "
                         f"({r['rss_at_start_mb']:,.0f}) | {r['load_before']:.2f} |")
        others = [r for r in drows if r["kind"] in ("authors", "metra_transcribed")]
        if others:
            lines += ["", "### Beside the authors' update", "",
                      "Same batch and network sizes; ours is the `on` row of the same run and thread count.", "",
                      "| agent | batch | threads | authors' | updates/s | ours (on) updates/s | ours / authors' | "
                      "authors' peak MB | load |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
            for r in others:
                mine = keyed.get((_label(r), r["threads"], "on"))
                ratio = f"**{mine['updates_per_s'] / r['updates_per_s']:.2f}x**" if mine else ""
                lines.append(f"| {_label(r)} | {r['batch_size']} | {r['threads']} | {r['variant']} | "
                             f"{r['updates_per_s']:.3g} | {mine['updates_per_s']:.3g} | {ratio} | {_fmt_mem(r)} | "
                             f"{r['load_before']:.2f} |" if mine else
                             f"| {_label(r)} | {r['batch_size']} | {r['threads']} | {r['variant']} | "
                             f"{r['updates_per_s']:.3g} | | | {_fmt_mem(r)} | {r['load_before']:.2f} |")
        ab = [r for r in drows if r["kind"] == "ab"]
        if ab:
            names = ab[0]["variants"]
            lines += ["", "### Same-process A/B (speed-ups off vs on)", "",
                      "The variants built side by side in one process from the same weights, their updates interleaved "
                      "(the order alternating each round), so load changes hit all alike; the ratio is the median over "
                      f"rounds of t({names[0]}) / t(variant): above 1 = faster than {names[0]}.", "",
                      "| agent | preset (batch) | threads | rounds | " + " | ".join(f"{n} s/update" for n in names)
                      + " | " + " | ".join(f"{n} vs {names[0]}" for n in names[1:]) + " | load |",
                      "|---|---|---:|---:|" + "---:|" * (2 * len(names) - 1) + "---:|"]
            for r in ab:
                lines.append(f"| {_label(r)} | {r['preset']} ({r['batch_size']}) | {r['threads']} | {r['rounds']} | "
                             + " | ".join(f"{r['median_s'][n]:.3g}" for n in names) + " | "
                             + " | ".join(f"**{r['ratio_vs_first'][n]:.2f}x**" for n in names[1:])
                             + f" | {r['load_before']:.2f} |")
        bf = [(keyed.get((_label(r), r["threads"], "on")), r) for r in ours if r["variant"] == "bf16"]
        bf = [(a, b) for a, b in bf if a and a.get("metrics") and b.get("metrics")]
        if bf:
            lines += ["", "### bf16 autocast: losses after the same updates", "",
                      "Both runs start from the same weights and see the same batches and random draws; the values are "
                      "the update's metrics at the same update (warm-up + timed), fp32 (`on`) vs bf16.", "",
                      "| agent | metric | update | fp32 | bf16 | rel. diff |", "|---|---|---:|---:|---:|---:|"]
            for a, b in bf:
                keys = [k for k in a["metrics"] if "loss" in k][:3] or list(a["metrics"])[:3]
                for k in keys:
                    x, y = a["metrics"][k], b["metrics"].get(k, float("nan"))
                    rel = abs(y - x) / max(abs(x), 1e-12)
                    lines.append(f"| {_label(a)} | {k} | {a['metrics_at_update']} | {x:.5g} | {y:.5g} | {rel:.2%} |")
        lines.append("")
    if errors:
        lines += ["## Rows that did not run", ""]
        lines += [f"- `{' '.join(r['argv'])}`: {r['error']}" for r in errors]
        lines.append("")
    lines += results.get("notes", [])
    path.write_text("\n".join(lines) + "\n")


def _machine(device: str) -> dict:
    import torch

    from latentrl.training.logger import processor_name

    desc = f"{os.cpu_count()}-core {processor_name('cpu')}"
    if device.startswith("cuda") and torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return {"description": desc, "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (rows for that device)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads; each a separate set of rows")
    p.add_argument("--variants", nargs="+", default=["off", "on", "fast", "bf16"], choices=list(VARIANTS))
    p.add_argument("--variants-more-threads", nargs="+", default=["off", "on"],
                   help="variants run at the thread counts after the first (keeps the run short)")
    p.add_argument("--agents", nargs="+", default=None, help="agent[:obs] cases (default: every case)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--fallback-preset", action="append", default=[],
                   help="agent[:obs]=preset for a case whose paper preset does not fit (labelled in the page)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-blocks", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per row before it is given up")
    p.add_argument("--authors", default=None, help="a checkout of the authors' TD-JEPA repository (metamotivo/)")
    p.add_argument("--authors-python", default=None, help="the Python that runs the authors' code")
    p.add_argument("--no-metra-transcribed", action="store_true")
    p.add_argument("--out", default=str(OUT_MD))
    p.add_argument("--json", default=None, help="results JSON (default docs/bench_learner/results_<device>.json)")
    p.add_argument("--from-json", nargs="*", default=None, help="only write the page from these results files")
    p.add_argument("--notes", default=None, help="a markdown file appended to the page (the reading of the figures)")
    # worker mode
    p.add_argument("--worker", choices=["ours", "authors", "metra_transcribed", "ab"], default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--ab", nargs="+", default=None, metavar="VARIANT",
                   help="instead of the rows: same-process interleaved A/B of these variants (e.g. off on fast), "
                        "one process per case and thread count")
    p.add_argument("--agent", help=argparse.SUPPRESS)
    p.add_argument("--obs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="on", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.threads = args.threads[0]
        run = {"ours": run_ours, "authors": run_authors, "metra_transcribed": run_metra_transcribed,
               "ab": run_ab}[args.worker]
        print(json.dumps(run(args)))
        return

    out_dir = OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        merged = None
        for f in args.from_json:
            data = json.loads(Path(f).read_text())
            if merged is None:
                merged = data
            else:
                merged["rows"] += data["rows"]
                merged["notes"] = merged.get("notes", []) + data.get("notes", [])
                merged["command"] += "; python scripts/bench_learner.py " + data["command"].split(".py ", 1)[-1]
                merged["wall_s"] += data["wall_s"]
        if args.notes:
            merged["notes"] = merged.get("notes", []) + [Path(args.notes).read_text()]
        write_page(merged, Path(args.out))
        return

    fallback = dict(item.split("=", 1) for item in args.fallback_preset)
    cases = CASES
    if args.agents:
        cases = [(a.split(":")[0], a.split(":")[1] if ":" in a else None) for a in args.agents]
    started = time.time()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "command": "python scripts/bench_learner.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": _machine(args.device), "rows": []}
    json_path = Path(args.json) if args.json else out_dir / f"results_{args.device.split(':')[0]}.json"

    def add(row: dict) -> None:
        results["rows"].append(row)
        results["wall_s"] = time.time() - started
        json_path.write_text(json.dumps(results, indent=1))
        if "error" in row:
            shown = row["error"]
        elif row["kind"] == "ab":
            shown = ", ".join(f"{n} {row['median_s'][n]:.3g} s ({row['ratio_vs_first'][n]:.2f}x)"
                              for n in row["variants"])
        else:
            shown = f"{row['updates_per_s']:.3g} updates/s, peak {_fmt_mem(row)} MB"
        print(f"[bench_learner] {' '.join(row.get('argv', [])) or row.get('variant')}: {shown} "
              f"(load {row.get('load_before', 0):.2f})", flush=True)

    if args.ab:  # same-process A/B rows only
        for threads in args.threads:
            for agent, obs in cases:
                preset = fallback.get(f"{agent}:{obs}" if obs else agent, args.preset)
                argv_ab = _worker_argv("ab", agent, obs, preset, threads, "ab", args) + ["--ab", *args.ab]
                row = _run_worker(sys.executable, argv_ab, threads, args.timeout)
                row.setdefault("argv", argv_ab)
                add(row)
        results["wall_s"] = time.time() - started
        json_path.write_text(json.dumps(results, indent=1))
        return
    for i, threads in enumerate(args.threads):  # the first thread count first: 2 threads last on a shared machine
        variants = args.variants if i == 0 else [v for v in args.variants if v in args.variants_more_threads]
        for agent, obs in cases:
            key = f"{agent}:{obs}" if obs else agent
            preset = fallback.get(key, args.preset)
            for variant in variants:
                row = _run_worker(sys.executable, _worker_argv("ours", agent, obs, preset, threads, variant, args),
                                  threads, args.timeout)
                row.setdefault("argv", _worker_argv("ours", agent, obs, preset, threads, variant, args))
                add(row)
            if agent == "metra" and not args.no_metra_transcribed:
                argv_t = _worker_argv("metra_transcribed", agent, obs, preset, threads, "authors", args)
                row = _run_worker(sys.executable, argv_t, threads, args.timeout)
                row.setdefault("argv", argv_t)
                add(row)
            if agent in AUTHORS_ARCHI and args.authors and args.authors_python:
                ours = [r for r in results["rows"] if r.get("agent") == agent and r.get("variant") == "on"
                        and r.get("threads") == threads and r.get("obs_type") == (obs or r.get("obs_type"))]
                batch = ours[-1]["batch_size"] if ours else (512 if obs == "pixels" else 1024)
                argv_a = _worker_argv("authors", agent, obs, preset, threads, "authors", args, batch_size=batch)
                row = _run_worker(args.authors_python, argv_a, threads, args.timeout)
                row.setdefault("argv", argv_a)
                add(row)
    results["wall_s"] = time.time() - started
    json_path.write_text(json.dumps(results, indent=1))
    write_page(results, Path(args.out))


if __name__ == "__main__":
    main()
