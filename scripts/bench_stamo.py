#!/usr/bin/env python
"""Small-scale benchmark of the StaMo agent (issue 16; spec ``shared/algorithms/stamo.md`` §6 and §8) on
dm_control reacher-easy or cheetah-run (``--task``), 64x64 pixels, action repeat 4, random actions held
1-4 steps.

    python scripts/bench_stamo.py data  --out-dir /tmp/stamo            # collect (~1 min)
    python scripts/bench_stamo.py data  --out-dir /tmp/stamo_cheetah --task cheetah-run
    python scripts/bench_stamo.py train --out-dir /tmp/stamo --train-seconds 900
    python scripts/bench_stamo.py eval  --out-dir /tmp/stamo            # checks 3-8, figures, report
    python scripts/bench_stamo.py all --quick --out-dir /tmp/stamo      # everything, tiny

1. ``data``: ``--episodes`` episodes of ``--episode-length`` steps with the agent's collection policy
   (uniform random actions held 1-4 steps), written as arrays (``episodes.pt``: pixels, state,
   physics, actions) and as a replay dataset (``dataset/``) in which 1 episode in 5 keeps its actions
   and the others are stored as action-less video (``extend(..., actions=False)``), for
   ``train_agent.py agent=stamo data=<out-dir>/dataset``. Episodes are split 80/20 by episode. The task is
   kept in ``episodes.pt``; ``train`` and ``eval`` read it from there.
2. ``train``: the diffusion autoencoder alone (flow loss, AdamW), on single frames of the training
   episodes, for ``--updates`` updates or ``--train-seconds`` seconds; times each update.
3. ``eval`` on the held-out episodes: reconstruction PSNR (Euler, ``--sample-steps``) vs the dataset-mean
   image and vs the decoder with zeroed tokens; a linear probe tokens -> proprioceptive positions (R^2; the
   task's joints, ``TASKS``); latent-action probes at k in {1, 2, 4, 8} vs the same MLP on 8x8x3 pooled pixel
   differences and vs the mean action; interpolation (Spearman rho of the decoded angle readout vs alpha); motion
   transfer (cosine of decoded vs source angle change), both read out by the linear probe and by an MLP probe and
   judged on the one with the higher held-out R^2; goal reaching from goal images vs random and
   zero-action policies (reacher only: the spec's goal check is reacher's); co-training of the goal-conditioned
   BC policy on 1 part labelled, 1 part + 4 parts pseudo-labelled, and 5 parts labelled data (and, reported
   beside it, the paper's form: 1 part + 4 parts with the latent actions as a second head's targets). Writes
   ``docs/bench_stamo.md`` (``--report``; cheetah: ``docs/bench_stamo_cheetah.md``), ``results.json`` and
   figures (``--fig-dir``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentrl.agents.base import GoalObservation, Policy, UniformRandomPolicy, resolve_device
from latentrl.agents.stamo import StaMoAgent, StaMoCollectPolicy, StaMoGoalPolicy, StaMoHeadPolicy
from latentrl.training.checkpoint import load_plain, save_atomic
from latentrl.training.logger import write_report_page
from latentrl.world_models.layers import mlp
from latentrl.world_models.stamo import COMPRESSIONS

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TaskSpec:
    """What the probes read for one task: the proprioceptive positions are ``physics[..., columns]`` (qpos
    entries), one per joint; a joint that wraps around is probed as (sin, cos), the others as they are."""

    action_dim: int
    joints: tuple[str, ...]
    columns: tuple[int, ...]
    wrapped: tuple[bool, ...]
    description: str
    goal_reaching: bool = False  # the goal check (spec 8.6) is reacher's: its goal is a pose of two joints

    def coords(self, physics: torch.Tensor) -> torch.Tensor:
        return physics[..., list(self.columns)].float()

    def features(self, q: torch.Tensor) -> torch.Tensor:
        """The probe's regression target: (sin, cos) of each wrapping joint, the value of the others."""
        parts = []
        for j, wraps in enumerate(self.wrapped):
            parts += [q[..., j].sin(), q[..., j].cos()] if wraps else [q[..., j]]
        return torch.stack(parts, -1)

    def feature_names(self) -> list[str]:
        return [n for name, wraps in zip(self.joints, self.wrapped, strict=True)
                for n in ((f"sin {name}", f"cos {name}") if wraps else (name,))]

    def from_features(self, f: torch.Tensor) -> torch.Tensor:
        """Joint values from (predicted) features: atan2 of (sin, cos) for a wrapping joint."""
        out, i = [], 0
        for wraps in self.wrapped:
            out.append(torch.atan2(f[..., i], f[..., i + 1]) if wraps else f[..., i])
            i += 2 if wraps else 1
        return torch.stack(out, -1)

    def difference(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a - b per joint, wrapped to [-pi, pi) where the joint wraps."""
        d = a - b
        mask = torch.tensor(self.wrapped)
        return torch.where(mask, wrap(d), d)


TASKS = {
    # physics = (qpos, qvel); qpos = (shoulder, wrist, target x, target y). Both probed as (sin, cos), as before
    # this table existed (the shoulder is unlimited; the wrist's +-160 degrees make sin/cos harmless).
    "reacher-easy": TaskSpec(2, ("q1", "q2"), (0, 1), (True, True),
                             "(sin, cos) of both joint angles (reacher's proprioceptive positions; sin/cos because "
                             "the shoulder wraps)", goal_reaching=True),
    # qpos = (rootx, rootz, rooty, bthigh, bshin, bfoot, fthigh, fshin, ffoot). rootx is left out: the camera
    # tracks the torso, so forward position is not in a frame. rooty (the torso's pitch) wraps when it flips.
    "cheetah-run": TaskSpec(6, ("rootz", "rooty", "bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot"),
                            (1, 2, 3, 4, 5, 6, 7, 8), (False, True, False, False, False, False, False, False),
                            "cheetah's proprioceptive positions: torso height (m), torso pitch as (sin, cos), and "
                            "the six leg joint angles (rad); the forward position is left out because the camera "
                            "tracks the torso"),
}
DEFAULT_TASK = "reacher-easy"  # and the task of an episodes.pt written before the task was stored in it


class ZeroPolicy(Policy):
    """The zero action at every step (the 'stay' baseline of goal reaching)."""

    def __init__(self, action_dim: int):
        super().__init__(None, (), action_dim, explore=False)

    def act(self, x, carry, is_first):
        return torch.zeros(carry.batch_size[0], self.action_dim), carry


def log(msg: str) -> None:
    print(f"[bench_stamo {dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {msg}", flush=True)


# autoencoder settings the command line may set; a checkpoint keeps them ("config") and eval reads them back
AUTOENCODER_FLAGS = ("sigma_shift", "compression")
# what checkpoints from before a setting existed were trained with
OLD_CHECKPOINT_CONFIG = {"sigma_shift": 1.0, "compression": "queries"}


def make_agent(args, saved: dict | None = None, device: str = "cpu") -> StaMoAgent:
    """The agent of ``--preset`` (on ``device``) with the autoencoder settings of a checkpoint (``saved``) or of
    the command line; a command line that contradicts the checkpoint is refused rather than silently mixed."""
    overrides = {"sample_steps": args.sample_steps}
    for key in AUTOENCODER_FLAGS:
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if saved is not None:
        clash = [f"{k}={saved[k]}" for k in AUTOENCODER_FLAGS if k in overrides and overrides[k] != saved[k]]
        if saved.get("preset", args.preset) != args.preset:
            clash.append(f"--preset {saved['preset']}")
        if clash:
            raise SystemExit(f"bench_stamo: the checkpoint in {args.out_dir} was trained with {', '.join(clash)}; "
                             "drop the flag or train anew in another --out-dir (or with --restart)")
        overrides.update({k: saved[k] for k in AUTOENCODER_FLAGS})
    action_dim = TASKS[getattr(args, "task", None) or DEFAULT_TASK].action_dim
    return StaMoAgent(StaMoAgent.make_config(args.preset, **overrides), (3, 64, 64), action_dim, device=device)


def saved_config(state: dict) -> dict:
    """The autoencoder settings a checkpoint was trained with."""
    return {**OLD_CHECKPOINT_CONFIG, **state.get("config", {})}


# ---------------------------------------------------------------------------------------------- data


def collect(args) -> None:
    from latentrl.envs import make_env
    from latentrl.replay import ReplayBuffer

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.task = args.task or DEFAULT_TASK
    spec = TASKS[args.task]
    env = make_env(args.task, obs=("pixels", "state", "physics"), image_size=64, action_repeat=4, num_envs=1,
                   num_workers=0, seed=args.seed, episode_length=args.episode_length)
    agent = make_agent(args)
    policy = StaMoCollectPolicy("pixels", (3, 64, 64), spec.action_dim, agent.latent_dim, hold_min=1, hold_max=4)
    torch.manual_seed(args.seed)
    buffer = ReplayBuffer(args.episodes * (args.episode_length + 2) + 8)
    arrays = {k: [] for k in ("pixels", "state", "physics", "action")}
    t0 = time.time()
    for e in range(args.episodes):
        td = env.reset()
        carry = policy.init_carry(1)
        steps, frames = [], {k: [] for k in ("pixels", "state", "physics")}
        for t in range(args.episode_length):
            for k in frames:
                frames[k].append(td[k][0].clone())
            action, carry = policy.step(td.exclude("action", "next"), carry, torch.tensor([t == 0]))
            td["action"] = action
            td[LATENT] = policy.extras(carry)[LATENT]
            td, td_next = env.step_and_maybe_reset(td)
            steps.append(td.clone())
            td = td_next
        last = steps[-1]["next"]
        for k in frames:
            frames[k].append(last[k][0].clone())
            arrays[k].append(torch.stack(frames[k]))
        arrays["action"].append(torch.stack([s["action"][0] for s in steps]))
        rollout_td = torch.stack(steps, dim=1)  # [1, T]
        labelled = e % 5 == 0  # 1 part with actions, 4 parts as video
        buffer.extend(rollout_td, actions=labelled, action_shape=[spec.action_dim])
    env.close()
    data = {k: torch.stack(v) for k, v in arrays.items()}
    data["labelled"] = torch.tensor([e % 5 == 0 for e in range(args.episodes)])
    data["task"] = args.task
    save_atomic(data, out / "episodes.pt")
    buffer.save(out / "dataset", overwrite=True)
    log(f"collected {args.episodes} episodes x {args.episode_length} steps in {time.time() - t0:.0f}s -> {out}")


LATENT = "latent_action"


def load_data(args):
    """The episodes of ``--out-dir`` with a train / held-out mask; sets ``args.task`` to the data's task (and
    refuses a ``--task`` that contradicts it)."""
    path = Path(args.out_dir) / "episodes.pt"
    if not path.exists():
        raise SystemExit(f"bench_stamo: no {path}; run `bench_stamo.py data --out-dir {args.out_dir}` first")
    data = load_plain(path)
    task = data.get("task", DEFAULT_TASK)
    if args.task is not None and args.task != task:
        raise SystemExit(f"bench_stamo: {path} holds {task} episodes, not --task {args.task}; collect them into "
                         "another --out-dir")
    args.task = task
    n = data["pixels"].shape[0]
    test = torch.arange(n) % 5 == 4  # 20% of episodes held out (one of every five)
    return data, ~test, test


# --------------------------------------------------------------------------------------------- train


def train(args) -> None:
    """Train the autoencoder on the training episodes' frames (on ``--device``; the frames stay on the host and
    each batch is copied over), resuming from ``--out-dir``'s checkpoint unless ``--restart``; a checkpoint every
    500 updates and at the end, its tensors on the CPU whatever the device."""
    data, train_mask, _ = load_data(args)
    frames = data["pixels"][train_mask].flatten(0, 1)
    out = Path(args.out_dir)
    ckpt = out / "stamo_wm.pt"
    start, history = 0, []
    resume = ckpt.exists() and not args.restart
    state = load_plain(ckpt, map_location=args.device) if resume else None
    agent = make_agent(args, saved_config(state) if resume else None, device=args.device)
    cuda = agent.device.type == "cuda"
    config = {"preset": args.preset, **{key: getattr(agent.config, key) for key in AUTOENCODER_FLAGS}}
    if resume:
        agent.world_model.load_state_dict(state["world_model"])
        agent._optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["updates"]), state["history"]
        log(f"resuming at update {start}")
    if args.lr is not None:
        for group in agent._optimizer.param_groups:
            group["lr"] = args.lr
    wm, opt = agent.world_model, agent._optimizer
    wm.train()
    g = torch.Generator().manual_seed(args.seed + start)
    t0, times = time.time(), []
    step = start
    while step < args.updates and time.time() - t0 < args.train_seconds:
        idx = torch.randint(len(frames), (agent.config.batch_size,), generator=g)
        ts = time.perf_counter()
        loss = wm.flow_loss(frames[idx].to(agent.device, non_blocking=True))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()  # the time of the step, not of queueing its kernels
        times.append(time.perf_counter() - ts)
        step += 1
        history.append([step, float(loss.detach())])
        if step % 100 == 0:
            log(f"update {step}: flow mse {np.mean([h[1] for h in history[-100:]]):.4f}, "
                f"{np.median(times[-100:]) * 1000:.0f} ms/update")
        if step % 500 == 0:
            save_checkpoint(ckpt, wm, opt, step, history, config)
    save_checkpoint(ckpt, wm, opt, step, history, config)
    timing = {"updates": step, "batch_size": agent.config.batch_size, "preset": args.preset, "lr": args.lr,
              "device": str(agent.device),
              "median_update_ms": float(np.median(times) * 1000) if times else None,
              "threads": torch.get_num_threads(), "seconds_this_run": time.time() - t0}
    (out / "train_timing.json").write_text(json.dumps(timing, indent=2))
    log(f"trained to update {step}; {timing}")


def save_checkpoint(path: Path, wm, opt, step: int, history: list, config: dict) -> None:
    """The autoencoder, its AdamW state and its training record, with every tensor on the CPU (a checkpoint
    trained on a GPU loads here), written to a temporary file and renamed: a crash never leaves half a file."""
    state = {"world_model": wm.state_dict(), "optimizer": opt.state_dict(), "updates": step, "history": history,
             "config": config}
    save_atomic(_to_cpu(state), path)


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to_cpu(v) for v in x)
    return x


# ----------------------------------------------------------------------------------------------- eval


def load_model(args, checkpoint: str | Path | None = None, state: dict | None = None) -> StaMoAgent:
    """The trained autoencoder of ``--out-dir`` (or of another ``checkpoint`` of the run: a snapshot; or a
    checkpoint ``state`` already read), in eval mode, with its update count and loss record."""
    if state is None:
        state = load_plain(checkpoint or Path(args.out_dir) / "stamo_wm.pt")
    agent = make_agent(args, saved_config(state))
    agent.world_model.load_state_dict(state["world_model"])
    agent.eval()
    agent.trained_updates = int(state["updates"])
    agent.history = state["history"]
    return agent


@torch.no_grad()
def encode_all(wm, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    flat = pixels.flatten(0, 1)
    out = torch.cat([wm.encode(flat[i:i + batch]) for i in range(0, len(flat), batch)])
    return out.reshape(*pixels.shape[:2], *out.shape[1:])


@torch.no_grad()
def decode(wm, tokens: torch.Tensor, steps: int, seed: int = 0, blocks: int = 1) -> torch.Tensor:
    """Euler-sample frames from ``tokens`` with fixed noise of ``seed``. With ``blocks`` > 1 the tokens are that many
    blocks of the same cases (the alphas of an interpolation, a frame before and after a transfer): row i of every
    block starts from case i's noise, so the blocks' frames differ by their tokens alone, not by the sampler's
    draw."""
    if tokens.shape[0] % blocks:
        raise ValueError(f"{tokens.shape[0]} token rows do not split into {blocks} blocks")
    noise = torch.randn((tokens.shape[0] // blocks, *wm.obs_shape), generator=torch.Generator().manual_seed(seed))
    noise = noise.repeat(blocks, *([1] * len(wm.obs_shape)))
    return torch.cat([wm.decode(tokens[i:i + 32], steps=steps, noise=noise[i:i + 32])["pixels"]
                      for i in range(0, len(tokens), 32)])


def interpolation_frames(wm, z1: torch.Tensor, z2: torch.Tensor, alphas: torch.Tensor, steps: int,
                         seed: int = 1) -> torch.Tensor:
    """Check 6's frames D((1 - a) z1 + a z2) for every a, ``[len(alphas) * N, C, H, W]`` in alpha blocks; one noise
    per pair for every alpha, so that along a row only the tokens change."""
    interp = torch.cat([(1 - a) * z1 + a * z2 for a in alphas])
    return decode(wm, interp, steps, seed=seed, blocks=len(alphas))


def transfer_frames(wm, base_tokens: torch.Tensor, delta: torch.Tensor, steps: int, seed: int = 2):
    """Check 7's frames D(E(x)) and D(E(x) + dz) from the same noise per case: the decoded change is the token
    difference's, not two draws' (with independent draws a move of a few pixels drowns in the sampler's spread)."""
    both = decode(wm, torch.cat([base_tokens, base_tokens + delta]), steps, seed=seed, blocks=2)
    return both[:len(base_tokens)], both[len(base_tokens):]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0 ** 2 / mse)


def wrap(x: torch.Tensor) -> torch.Tensor:
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-3):
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.linalg.solve(xs.T @ xs + lam * len(x) * torch.eye(xs.shape[1], dtype=x.dtype), xs.T @ y)
    return lambda z: (torch.cat([(z.double() - mu) / sd, torch.ones(len(z), 1, dtype=x.dtype)], 1) @ w).float()


def r2(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1 - (pred - y).square().sum(0) / (y - y.mean(0)).square().sum(0)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, updates: int, seed: int, hidden: int = 256):
    """An MLP ``in -> hidden -> hidden -> out`` on standardised inputs, Adam 1e-3, batch 256, MSE; the last 15% of
    the rows (rows are ordered by episode: the last training episodes) pick the best of every 100 updates."""
    import copy

    torch.manual_seed(seed)
    cut = int(0.85 * len(x))
    (x, xv), (y, yv) = (x[:cut], x[cut:]), (y[:cut], y[cut:])
    # a floor under each input's spread: a column that (nearly) never changes in training (cheetah's sky in a
    # pooled pixel difference) would otherwise blow up a held-out value by 1e6 (held-out MSE 369 at k = 1)
    mu, sd = x.mean(0), x.std(0)
    sd = sd.clamp_min(1e-2 * float(sd.mean()) + 1e-6)
    net = mlp(x.shape[1], [hidden, hidden], y.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    best, best_state = float("inf"), copy.deepcopy(net.state_dict())
    for i in range(updates):
        idx = torch.randint(len(x), (256,), generator=g)
        loss = (net((x[idx] - mu) / sd) - y[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (i + 1) % 100 == 0 or i + 1 == updates:
            with torch.no_grad():
                val = float((net((xv - mu) / sd) - yv).square().mean())
            if val < best:
                best, best_state = val, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    net.eval()
    return lambda z: net((z - mu) / sd).detach()


def offset_pairs(n_steps: int, k: int, episodes: torch.Tensor):
    """(episode, t) of every pair (o_t, o_{t+k}) with the k actions recorded: t + k <= n_steps."""
    t = torch.arange(n_steps - k + 1)
    return episodes.repeat_interleave(len(t)), t.repeat(len(episodes))


def action_chunks(act: torch.Tensor, e: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
    """The k actions a_t .. a_{t+k-1} of each row (e, t): [rows, k, action_dim]."""
    return torch.stack([act[e, t + i] for i in range(k)], 1)


def labelled_part(train_eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Co-training's split of the training episodes (Table 5's 1 part in 5): every fifth keeps its actions, the
    other four parts are video. Returns (labelled, video)."""
    local = torch.arange(len(train_eps))
    return train_eps[local % 5 == 0], train_eps[local % 5 != 0]


def pooled_pixel_diff(pixels: torch.Tensor, e, t, k) -> torch.Tensor:
    d = pixels[e, t + k].float() - pixels[e, t].float()
    return torch.nn.functional.adaptive_avg_pool2d(d, 8).flatten(1) / 255.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if np.std(ry) == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def state_readouts(flat_tokens: torch.Tensor, q: torch.Tensor, spec: TaskSpec, train_eps: torch.Tensor,
                   test_eps: torch.Tensor, mlp_updates: int | None, seed: int) -> tuple[dict, dict]:
    """Readouts tokens -> the task's joint features (``spec.features``), fitted on the training episodes' frames:
    check 4's linear (ridge) probe and, unless ``mlp_updates`` is None, an MLP probe on the same rows (seed
    ``seed``). Returns ``{name: readout}`` and ``{name: held-out R^2 per output}``."""
    x_train, x_test = flat_tokens[train_eps].flatten(0, 1), flat_tokens[test_eps].flatten(0, 1)
    y_train, y_test = spec.features(q[train_eps]).flatten(0, 1), spec.features(q[test_eps]).flatten(0, 1)
    readouts = {"linear": ridge(x_train, y_train)}
    if mlp_updates is not None:
        readouts["mlp"] = fit_mlp(x_train, y_train, mlp_updates, seed=seed)
    return readouts, {name: r2(f(x_test), y_test) for name, f in readouts.items()}


@torch.no_grad()
def read_joints(wm, frames: torch.Tensor, readouts: dict, spec: TaskSpec) -> dict:
    """The joints of decoded ``frames`` ``[N, C, H, W]`` (floats in [0, 255]) as each readout reads them: the frames
    are rounded to pixels and encoded once, ``{name: [N, joints]}``."""
    tokens = encode_all(wm, frames.round().to(torch.uint8)[None])[0].flatten(1)
    return {name: spec.from_features(f(tokens)) for name, f in readouts.items()}


def signed_changes(reading: torch.Tensor, true_move: torch.Tensor, spec: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """Check 6's moving (pair, joint)s of one readout's joints along the rows ``reading`` ``[len(alphas), N,
    joints]``: those whose true move over the k steps lies in (0.1, 2.5) rad. Returns each one's change from row
    0 (wrapped where the joint wraps), signed by the true move, ``[cases, len(alphas)]``, and ``|true move|``
    ``[cases]``, in pair-major order."""
    paths, moves = [], []
    for i in range(reading.shape[1]):
        change = spec.difference(reading[:, i], reading[0, i])
        for j in range(reading.shape[2]):
            m = float(true_move[i, j])
            if 0.1 < abs(m) < 2.5:
                paths.append(np.sign(m) * change[:, j].numpy())
                moves.append(abs(m))
    return np.array(paths).reshape(len(paths), reading.shape[0]), np.array(moves)


def interpolation_scores(reading: torch.Tensor, alphas: torch.Tensor, true_move: torch.Tensor,
                         spec: TaskSpec) -> dict:
    """Check 6's score of one readout's joints along the interpolation rows, ``reading`` ``[len(alphas), N,
    joints]``: for every moving (pair, joint) (:func:`signed_changes`), Spearman's rho between alpha and the
    joint's signed change from alpha 0. Returns the cases, their mean rho and the share above 0.9."""
    rhos = [spearman(alphas.numpy(), path) for path in signed_changes(reading, true_move, spec)[0]]
    return {"cases": len(rhos), "spearman_mean": float(np.mean(rhos)) if rhos else None,
            "share_rho_above_0.9": float(np.mean(np.array(rhos) > 0.9)) if rhos else None}


def fit_goal_heads(agent: StaMoAgent, flat_tokens: torch.Tensor, act: torch.Tensor, train_eps: torch.Tensor,
                   test_eps: torch.Tensor, updates: int, seed: int) -> dict:
    """Train the agent's own goal-policy heads on the training episodes' tokens (``train`` fits the autoencoder
    alone): the latent-action probe of ``goal_offset`` on its k-step pairs (as :meth:`StaMoAgent.probe_loss`),
    and the goal head on hindsight pairs ``(o_t, o_{t+k}, a_t)`` for every k in ``probe_offsets`` (as
    :meth:`StaMoAgent.goal_head_loss`); Adam at the config's rates, batch 256, running statistics folded over
    all training pairs first. Returns their held-out MSEs beside the mean-action predictor's."""
    cfg = agent.config
    n_steps = act.shape[1]
    g = torch.Generator().manual_seed(seed)
    out = {}

    def train(module, lr, inputs, target, forward):
        opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
        module.train()
        for _ in range(updates):
            idx = torch.randint(len(target), (256,), generator=g)
            loss = (forward(*(x[idx] for x in inputs)) - target[idx]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        module.eval()

    # the probe of goal_offset: Delta z -> a_{t:t+k}
    k = cfg.goal_offset
    probe = agent.probes[str(k)]
    (e_tr, t_tr), (e_te, t_te) = offset_pairs(n_steps, k, train_eps), offset_pairs(n_steps, k, test_eps)
    chunk = lambda e, t: action_chunks(act, e, t, k)  # noqa: E731
    dz_tr = flat_tokens[e_tr, t_tr + k] - flat_tokens[e_tr, t_tr]
    probe.observe(dz_tr)
    train(probe, cfg.probe_lr, (dz_tr,), chunk(e_tr, t_tr), probe)
    with torch.no_grad():
        y_te = chunk(e_te, t_te)
        out["probe"] = {"k": k, "heldout_mse": float((probe(flat_tokens[e_te, t_te + k] - flat_tokens[e_te, t_te])
                                                      - y_te).square().mean()),
                        "mean_action_mse": float((chunk(e_tr, t_tr).mean(0) - y_te).square().mean())}
    # the goal head: (E(o_t), E(o_{t+k}) - E(o_t)) -> a_t over every k in probe_offsets
    if agent.goal_head is not None:
        def hindsight(eps):
            parts = [offset_pairs(n_steps, k, eps) + (k,) for k in cfg.probe_offsets]
            e = torch.cat([p[0] for p in parts])
            t = torch.cat([p[1] for p in parts])
            kk = torch.cat([torch.full_like(p[0], p[2]) for p in parts])
            return flat_tokens[e, t], flat_tokens[e, t + kk] - flat_tokens[e, t], act[e, t]

        tok_tr, d_tr, a_tr = hindsight(train_eps)
        head = agent.goal_head
        head.observe(tok_tr, d_tr)
        train(head, cfg.goal_head_lr, (tok_tr, d_tr), a_tr, head)
        tok_te, d_te, a_te = hindsight(test_eps)
        with torch.no_grad():
            out["goal_head"] = {"offsets": list(cfg.probe_offsets), "hidden": cfg.goal_head_hidden,
                                "heldout_mse": float((head(tok_te, d_te) - a_te).square().mean()),
                                "mean_action_mse": float((a_tr.mean(0) - a_te).square().mean())}
    out["updates"] = updates
    return out


def transfer_cosines(decoded_change: torch.Tensor, source_change: torch.Tensor) -> dict:
    """Check 7's figures from the decoded and the source joint-angle changes ``[N, J]``: the share of cases with a
    positive cosine (judged) and the mean cosine; and the same share over the sources that move by what check 6
    calls a move (norm above 0.1 rad, no joint beyond 2.5): a cosine with a change of a few hundredths of a
    radian is the readout's noise, so that share is reported beside the judged one."""
    cos = torch.nn.functional.cosine_similarity(decoded_change, source_change, dim=-1)
    moving = (source_change.norm(dim=-1) > 0.1) & (source_change.abs().max(dim=-1).values < 2.5)
    return {"share_positive_cosine": float((cos > 0).float().mean()), "mean_cosine": float(cos.mean()),
            "moving_cases": int(moving.sum()),
            "share_positive_cosine_moving": float((cos[moving] > 0).float().mean()) if moving.any() else None}


def evaluate(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_start = time.time()
    data, train_mask, test_mask = load_data(args)
    # the task of the data names the default page
    page = "bench_stamo" if args.task == DEFAULT_TASK else f"bench_stamo_{args.task.split('-')[0]}"
    # a --quick run never writes over the docs' page: its default page lies in --out-dir
    args.report = args.report or str((Path(args.out_dir) if args.quick else ROOT / "docs") / f"{page}.md")
    args.fig_dir = args.fig_dir or str(Path(args.report).with_suffix(""))
    fig_dir = Path(args.fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    # the agent's goal heads (fitted in eval, below) start from the global generator's draw when the agent is
    # built: seeded, the same command gives the same goal-reaching figures (before 2026-12-05 they varied by run)
    torch.manual_seed(args.seed)
    agent = load_model(args)
    spec = TASKS[args.task]
    wm = agent.world_model
    px, phys, act = data["pixels"], data["physics"], data["action"]
    n_ep, n_frames = px.shape[:2]
    train_eps, test_eps = train_mask.nonzero().flatten(), test_mask.nonzero().flatten()
    results: dict = {"setting": {"task": args.task, "episodes": n_ep, "episode_length": n_frames - 1,
                                 "train_episodes": len(train_eps), "test_episodes": len(test_eps),
                                 "preset": args.preset, "updates": agent.trained_updates,
                                 "compression": agent.config.compression, "sigma_shift": agent.config.sigma_shift,
                                 "sample_steps": args.sample_steps, "action_repeat": 4, "hold_steps": [1, 4]}}
    timing_file = Path(args.out_dir) / "train_timing.json"
    if timing_file.exists():
        results["train_timing"] = json.loads(timing_file.read_text())
    log("encoding every frame")
    tokens = encode_all(wm, px)  # [E, T, 2, D]
    flat_tokens = tokens.flatten(2)
    g = torch.Generator().manual_seed(args.seed)

    # ---- check 3: reconstruction
    pick_e = test_eps[torch.randint(len(test_eps), (args.eval_frames,), generator=g)]
    pick_t = torch.randint(n_frames, (args.eval_frames,), generator=g)
    originals = px[pick_e, pick_t]
    recon = decode(wm, tokens[pick_e, pick_t], args.sample_steps)
    zero = decode(wm, torch.zeros_like(tokens[pick_e, pick_t]), args.sample_steps)
    mean_image = px[train_eps].float().mean((0, 1))
    rec = {"psnr_tokens": float(psnr(recon, originals).mean()),
           "psnr_zero_tokens": float(psnr(zero, originals).mean()),
           "psnr_mean_image": float(psnr(mean_image.expand_as(originals), originals).mean())}
    rec["margin_over_mean_db"] = rec["psnr_tokens"] - rec["psnr_mean_image"]
    rec["margin_over_zero_db"] = rec["psnr_tokens"] - rec["psnr_zero_tokens"]
    rec["pass"] = rec["margin_over_mean_db"] >= 3 and rec["margin_over_zero_db"] >= 3
    results["reconstruction"] = rec
    log(f"reconstruction {rec}")
    n_show = min(8, args.eval_frames)
    fig, axes = plt.subplots(3, n_show, figsize=(1.6 * n_show, 5))
    for i in range(n_show):
        for r, (img, name) in enumerate(((originals, "original"), (recon, "decoded E(o)"), (zero, "zero tokens"))):
            ax = axes[r, i] if n_show > 1 else axes[r]
            ax.imshow(img[i].permute(1, 2, 0).clamp(0, 255).byte().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"held-out reconstructions ({args.sample_steps} Euler steps)")
    fig.tight_layout()
    fig.savefig(fig_dir / "reconstructions.png", dpi=80)
    plt.close(fig)

    # ---- check 4: linear probe tokens -> proprio positions (wrapping joints as sin / cos)
    # The readouts of checks 6 and 7 (the decoded frames' joints): check 4's linear probe and an MLP probe on the
    # same rows. Both are reported; the checks are judged on the one with the higher held-out R^2 (a readout that
    # cannot read a joint - reacher's sin q2 is linear R^2 0.15 - cannot say whether that joint moved).
    q = spec.coords(phys)
    readouts, readout_r2s = state_readouts(flat_tokens, q, spec, train_eps, test_eps, args.probe_updates,
                                           seed=args.seed + 31)
    r2s = readout_r2s["linear"]
    results["state_probe"] = {"r2_per_output": [float(v) for v in r2s], "r2_mean": float(r2s.mean()),
                              "outputs": spec.feature_names(), "pass": bool(r2s.mean() > 0.8)}
    log(f"state probe {results['state_probe']}")
    readout_r2 = {name: float(v.mean()) for name, v in readout_r2s.items()}
    judged_readout = max(readout_r2, key=readout_r2.get)
    results["readouts"] = {"r2_mean": readout_r2, "mlp_r2_per_output": [float(v) for v in readout_r2s["mlp"]],
                           "judged": judged_readout}
    log(f"readouts {results['readouts']}")

    # ---- check 5: latent-action probes vs pooled pixel differences vs the mean action
    probe_res = {}
    for k in (1, 2, 4, 8):
        e_tr, t_tr = offset_pairs(n_frames - 1, k, train_eps)
        e_te, t_te = offset_pairs(n_frames - 1, k, test_eps)
        def chunk(e, t, k=k):
            return action_chunks(act, e, t, k).flatten(1)

        y_tr, y_te = chunk(e_tr, t_tr), chunk(e_te, t_te)
        dz_tr = flat_tokens[e_tr, t_tr + k] - flat_tokens[e_tr, t_tr]
        dz_te = flat_tokens[e_te, t_te + k] - flat_tokens[e_te, t_te]
        pix_tr, pix_te = pooled_pixel_diff(px, e_tr, t_tr, k), pooled_pixel_diff(px, e_te, t_te, k)
        stamo = fit_mlp(dz_tr, y_tr, args.probe_updates, seed=k)
        pixel = fit_mlp(pix_tr, y_tr, args.probe_updates, seed=k)
        lin = ridge(dz_tr, y_tr)
        probe_res[k] = {"delta_z_mlp": float((stamo(dz_te) - y_te).square().mean()),
                        "delta_z_linear": float((lin(dz_te) - y_te).square().mean()),
                        "pooled_pixel_diff_mlp": float((pixel(pix_te) - y_te).square().mean()),
                        "mean_action": float((y_tr.mean(0) - y_te).square().mean())}
        probe_res[k]["pass"] = probe_res[k]["delta_z_mlp"] < min(probe_res[k]["pooled_pixel_diff_mlp"],
                                                                 probe_res[k]["mean_action"])
        log(f"probe k={k}: {probe_res[k]}")
    results["latent_action_probe"] = probe_res
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [1, 2, 4, 8]
    for key, label in (("delta_z_mlp", "StaMo dz (MLP)"), ("delta_z_linear", "StaMo dz (linear)"),
                       ("pooled_pixel_diff_mlp", "pooled pixel diff (MLP)"), ("mean_action", "mean action")):
        ax.plot(ks, [probe_res[k][key] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("held-out MSE of a_{t:t+k}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "probe_mse_vs_k.png", dpi=90)
    plt.close(fig)

    # ---- check 6: interpolation
    n_pairs, k_int = max(2, args.transfer_cases), 4
    e_i = test_eps[torch.randint(len(test_eps), (n_pairs,), generator=g)]
    t_i = torch.randint(n_frames - k_int, (n_pairs,), generator=g)
    alphas = torch.linspace(0, 1, 5)
    z1, z2 = tokens[e_i, t_i], tokens[e_i, t_i + k_int]
    decoded = interpolation_frames(wm, z1, z2, alphas, args.sample_steps)  # [5 * n, C, H, W]
    true_move = spec.difference(q[e_i, t_i + k_int], q[e_i, t_i])
    by_readout = {name: interpolation_scores(joints.reshape(len(alphas), n_pairs, -1), alphas, true_move, spec)
                  for name, joints in read_joints(wm, decoded, readouts, spec).items()}
    results["interpolation"] = {**by_readout[judged_readout], "readout": judged_readout, "by_readout": by_readout,
                                "pairs": n_pairs, "k": k_int, "alphas": alphas.tolist()}
    results["interpolation"]["pass"] = bool(results["interpolation"]["cases"]) and \
        results["interpolation"]["share_rho_above_0.9"] >= 0.5
    log(f"interpolation {results['interpolation']}")
    n_strip = min(4, n_pairs)
    fig, axes = plt.subplots(n_strip, 7, figsize=(9, 1.4 * n_strip))
    for i in range(n_strip):
        row = [px[e_i[i], t_i[i]].float(), *[decoded[a * n_pairs + i] for a in range(5)],
               px[e_i[i], t_i[i] + k_int].float()]
        for c, img in enumerate(row):
            ax = axes[i, c]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 255).byte().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(["o_t", "a=0", "a=.25", "a=.5", "a=.75", "a=1", "o_t+4"][c], fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "interpolation.png", dpi=80)
    plt.close(fig)

    # ---- check 7: motion transfer
    n_tr = max(2, args.transfer_cases)
    e_src = test_eps[torch.randint(len(test_eps), (n_tr,), generator=g)]
    e_dst = test_eps[torch.randint(len(test_eps), (n_tr,), generator=g)]
    t_src = torch.randint(n_frames - k_int, (n_tr,), generator=g)
    t_dst = torch.randint(n_frames, (n_tr,), generator=g)
    delta = tokens[e_src, t_src + k_int] - tokens[e_src, t_src]
    base_tokens = tokens[e_dst, t_dst]
    base_img, moved_img = transfer_frames(wm, base_tokens, delta, args.sample_steps)
    src_change = spec.difference(q[e_src, t_src + k_int], q[e_src, t_src])
    read_base, read_moved = (read_joints(wm, frames, readouts, spec) for frames in (base_img, moved_img))
    by_readout = {name: transfer_cosines(spec.difference(read_moved[name], read_base[name]), src_change)
                  for name in readouts}
    results["motion_transfer"] = {"cases": n_tr, **by_readout[judged_readout], "readout": judged_readout,
                                  "by_readout": by_readout, "k": k_int}
    results["motion_transfer"]["pass"] = results["motion_transfer"]["share_positive_cosine"] > 0.7
    log(f"motion transfer {results['motion_transfer']}")
    n_show = min(4, n_tr)
    fig, axes = plt.subplots(n_show, 4, figsize=(5.6, 1.5 * n_show))
    for i in range(n_show):
        row = [px[e_src[i], t_src[i]], px[e_src[i], t_src[i] + k_int], base_img[i], moved_img[i]]
        for c, img in enumerate(row):
            ax = axes[i, c]
            ax.imshow(img.float().permute(1, 2, 0).clamp(0, 255).byte().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(["source o_t", "source o_t+4", "D(E(x))", "D(E(x)+dz)"][c], fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "motion_transfer.png", dpi=80)
    plt.close(fig)

    # ---- check 8 (co-training): BC pi(o_t, o_{t+k}) -> a_t on 1 part / 1 + 4 pseudo / 5 parts labelled
    results["cotraining"] = cotraining(agent, px, act, flat_tokens, train_eps, test_eps, args)
    log(f"co-training {results['cotraining']}")

    # ---- goal reaching from goal images (reacher): the goal head and the probe vs random and zero actions
    if spec.goal_reaching:
        results["goal_heads"] = fit_goal_heads(agent, flat_tokens, act, train_eps, test_eps, args.probe_updates,
                                               seed=args.seed + 21)
        log(f"goal heads {results['goal_heads']}")
        results["goal_reaching"] = gr = goal_reaching(args, agent, phys[test_eps].flatten(0, 1))
        log(f"goal reaching {gr}")
        results["cotraining"]["closed_loop"] = closed_loop_cotraining(gr)
        log(f"co-training in closed loop {results['cotraining']['closed_loop']}")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in (n for n in gr if isinstance(gr[n], dict) and "mean_distance_per_step" in gr[n]):
            curve = [gr[name]["start_distance"], *gr[name]["mean_distance_per_step"]]
            ax.plot(range(len(curve)), curve, label=name, lw=2.5 if name == gr["judged"] else 1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("mean joint-angle distance to goal (rad)")
        ax.set_title(f"reacher goal reaching from goal images ({gr['goals']} goals)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(fig_dir / "goal_reaching.png", dpi=90)
        plt.close(fig)

    # ---- curves, report
    hist = np.array(agent.history)
    if len(hist) >= 1000:  # is the flow loss still falling? (the scale note says)
        results["flow_loss"] = {"last_500": float(hist[-500:, 1].mean()), "previous_500": float(hist[-1000:-500, 1]
                                                                                               .mean())}
    if len(hist):
        fig, ax = plt.subplots(figsize=(5, 3))
        w = max(1, len(hist) // 50)
        smooth = np.convolve(hist[:, 1], np.ones(w) / w, mode="valid")
        ax.plot(hist[w - 1:, 0], smooth)
        ax.set_xlabel("update")
        ax.set_ylabel("flow MSE (smoothed)")
        fig.tight_layout()
        fig.savefig(fig_dir / "flow_loss.png", dpi=90)
        plt.close(fig)
    results["eval_seconds"] = time.time() - t_start
    (fig_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(args, results)
    log(f"wrote {fig_dir / 'results.json'} and {args.report} ({results['eval_seconds']:.0f}s)")


def train_goal_bc(px: torch.Tensor, e: torch.Tensor, t: torch.Tensor, y: torch.Tensor, k: int, channels: int,
                  lr: float, updates: int, seed: int, on_update=None, goal_input: str = "difference",
                  make_net=None, warmup: int = 0, loss_fn=None):
    """Co-training's BC policy pi(o_t, o_{t+k}) -> a_t (``GoalBCNet`` on pixels, reading the goal as ``goal_input``:
    ``StaMoConfig.bc_goal_input``): its weights from ``seed``, Adam at ``lr``, ``updates`` batches of 64 of the pairs
    ``(e, t)`` with targets ``y`` drawn from a generator of ``seed``, MSE. ``on_update(i, net, loss)`` is called
    after update i (``bc_collapse.py`` watches the net with it). ``make_net()`` builds another net in its place,
    ``warmup`` > 0 ramps the rate up linearly over that many updates (``bc_collapse.py`` tries both), and
    ``loss_fn(net, idx)`` replaces the MSE against ``y[idx]`` (co-training's latent-action condition). Returns the
    net in eval mode."""
    from latentrl.agents.stamo import GoalBCNet

    torch.manual_seed(seed)
    net = make_net() if make_net is not None else \
        GoalBCNet("pixels", tuple(px.shape[-3:]), y.shape[-1], channels, goal_input)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for i in range(1, updates + 1):
        if warmup > 0:
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, i / warmup)
        idx = torch.randint(len(e), (64,), generator=g)
        if loss_fn is not None:
            loss = loss_fn(net, idx)
        else:
            loss = (net(px[e[idx], t[idx]], px[e[idx], t[idx] + k]) - y[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_update is not None:
            on_update(i, net, loss.detach())
    net.eval()
    return net


ONE_PART_CONDITION = "1 part labelled"
PSEUDO_CONDITION = "1 part + 4 parts StaMo pseudo-labelled"
FIVE_PARTS_CONDITION = "5 parts labelled"
LATENT_CONDITION = "1 part + 4 parts StaMo latent actions (second head)"


BC_POLICY_NAMES = {ONE_PART_CONDITION: "BC (1 part labelled)", PSEUDO_CONDITION: "co-trained BC (1 + 4 pseudo)",
                   FIVE_PARTS_CONDITION: "BC (5 parts labelled)", LATENT_CONDITION: "BC (1 + 4 latent-action head)"}
"""Goal reaching's name for each co-training condition's BC policy (the pseudo-labelled one's as before 2026-12-05)."""


def closed_loop_cotraining(gr: dict) -> dict | None:
    """Table 5's reading of co-training at our scale: the co-training conditions' BC nets acting toward the same
    goals from the same starts (``goal_reaching``'s results ``gr``), judged by final joint-angle distance; the
    share of the 1-part -> 5-part improvement that the pseudo-labels recover (and the latent-action head's), with
    the paired standard error of the pseudo-labelled net against the 1-part net. None without those three."""
    final = {c: torch.tensor(gr[n]["final_distances"]) for c, n in BC_POLICY_NAMES.items() if n in gr}
    if any(c not in final for c in (ONE_PART_CONDITION, PSEUDO_CONDITION, FIVE_PARTS_CONDITION)):
        return None
    one, five = final[ONE_PART_CONDITION].mean(), final[FIVE_PARTS_CONDITION].mean()

    def gap(c: str) -> float | None:
        return float((one - final[c].mean()) / (one - five)) if c in final and one != five else None

    paired = final[PSEUDO_CONDITION] - final[ONE_PART_CONDITION]
    return {"final_distance": {c: float(v.mean()) for c, v in final.items()},
            "gap_recovered": gap(PSEUDO_CONDITION), "gap_recovered_latent_actions": gap(LATENT_CONDITION),
            "pseudo_minus_one_part": {"mean_difference": float(paired.mean()),
                                      "se": float(paired.std() / math.sqrt(len(paired))) if len(paired) > 1 else None},
            "five_minus_one_part": float(five - one), "goals": len(paired)}


def latent_action_bc(px: torch.Tensor, e: torch.Tensor, t: torch.Tensor, is_lab: torch.Tensor, y: torch.Tensor,
                     flat_tokens: torch.Tensor, k: int, cfg) -> tuple:
    """Co-training in the paper's form: the video rows' pseudo-actions are the latent actions themselves, m =
    E(o_{t+k}) - E(o_t) (spec §3.4), not actions decoded from them. The BC net gets a second head on its trunk
    that predicts m (standardised per dimension over the rows) on the video rows, while its action head
    regresses a_t on the labelled rows; the two MSEs are added with equal weights (as the paper's VLA loss weighs
    action and future-state terms). Held out, only the action head is read. Returns ``(make_net, loss_fn)`` for
    ``train_goal_bc`` over the rows ``(e, t)`` (``is_lab`` marks the labelled ones, ``y`` their actions)."""
    from latentrl.agents.stamo import GoalBCNet

    m = flat_tokens[e, t + k] - flat_tokens[e, t]
    m = (m - m.mean(0)) / m.std(0).clamp_min(1e-6)

    def make_net() -> GoalBCNet:
        net = GoalBCNet("pixels", tuple(px.shape[-3:]), y.shape[-1], cfg.bc_channels, cfg.bc_goal_input)
        net.latent_head = mlp(net.head[0].in_features, [256], m.shape[-1])
        return net

    def loss_fn(net, idx: torch.Tensor) -> torch.Tensor:
        h = net.trunk(net.inputs(px[e[idx], t[idx]], px[e[idx], t[idx] + k]))
        lab = is_lab[idx]
        loss = h.new_zeros(())
        if lab.any():
            loss = loss + (net.head(h[lab]) - y[idx][lab]).square().mean()
        if (~lab).any():
            loss = loss + (net.latent_head(h[~lab]) - m[idx][~lab]).square().mean()
        return loss

    return make_net, loss_fn


def rescale_to_spread(labels: torch.Tensor, rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``labels`` stretched about the mean of its ``rows`` so that, per column, their spread over those rows is
    the ``reference``'s (standard deviations), then clipped to the action box [-1, 1]. A probe fitted by MSE
    predicts a conditional mean, smaller than the actions it decodes; this gives the labels the actions' size."""
    spread = reference.std(0) / labels[rows].std(0).clamp_min(1e-6)
    centre = labels[rows].mean(0)
    return ((labels - centre) * spread + centre).clamp(-1, 1)


PSEUDO_LABELLERS = ("chunk", "windows", "pca_cv")
"""``--pseudo-labeller`` choices (``pseudo_labels``); ``chunk`` is the agent's own."""
PCA_CV_DIMS = (8, 16, 32)
"""``pca_cv``: the numbers of the tokens' principal components its cross-validation chooses from."""
PCA_CV_OFFSETS = (1, 2, 4)
"""``pca_cv``: the latent actions' offsets k' it averages over (every non-empty subset is a candidate)."""


def token_pca(flat_tokens: torch.Tensor, episodes: torch.Tensor, dims: int) -> torch.Tensor:
    """Every frame's top ``dims`` principal components of the flattened tokens, standardised and decomposed over the
    frames of ``episodes`` (an unsupervised fit: video frames count like labelled ones): [E, T, dims]. The exact
    eigendecomposition of the covariance (deterministic, unlike ``torch.pca_lowrank``)."""
    frames = flat_tokens[episodes].flatten(0, 1).double()
    mean, std = frames.mean(0), frames.std(0).clamp_min(1e-6)
    z = (frames - mean) / std
    _, vectors = torch.linalg.eigh(z.T @ z / len(z))  # ascending eigenvalues
    top = vectors.flip(1)[:, :dims]
    return (((flat_tokens.double() - mean) / std) @ top).float()


def window_labels(features: torch.Tensor, act: torch.Tensor, fit_rows: tuple, rows: tuple, k: int,
                  probe_updates: int) -> torch.Tensor:
    """a_t for ``rows`` (e, t) from a probe on [f(o_s), f(o_{s+k}) - f(o_s)] fitted on ``fit_rows``' action chunks
    a_{s:s+k} (``fit_mlp``, seed 11): the mean, over the windows s = t - j (j < k) inside the episode, of element j
    of the window's predicted chunk. Unclipped."""
    (e_fit, t_fit), (e, t) = fit_rows, rows
    n_steps, action_dim = features.shape[1] - 1, act.shape[-1]

    def inputs(e, t):
        return torch.cat([features[e, t], features[e, t + k] - features[e, t]], 1)

    probe = fit_mlp(inputs(e_fit, t_fit), action_chunks(act, e_fit, t_fit, k).flatten(1), probe_updates, seed=11)
    total, count = torch.zeros(len(e), action_dim), torch.zeros(len(e), 1)
    for j in range(k):
        inside = (t - j >= 0) & (t - j + k <= n_steps)
        total[inside] += probe(inputs(e[inside], t[inside] - j)).reshape(-1, k, action_dim)[:, j]
        count[inside] += 1
    return total / count.clamp_min(1)


def pca_cv_labels(flat_tokens: torch.Tensor, act: torch.Tensor, labelled: tuple, rows: tuple, k: int,
                  probe_updates: int, report: dict | None = None) -> torch.Tensor:
    """``pca_cv`` (see ``pseudo_labels``): the mean over the offsets k' of ``window_labels`` on the tokens' top m
    principal components, m and the offsets chosen by 2-fold cross-validation on the labelled episodes (fit on one
    half's k'-pairs, score the other half's rows' a_t, MSE after clipping). Fills ``report`` with every candidate's
    cross-validated MSE and the choice."""
    (e_lab, _), (e, t) = labelled, rows
    n_steps = flat_tokens.shape[1] - 1
    labelled_eps = torch.unique_consecutive(e_lab)
    if len(labelled_eps) < 2:
        raise ValueError("pseudo_labels: pca_cv cross-validates over the labelled episodes and needs 2 or more")
    components = token_pca(flat_tokens, torch.unique(torch.cat([labelled_eps, e])), max(PCA_CV_DIMS))
    subsets = [s for n in range(1, len(PCA_CV_OFFSETS) + 1) for s in itertools.combinations(PCA_CV_OFFSETS, n)]
    half = len(labelled_eps) // 2
    folds = ((labelled_eps[:half], labelled_eps[half:]), (labelled_eps[half:], labelled_eps[:half]))
    scores = {(m, s): 0.0 for m in PCA_CV_DIMS for s in subsets}
    for m in PCA_CV_DIMS:
        for fit_eps, val_eps in folds:
            val_rows = offset_pairs(n_steps, k, val_eps)
            by_offset = {k2: window_labels(components[..., :m], act, offset_pairs(n_steps, k2, fit_eps), val_rows,
                                           k2, probe_updates) for k2 in PCA_CV_OFFSETS}
            truth = act[val_rows]
            for s in subsets:
                label = (sum(by_offset[k2] for k2 in s) / len(s)).clamp(-1, 1)
                scores[(m, s)] += float((label - truth).square().mean()) / len(folds)
    dims, offsets = min(scores, key=scores.get)
    if report is not None:
        report.update(chosen={"components": dims, "offsets": list(offsets)},
                      cv_mse={f"{m} components, k' {' '.join(map(str, s))}": v for (m, s), v in scores.items()})
    labels = [window_labels(components[..., :dims], act, offset_pairs(n_steps, k2, labelled_eps), (e, t), k2,
                            probe_updates) for k2 in offsets]
    return (sum(labels) / len(labels)).clamp(-1, 1)


def pseudo_labels(flat_tokens: torch.Tensor, act: torch.Tensor, labelled: tuple, rows: tuple, k: int,
                  labeller: str = "chunk", probe_updates: int = 1500, report: dict | None = None) -> torch.Tensor:
    """Pseudo-actions a_t for ``rows`` (e, t) from the tokens alone, by a probe fitted on the ``labelled`` rows'
    action chunks a_{t:t+k} (``fit_mlp``, seed 11); clipped to the action box. ``labeller``:

    - ``chunk``: the agent's: probe(E(o_{t+k}) - E(o_t)), the chunk's first action;
    - ``windows``: the probe reads E(o_t) beside the latent action, and each step's label is the mean over the k
      windows that hold it (windows starting at t - j, j < k, inside the episode) of that window's prediction for
      the step (element j). Every window is video only: no action or state of the unlabelled rows is read.
      On the retrained 20k reacher model it labels the video at MSE 0.260 against the chunk labeller's 0.280
      (``labeller_variants.py``);
    - ``pca_cv``: ``windows`` on the tokens' top principal components (fitted on every training frame, video
      included: the video's one use besides its own frames), averaged over latent actions of several offsets k';
      how many components and which offsets, chosen by cross-validation on the labelled episodes alone
      (``pca_cv_labels``; ``report`` gets the choice and every candidate's score)."""
    if labeller not in PSEUDO_LABELLERS:
        raise ValueError(f"pseudo_labels: labeller {labeller!r} is not one of {PSEUDO_LABELLERS}")
    if labeller == "pca_cv":
        return pca_cv_labels(flat_tokens, act, labelled, rows, k, probe_updates, report)
    (e_lab, t_lab), (e, t) = labelled, rows
    if labeller == "windows":
        return window_labels(flat_tokens, act, labelled, rows, k, probe_updates).clamp(-1, 1)
    probe = fit_mlp(flat_tokens[e_lab, t_lab + k] - flat_tokens[e_lab, t_lab],
                    action_chunks(act, e_lab, t_lab, k).flatten(1), probe_updates, seed=11)
    return probe(flat_tokens[e, t + k] - flat_tokens[e, t]).reshape(-1, k, act.shape[-1])[:, 0].clamp(-1, 1)


def cotraining_labels(flat_tokens: torch.Tensor, act: torch.Tensor, train_eps: torch.Tensor, k: int, args
                      ) -> tuple[torch.Tensor, dict]:
    """Co-training's pseudo-actions for every ``offset_pairs`` row (e, t) of the training episodes at offset ``k``
    (``args.pseudo_labeller``'s labeller, fitted on the labelled part's rows only; labelled rows get labels too, and
    ``cotraining`` uses the recorded actions there), and the labeller's report (``pca_cv``'s choice, else empty).
    They depend on the autoencoder and the data, not on the BC seed: studies over seeds compute them once."""
    labelled_eps, _ = labelled_part(train_eps)
    n_frames = flat_tokens.shape[1]
    choice = {}
    pseudo = pseudo_labels(flat_tokens, act, offset_pairs(n_frames - 1, k, labelled_eps),
                           offset_pairs(n_frames - 1, k, train_eps), k, getattr(args, "pseudo_labeller", "chunk"),
                           args.probe_updates, report=choice)
    return pseudo, choice


def cotraining(agent: StaMoAgent, px: torch.Tensor, act: torch.Tensor, flat_tokens: torch.Tensor,
               train_eps: torch.Tensor, test_eps: torch.Tensor, args, seed: int = 0,
               labels: tuple[torch.Tensor, dict] | None = None) -> dict:
    """Check 8 (Table 5 at our scale): a goal-conditioned BC policy pi(o_t, o_{t+k}) -> a_t (its own conv encoder,
    ``k = cotrain_offset``) trained on 1 part of the training episodes with actions, on that part + the other 4
    parts labelled with pseudo-actions ``probe_k(E(o_{t+k}) - E(o_t))[0]`` (the probe fitted on the labelled part
    only), and on all 5 parts with actions; held-out action MSE per condition and the share of the gap between 1 and
    5 labelled parts the pseudo-labels recover; and beside them the paper's form, the latent actions themselves as
    the video rows' targets of a second head (``latent_action_bc``; reported, the check is judged on the agent's
    probe-decoded pseudo-labels). Also how good the pseudo-labels are: their MSE against the video
    parts' true actions (which the bench has) beside the labelled part's mean action. ``seed`` seeds the BC nets and
    their batches (the pseudo-label probe keeps its own). Sets ``args.bc_goal_policies`` (each condition's net as a
    goal policy, by condition) for goal reaching: Table 5 judges the conditions by closed-loop success, which
    ``closed_loop_cotraining`` reads from it. ``labels``: ``cotraining_labels``' output, when already computed."""
    from latentrl.agents.stamo import StaMoBCPolicy

    spec = TASKS[args.task]
    n_frames = px.shape[1]
    k_bc = agent.config.cotrain_offset
    labelled_eps, _ = labelled_part(train_eps)
    e_all, t_all = offset_pairs(n_frames - 1, k_bc, train_eps)
    e_lab, t_lab = offset_pairs(n_frames - 1, k_bc, labelled_eps)
    is_lab = torch.isin(e_all, labelled_eps)
    labeller = getattr(args, "pseudo_labeller", "chunk")
    pseudo, choice = labels if labels is not None else cotraining_labels(flat_tokens, act, train_eps, k_bc, args)
    if len(pseudo) != len(e_all):
        raise ValueError(f"cotraining: {len(pseudo)} labels given for {len(e_all)} training pairs")
    rescaled = bool(getattr(args, "rescale_pseudo_labels", False))
    if rescaled:  # undo the MSE fit's shrinkage (a study; off by default)
        pseudo = rescale_to_spread(pseudo, ~is_lab, act[e_lab, t_lab])
    e_te, t_te = offset_pairs(n_frames - 1, k_bc, test_eps)
    cot = {"pseudo_label_mse": float((pseudo[~is_lab] - act[e_all, t_all][~is_lab]).square().mean()),
           "pseudo_label_mean_action_mse": float((act[e_lab, t_lab].mean(0) - act[e_all, t_all][~is_lab])
                                                 .square().mean()),
           "labelled_episodes": len(labelled_eps), "seed": seed,
           "pseudo_labels_rescaled": rescaled, "pseudo_labeller": labeller, **({"pseudo_labeller_choice": choice}
                                                                             if choice else {}),
           "pseudo_label_mean_abs": float(pseudo[~is_lab].abs().mean()),
           "video_action_mean_abs": float(act[e_all, t_all][~is_lab].abs().mean())}
    y_all = act[e_all, t_all]
    make_net, loss_fn = latent_action_bc(px, e_all, t_all, is_lab, y_all, flat_tokens, k_bc, agent.config)
    # each condition: its rows, their targets, and train_goal_bc's hooks (the latent condition's net and loss)
    conditions = {ONE_PART_CONDITION: (e_lab, t_lab, act[e_lab, t_lab], {}),
                  PSEUDO_CONDITION: (e_all, t_all, torch.where(is_lab[:, None], y_all, pseudo), {}),
                  FIVE_PARTS_CONDITION: (e_all, t_all, y_all, {}),
                  LATENT_CONDITION: (e_all, t_all, y_all, {"make_net": make_net, "loss_fn": loss_fn})}
    args.bc_goal_policies = {}
    for name, (e, t, y, hooks) in conditions.items():
        net = train_goal_bc(px, e, t, y, k_bc, agent.config.bc_channels, agent.config.bc_lr, args.bc_updates, seed,
                            goal_input=agent.config.bc_goal_input, **hooks)
        with torch.no_grad():
            preds = torch.cat([net(px[e_te[i:i + 256], t_te[i:i + 256]], px[e_te[i:i + 256], t_te[i:i + 256] + k_bc])
                               for i in range(0, len(e_te), 256)])
        cot[name] = {"heldout_action_mse": float((preds - act[e_te, t_te]).square().mean()), "pairs": len(e)}
        args.bc_goal_policies[name] = lambda goal, net=net: StaMoBCPolicy(net, goal.float(), spec.action_dim)
        log(f"co-training {name}: {cot[name]}")
    one, mix, five, lat = (cot[n]["heldout_action_mse"] for n in conditions)
    cot["gap_recovered"] = (one - mix) / (one - five) if one != five else None
    cot["gap_recovered_latent_actions"] = (one - lat) / (one - five) if one != five else None
    cot["mean_action_mse"] = float((act[train_eps].flatten(0, 1).mean(0) - act[e_te, t_te]).square().mean())
    cot["k"] = k_bc
    cot["bc_goal_input"], cot["bc_lr"] = agent.config.bc_goal_input, agent.config.bc_lr
    cot["pass"] = cot["gap_recovered"] is not None and cot["gap_recovered"] > 0.5
    return cot


def write_report(args, r: dict) -> None:
    fig_rel = Path(args.fig_dir)
    try:
        fig_rel = fig_rel.relative_to(Path(args.report).parent)
    except ValueError:
        pass
    st, rec, sp = r["setting"], r["reconstruction"], r["state_probe"]
    tm = r.get("train_timing", {})
    yes = lambda ok: "**yes**" if ok else "**no**"  # noqa: E731
    lines = [
        "# StaMo benchmark (issue 16)" + ("" if st["task"] == DEFAULT_TASK else f": {st['task']}"), "",
        f"Generated by `scripts/bench_stamo.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Task `{st['task']}`, 64x64 pixels, action repeat {st['action_repeat']}, random actions held "
        f"{st['hold_steps'][0]}-{st['hold_steps'][1]} steps; {st['episodes']} episodes x {st['episode_length']} steps, "
        f"{st['train_episodes']} for training and {st['test_episodes']} held out (split by episode).",
        f"Autoencoder: preset `{st['preset']}`, compression `{st.get('compression', 'queries')}`, sigma shift "
        f"{st.get('sigma_shift', 1.0):g}, **{st['updates']} updates** of batch {tm.get('batch_size', '?')} "
        f"(the spec's CPU setting asks for 20k; see the scale note), sampler {st['sample_steps']} Euler steps.", "",
        "## Done-when checks (thresholds of spec section 8)", "",
        "| check | measured | threshold | met |", "|---|---|---|---|",
        f"| reconstruction PSNR (held-out) | {rec['psnr_tokens']:.2f} dB; mean image {rec['psnr_mean_image']:.2f} dB; "
        f"zeroed tokens {rec['psnr_zero_tokens']:.2f} dB | >= 3 dB above both | {yes(rec['pass'])} |",
        f"| linear probe tokens -> proprio positions | R^2 {sp['r2_mean']:.3f} "
        f"({', '.join(f'{v:.2f}' for v in sp['r2_per_output'])}) | > 0.8 | {yes(sp['pass'])} |",
    ]
    for k, v in r["latent_action_probe"].items():
        lines.append(f"| latent-action probe k={k} (held-out MSE) | dz MLP {v['delta_z_mlp']:.4f}; pooled pixel diff "
                     f"{v['pooled_pixel_diff_mlp']:.4f}; mean action {v['mean_action']:.4f} (dz linear "
                     f"{v['delta_z_linear']:.4f}) | dz below both | {yes(v['pass'])} |")
    it, mt = r["interpolation"], r["motion_transfer"]

    def other_readouts(check: dict, text) -> str:
        """The same check read by the readouts it was not judged on (runs before 2026-12-03 have one readout)."""
        others = [f"{name} readout {text(v)}" for name, v in check.get("by_readout", {}).items()
                  if name != check["readout"]]
        return f"; {', '.join(others)}" if others else ""

    def readout_name(check: dict) -> str:
        if "readout" not in check:
            return "linear readout"
        return f"{check['readout']} readout, R^2 {r['readouts']['r2_mean'][check['readout']]:.2f}"

    def moving_sources(check: dict) -> str:
        share = check.get("share_positive_cosine_moving")
        if share is None:  # results from before 2026-12-04, or no moving source
            return ""
        return f"; sources that move 0.1-2.5 rad: {100 * share:.0f}% of {check['moving_cases']}"

    lines.append(f"| interpolation (k={it['k']}) | Spearman rho > 0.9 in {100 * (it['share_rho_above_0.9'] or 0):.0f}% "
                 f"of {it['cases']} moving joints (mean rho {it['spearman_mean'] or 0:.2f}; {readout_name(it)})"
                 + other_readouts(it, lambda v: f"{100 * (v['share_rho_above_0.9'] or 0):.0f}% of {v['cases']}")
                 + f" | rho > 0.9 per moving joint | {yes(it['pass'])} (counted met when >= 50% of cases) |")
    lines.append(f"| motion transfer (k={mt['k']}) | positive cosine in {100 * mt['share_positive_cosine']:.0f}% of "
                 f"{mt['cases']} cases (mean {mt['mean_cosine']:.2f}; {readout_name(mt)})"
                 + other_readouts(mt, lambda v: f"{100 * v['share_positive_cosine']:.0f}%")
                 + moving_sources(mt)
                 + f" | > 70% | {yes(mt['pass'])} |")
    gr = r.get("goal_reaching")
    if gr is None:
        lines.append(f"| goal reaching | not run on {st['task']}: the spec's goal check is reacher's "
                     "(docs/bench_stamo.md) | StaMo below random and zero | - |")
    else:
        names = [n for n in gr if isinstance(gr[n], dict) and "final_distance" in gr[n]]
        judged = gr.get("judged", names[0])
        lines.append(f"| goal reaching ({gr['goals']} goals, {gr['steps']} steps) | final angle distance "
                     + "; ".join(f"{n} {gr[n]['final_distance']:.2f}" for n in names)
                     + f" (start {gr[names[0]]['start_distance']:.2f}); paired differences: {judged} "
                     + "; ".join(f"minus {b} {gr['paired'][b]['mean_difference']:+.2f} (SE {gr['paired'][b]['se']:.2f})"
                                 for b in ("random", "zero action") if gr.get("paired", {}).get(b, {}).get("se"))
                     + f" | {judged} below random and zero | {yes(gr['pass'])} |")
    ct = r["cotraining"]
    conds = [n for n in ct if isinstance(ct[n], dict) and "heldout_action_mse" in ct[n]]
    cl = ct.get("closed_loop")
    lines.append(f"| co-training (k={ct['k']}) | held-out action MSE "
                 + "; ".join(f"{n} {ct[n]['heldout_action_mse']:.4f}" for n in conds)
                 + "; gap recovered "
                   f"{ct['gap_recovered'] if ct['gap_recovered'] is None else round(ct['gap_recovered'], 2)}"
                 + (f" (with the latent actions as targets: {ct['gap_recovered_latent_actions']:.2f})"
                    if ct.get("gap_recovered_latent_actions") is not None else "")
                 + (f" ({ct['labelled_episodes']} labelled episodes; pseudo-labels' MSE against the video parts' "
                    f"true actions {ct['pseudo_label_mse']:.4f}, the labelled part's mean action "
                    f"{ct['pseudo_label_mean_action_mse']:.4f}"
                    + (f"; mean |pseudo-label| {ct['pseudo_label_mean_abs']:.2f}, mean |action| "
                       f"{ct['video_action_mean_abs']:.2f}" if "pseudo_label_mean_abs" in ct else "")
                    + ("; pseudo-labels rescaled to the labelled part's spread" if ct.get("pseudo_labels_rescaled")
                       else "")
                    + (f"; labeller {ct['pseudo_labeller']}" if ct.get("pseudo_labeller", "chunk") != "chunk"
                       else "") + ")" if "pseudo_label_mse" in ct else "")
                 + (f"; in closed loop (Table 5's reading: final angle distance to {cl['goals']} goals) "
                    + "; ".join(f"{n} {v:.2f}" for n, v in cl["final_distance"].items())
                    + f", gap recovered {cl['gap_recovered']:.2f}"
                    + (f" (latent-action head {cl['gap_recovered_latent_actions']:.2f})"
                       if cl.get("gap_recovered_latent_actions") is not None else "")
                    + f"; pseudo minus 1 part {cl['pseudo_minus_one_part']['mean_difference']:+.2f} rad (paired SE "
                      f"{cl['pseudo_minus_one_part']['se']:.2f})" if cl and cl.get("gap_recovered") is not None else "")
                 + f" | most of the gap (> 0.5; judged on the held-out MSE) | {yes(ct['pass'])} |")
    lines += ["", "## Training cost", "",
              f"Decoder + encoder training step (flow loss, AdamW, batch {tm.get('batch_size', '?')}, preset "
              f"`{tm.get('preset', '?')}`): median **{tm.get('median_update_ms') or float('nan'):.0f} ms** "
              + (f"on `{tm['device']}`." if str(tm.get("device", "cpu"))
                 .startswith("cuda") else f"on the CPU ({tm.get('threads', '?')} torch thread"
                 f"{'' if tm.get('threads') == 1 else 's'} on a 2-core machine shared with other jobs, so this is an "
                 "upper bound)."), "",
              "## Figures", "",
              f"![reconstructions]({fig_rel}/reconstructions.png)", "",
              f"![interpolation]({fig_rel}/interpolation.png)", "",
              f"![probe MSE vs k]({fig_rel}/probe_mse_vs_k.png)", "",
              f"![motion transfer]({fig_rel}/motion_transfer.png)", "",
              *([f"![goal reaching]({fig_rel}/goal_reaching.png)", ""] if gr is not None else []),
              f"![flow loss]({fig_rel}/flow_loss.png)", "",
              "## Scale and deviations", "",
              f"- Scale actually run: {st['updates']} autoencoder updates (spec: 20k, 20-40 min on a free CPU"
              + ("" if st["updates"] >= 20000 else f"; this is {st['updates'] / 20000:.1%} of it") + ")"
              + (f"; flow MSE {fl['last_500']:.4f} over the last 500 updates against {fl['previous_500']:.4f} over "
                 f"the 500 before ({'still falling' if fl['last_500'] < 0.97 * fl['previous_500'] else 'flat'})"
                 if (fl := r.get("flow_loss")) else "") + ". Everything below reads that checkpoint.",
              "- The DiT predicts x0 and forms the velocity (z - x0_hat) / max(sigma, 0.05) (`prediction=\"x\"`); the "
              f"loss is still MSE(v_hat, eps - x0) with logit-normal sigma read through SD3's shift "
              f"({st.get('sigma_shift', 1.0):g}). Predicting the velocity directly "
              "(`prediction=\"v\"`, the reference's choice in SD3's 16-channel latent space) stalled here: a pixel "
              "patch of 8x8x3 = 192 values does not fit through a 96-128-wide token (flow MSE 0.55 after 1,593 "
              "updates against 0.047 after 1,500 with x-prediction; see the ablation below).",
              "- Patch stem trained jointly (the spec's option (b)): no pretrained DINOv2 weights can be "
              "downloaded, so E "
              "is not 'frozen features + compressor'; the stem is swappable (`StaMoModel(stem=...)`). Without a frozen "
              "extractor there is no Delta-feature baseline for check 5.",
              ("- Compression by the reference's transposed attention (a linear map over the 64 patch positions, then "
               "blocks over the channels, feature sizes 64 -> 32 -> 16 -> 8 -> 4 -> 2)"
               if st.get("compression", "queries") == "transposed" else
               "- Compression by learned queries (64 -> 16 -> 4 -> 2), the variant the spec allows, rather than the "
               "reference's transposed attention")
              + "; D = 128 (the reference: 1024); decoder trained from scratch in pixel space (no SD3 / VAE).",
              "- Goal policy (Table 6: frozen encoder + a trained head, its training data not specified): the goal "
              "head (`goal_policy=\"head\"`, the default) maps (E(o_t), E(goal) - E(o_t)) to a_t, trained on "
              "hindsight goals o_{t+k}, k in {1, 2, 4, 8}, of the random episodes; an MLP 2 x 256 (a linear head "
              "is `goal_head_hidden=0`). Also run: the k = 8 latent-action probe on E(goal) - E(o_t), scaled down "
              "to the mean 8-step norm when larger (`goal_clip`).",
              "- Co-training policy: a small conv BC policy pi(o_t, o_{t+k}) -> a_t (no RDT); video rows are labelled "
              "with the probe-decoded latent action (the pseudo-action), not with the latent itself: the "
              "pseudo-labelled policy learns that probe's labels.",
              "",
              "## Protocol", "",
              "- Reconstruction: held-out frames, `decode(E(o))` from fixed noise; the same decoder with "
              "all-zero tokens "
              "(the pooled vector then is the head's bias); the mean training image. PSNR per image on [0, "
              "255], averaged.",
              "- State probe: ridge regression (standardised tokens, lambda 1e-3) from the flattened tokens [2 x D] to "
              f"{TASKS[st['task']].description}; outputs {', '.join(sp['outputs'])}.",
              "- Latent-action probes: every (o_t, o_{t+k}, a_{t:t+k}) pair of the training episodes, MLP in "
              "-> 256 -> 256 "
              "-> kA on standardised inputs (Adam 1e-3, batch 256, the best of every 100 updates on the last "
              "15% of the "
              "training pairs), the same MLP on avg-pooled 8x8x3 pixel differences, "
              "and the training mean of the chunk; MSE on every held-out pair.",
              "- Interpolation: held-out pairs k steps apart, tokens (1 - a) E(x1) + a E(x2) for a in "
              "linspace(0, 1, 5), "
              "decoded (one sampler noise per pair for every a; before 2026-12-05 each a drew its own), re-encoded "
              "and read out by the state probe (atan2 of sin, cos); Spearman rho between a and the "
              "readout angle (relative to a = 0, wrapped) for each joint that moves 0.1-2.5 rad. Two readouts: the "
              "linear state probe and the latent-action probes' MLP trained on the same rows; checks 6 and 7 are "
              "judged on the one with the higher held-out R^2 (both reported). `--transfer-cases` pairs.",
              "- Motion transfer: dz from a held-out pair of one episode added to E(x) of a frame of another; decoded "
              "change = readout(D(E(x) + dz)) - readout(D(E(x))) (the same sampler noise for both; before 2026-12-05 "
              "two draws, as the page's earlier sections read), cosine with the source's true angle change.",
              "- Goal policies' heads: the agent's goal head and its k = 8 probe, trained by this evaluation on every "
              "pair of the training episodes (all with actions; the agent in `train_agent.py` trains both on the "
              "labelled part alone), Adam at the config's rates, batch 256, `--probe-updates` updates.",
              "- Goal reaching: one reset of N envs, goal frames rendered at held-out poses in the same episodes "
              "(`set_physics_state`, so the target ball matches), the arm put back, each policy run from the "
              "same start "
              "poses; final wrapped joint-angle distance ||wrap(q - q_goal)||.",
              "- Co-training: pi(o_t, o_{t+k}) -> a_t (its own conv encoder on o_t and "
              + ("o_{t+k} - o_t" if r.get("cotraining", {}).get("bc_goal_input") == "difference" else
                 "o_{t+k} (`bc_goal_input=frames`, the presets' setting until 2026-12-05)")
              + "; Adam at the config's `bc_lr`, `--bc-updates` batches of 64), trained on 1 part of the "
              "training episodes "
              "with actions, on that part + the other 4 parts labelled with pseudo-actions probe(E(o_{t+k}) "
              "- E(o_t))[0] "
              "(the probe fitted on the labelled part only), and on all 5 parts with actions; held-out action MSE. "
              "Also the paper's form: the video rows' targets are the latent actions E(o_{t+k}) - E(o_t) themselves "
              "(standardised), regressed by a second head on the BC's trunk beside the action head on the labelled "
              "rows, the two MSEs added.",
              ""]
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    write_report_page(args.report, "\n".join(lines))  # keeps the page's hand-written sections


@torch.no_grad()
def goal_reaching(args, agent: StaMoAgent, goal_pool: torch.Tensor, agent_policies: bool = True) -> dict:
    """``--goals`` episodes: reset, render the goal pose (a held-out physics state) in the same episode (so the
    reacher's target ball is the episode's), put the arm back, act ``--goal-steps`` steps; final wrapped
    joint-angle distance ``||wrap(q - q_goal)||``. The policies: the agent's goal head and probe (unless
    ``agent_policies`` is false: ``cotraining_seeds.py`` has neither fitted), random and zero actions, and the BC
    net of every co-training condition in ``args.bc_goal_policies`` (``BC_POLICY_NAMES``)."""
    from latentrl.envs import make_env

    n = args.goals
    spec = TASKS[args.task]
    env = make_env(args.task, obs=("pixels", "physics"), image_size=64, action_repeat=4, num_envs=n, num_workers=0,
                   seed=args.seed + 123, episode_length=4 * args.goal_steps + 10)
    g = torch.Generator().manual_seed(args.seed + 7)
    goals = goal_pool[torch.randint(len(goal_pool), (n,), generator=g)]
    out = {}
    policies = {}
    if agent_policies and agent.goal_head is not None:
        policies["stamo goal head (E(o), E(goal) - E(o))"] = "head"
    if agent_policies:
        policies[f"stamo probe k={agent.config.goal_offset} on E(goal) - E(o)"] = "probe"
    policies["random"] = UniformRandomPolicy(2, torch.Generator().manual_seed(1))
    policies["zero action"] = ZeroPolicy(2)
    for condition, make_policy in (getattr(args, "bc_goal_policies", None) or {}).items():
        policies[BC_POLICY_NAMES[condition]] = make_policy
    td = env.reset()  # one reset: every policy starts from the same poses, with the same target balls
    start = td["physics"].clone()
    goal_obs = env.set_physics_state(goals)
    task = agent.infer_task(GoalObservation(goal_obs.select("pixels")))
    for name, policy in policies.items():
        if policy == "head":
            policy = StaMoHeadPolicy(agent.world_model, agent.goal_head, task.z)
        elif policy == "probe":
            policy = StaMoGoalPolicy(agent.world_model, agent.probes[str(agent.config.goal_offset)], task.z,
                                     clip=agent.config.goal_clip)
        elif callable(policy) and not isinstance(policy, Policy):
            policy = policy(goal_obs["pixels"])
        policy.eval()
        obs = env.set_physics_state(start)
        carry = policy.init_carry(n)
        first = torch.ones(n, dtype=torch.bool)
        dists = []
        for _ in range(args.goal_steps):
            action, carry = policy.step(obs.select("pixels"), carry, first)
            first = torch.zeros(n, dtype=torch.bool)
            step_td = obs.select("pixels", "physics").clone()
            step_td["action"] = action
            obs = env.step(step_td)["next"]
            dists.append(spec.difference(spec.coords(obs["physics"]), spec.coords(goals)).norm(dim=-1))
        d = torch.stack(dists)
        out[name] = {"final_distance": float(d[-1].mean()), "min_distance": float(d.min(0).values.mean()),
                     "start_distance": float(spec.difference(spec.coords(start), spec.coords(goals)).norm(dim=-1)
                                             .mean()),
                     "final_distances": d[-1].tolist(), "mean_distance_per_step": d.mean(1).tolist()}
    env.close()
    judged = list(policies)[0]  # the agent's default goal policy (the head), else the probe
    out["judged"] = judged
    # the same starts and goals for every policy: paired differences, with their standard error
    mine = torch.tensor(out[judged]["final_distances"])
    out["paired"] = {}
    for other in (n for n in policies if n != judged):
        d = mine - torch.tensor(out[other]["final_distances"])
        out["paired"][other] = {"mean_difference": float(d.mean()),
                                "se": float(d.std() / math.sqrt(len(d))) if len(d) > 1 else None,
                                "share_closer": float((d < 0).float().mean())}
    out["pass"] = all(out[judged]["final_distance"] < out[b]["final_distance"] for b in ("random", "zero action"))
    out["goals"], out["steps"] = n, args.goal_steps
    return out


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["data", "train", "eval", "all"])
    p.add_argument("--out-dir", default="/tmp/stamo_bench")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    p.add_argument("--task", choices=sorted(TASKS), default=None,
                   help=f"data: the task to collect (default {DEFAULT_TASK}); train / eval read it from the data")
    p.add_argument("--preset", default="small")
    p.add_argument("--episodes", type=int, default=80)
    p.add_argument("--episode-length", type=int, default=100)
    p.add_argument("--updates", type=int, default=20000)
    p.add_argument("--train-seconds", type=float, default=900)
    p.add_argument("--lr", type=float, default=None, help="train: override the AdamW learning rate")
    p.add_argument("--sigma-shift", type=float, default=None,
                   help="train: SD3's timestep shift of the flow sigmas (default: the config's, 3.0; 1: plain "
                        "logit-normal); kept in the checkpoint and read back by eval")
    p.add_argument("--compression", choices=COMPRESSIONS, default=None,
                   help="train: how E compresses patch features to 2 tokens (default: the config's, the "
                        "reference's transposed attention); kept in the checkpoint")
    p.add_argument("--restart", action="store_true", help="train from scratch even if a checkpoint exists")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--eval-frames", type=int, default=64)
    p.add_argument("--transfer-cases", type=int, default=64,
                   help="held-out pairs of the interpolation check and cases of the motion-transfer check")
    p.add_argument("--goals", type=int, default=50)
    p.add_argument("--goal-steps", type=int, default=50)
    p.add_argument("--probe-updates", type=int, default=1500)
    p.add_argument("--bc-updates", type=int, default=1500)
    p.add_argument("--rescale-pseudo-labels", action="store_true",
                   help="co-training: stretch the pseudo-labels about their mean to the labelled part's action "
                        "spread, per action dimension (the probe's MSE fit shrinks them; a study, off by default)")
    p.add_argument("--pseudo-labeller", choices=PSEUDO_LABELLERS, default="chunk",
                   help="co-training: how the video rows get their pseudo-actions (pseudo_labels; default the "
                        "agent's probe on the k-step latent action)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu",
                   help="train: where the autoencoder trains (cuda on a lent GPU; its checkpoint is saved on the "
                        "CPU, and eval runs on the CPU)")
    p.add_argument("--report", default=None, help="default docs/bench_stamo.md (reacher), "
                                                     "docs/bench_stamo_<domain>.md (other tasks)")
    p.add_argument("--fig-dir", default=None, help="default: the report's path without .md")
    return p


def open_run(out_dir: str, checkpoint: str | Path | None = None, **flags):
    """What the studies in docs/bench_stamo/ start from: the bench's arguments for a finished run in ``out_dir``
    (eval's defaults, with ``flags`` over them, e.g. ``probe_updates=1500``), its episodes with the held-out
    split, and its trained autoencoder (or the ``checkpoint`` snapshot). Returns ``(args, data, train_eps,
    test_eps, agent)``; ``args.task`` is the data's, ``args.preset`` the checkpoint's unless given."""
    args = build_parser().parse_args(["eval", "--out-dir", str(out_dir)])
    unknown = set(flags) - set(vars(args))
    if unknown:
        raise TypeError(f"open_run: bench_stamo.py has no flag {sorted(unknown)}")
    vars(args).update(flags)
    data, train_mask, test_mask = load_data(args)
    state = load_plain(checkpoint or Path(out_dir) / "stamo_wm.pt")
    if "preset" not in flags:
        args.preset = state.get("config", {}).get("preset", args.preset)
    agent = load_model(args, state=state)
    return args, data, train_mask.nonzero().flatten(), test_mask.nonzero().flatten(), agent


def open_run_with_readouts(out_dir: str, sample_steps: int, probe_updates: int, seed: int):
    """``open_run`` plus what checks 6 and 7's studies read next: the task spec, every frame's joints ``q`` and
    tokens, and eval's two state readouts fitted on the training episodes (``state_readouts``, MLP seed ``seed +
    31`` as in ``noise_pairing.py``). Returns a namespace with ``args, data, train_eps, test_eps, agent, wm, spec,
    q, tokens, readouts`` and ``r2`` (each readout's mean held-out R^2)."""
    args, data, train_eps, test_eps, agent = open_run(out_dir, sample_steps=sample_steps)
    wm, spec = agent.world_model, TASKS[args.task]
    q = spec.coords(data["physics"])
    tokens = encode_all(wm, data["pixels"])
    readouts, r2s = state_readouts(tokens.flatten(2), q, spec, train_eps, test_eps, probe_updates, seed=seed + 31)
    r2 = {name: float(v.mean()) for name, v in r2s.items()}
    log(f"readouts R^2 {r2}")
    return argparse.Namespace(args=args, data=data, train_eps=train_eps, test_eps=test_eps, agent=agent, wm=wm,
                              spec=spec, q=q, tokens=tokens, readouts=readouts, r2=r2)


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.episodes, args.episode_length, args.updates = 10, 30, 20
        args.eval_frames, args.goals, args.goal_steps, args.transfer_cases = 8, 2, 5, 2
        args.probe_updates, args.bc_updates, args.sample_steps = 20, 20, 2
        args.preset = "smoke"
    torch.set_num_threads(args.threads)
    args.device = str(resolve_device(args.device))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__})")
    if args.phase in ("data", "all"):
        collect(args)
    if args.phase in ("train", "all"):
        train(args)
    if args.phase in ("eval", "all"):
        evaluate(args)


if __name__ == "__main__":
    main(sys.argv[1:])
