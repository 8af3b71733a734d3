"""Benchmark: pixel frames per second of latentrl's envs against TorchRL's dm_control wrapper.

Both sides step the same dm_control task with random actions and return 64x64 RGB frames:

- ours: ``latentrl.envs.make_env(task, obs=("pixels",), image_size=64, num_envs=W, num_workers=W)``
  (one ``mujoco.Renderer`` per env with a 64x64 buffer, no shadows / reflections / multisampling);
- TorchRL: ``DMControlWrapper`` over dm_control's ``pixels.Wrapper(env, pixels_only=True,
  render_kwargs={"height": 64, "width": 64, "camera_id": C})`` with dm_control's default render
  settings, and ``ParallelEnv(W, make_fn)`` for W > 1 (its default start method, spawn).

Every configuration runs in a fresh interpreter (this script with ``--run-one``): our workers are
forked only from a process that has not rendered yet, and the baseline's ``ParallelEnv`` spawns.
Configurations are interleaved over ``--rounds`` rounds so that load from other processes on the
machine hits both sides alike; each run builds its env, resets once, warms up, then times
``--segments`` segments of ``--steps`` steps (no reset inside). Frames/s are env steps per second
summed over the envs; the table reports medians over all timed segments of all rounds. It also saves
one frame of each side, rendered from the same physics state, to ``--frames-dir`` as PNG.

    python scripts/bench_envs.py                      # a few minutes: walker-walk, 3 rounds
    python scripts/bench_envs.py --quick              # ~1 minute
    python scripts/bench_envs.py --tasks walker-walk cheetah-run quadruped-walk
    python scripts/bench_envs.py --backend mjwarp     # MuJoCo Warp (N worlds) against ours-dmc (W workers)
    python scripts/bench_envs.py --backend mjwarp --device cuda --num-envs 1024 4096 --workers 16

``--backend mjwarp`` measures a different pair, in the same run and the same way: ours with
``backend="mjwarp"`` (``--num-envs`` worlds in one MuJoCo Warp batch on ``--device``, frames from its batch
renderer) against ours with ``backend="dmc"`` (``--workers`` worker processes, one env each). Its report
goes to ``docs/bench_envs_mjwarp.md``; frames saved are the two backends' frames of one physics state.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Before dm_control / mujoco are imported (they are imported only inside the functions below).
os.environ.setdefault("MUJOCO_GL", "egl")

from latentrl.training.logger import machine_description, processor_name  # noqa: E402 (imports neither)

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_ENVS_RESULT "
TARGET_PER_WORKER = 8.0  # ours per worker must reach this multiple of TorchRL's per worker


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["walker-walk"],
                        help="tasks to measure (e.g. walker-walk cheetah-run quadruped-walk)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts W (one env each)")
    parser.add_argument("--backend", default="dmc", choices=["dmc", "mjwarp"], help="our backend")
    parser.add_argument("--device", default="cpu", help="device of our env's tensors (mjwarp: where it runs)")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[16],
                        help="--backend mjwarp: worlds N in the MuJoCo Warp batch")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="timed env steps per segment (per env)")
    parser.add_argument("--segments", type=int, default=3, help="timed segments per run")
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process runs per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps after the reset")
    parser.add_argument("--quick", action="store_true",
                        help="~1 minute run: 1 round of 3 segments of 100 steps")
    parser.add_argument("--frames-dir", type=lambda s: Path(s) if s else None, default=Path("/tmp"),
                        help="where one frame of each side is saved as PNG (empty string: skip)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report (default: docs/bench_envs.md, or docs/bench_envs_mjwarp.md "
                             "with --backend mjwarp)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per run")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: JSON of one run
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.segments, args.steps, args.warmup = 1, 3, 100, 10
    if min(args.steps, args.segments, args.rounds) < 1 or args.warmup < 0 or min(args.workers) < 1:
        parser.error("--steps, --segments, --rounds and --workers must be >= 1, --warmup >= 0")
    if min(args.num_envs) < 1:
        parser.error("--num-envs must be >= 1")
    if args.out is None:
        args.out = REPO / "docs" / ("bench_envs_mjwarp.md" if args.backend == "mjwarp" else "bench_envs.md")
    return args


# --------------------------------------------------------------------------------------- one run
def camera_of(task: str) -> int:
    from latentrl.envs import get_task

    return get_task(task).default_camera


def make_dm_pixel_env(task: str, seed: int, image_size: int, camera: int):
    """dm_control env of ``task`` wrapped in dm_control's pixel wrapper (default render settings)."""
    from dm_control import suite
    from dm_control.suite.wrappers import pixels

    domain, name = task.split("-", 1)
    # Infinite time limit, as in ours: no episode ends (and no auto-reset) inside a timed run.
    if (domain, name) in suite.ALL_TASKS:
        env = suite.load(domain, name, task_kwargs={"random": seed, "time_limit": float("inf")})
    else:  # a latentrl custom task: its own dm_control loader
        from latentrl.envs import get_task

        env = get_task(task).make_dm_env(seed=seed, time_limit=float("inf"))
    return pixels.Wrapper(env, pixels_only=True,
                          render_kwargs={"height": image_size, "width": image_size, "camera_id": camera})


def make_torchrl_env(task: str, seed: int, image_size: int, camera: int):
    from torchrl.envs.libs.dm_control import DMControlWrapper

    return DMControlWrapper(make_dm_pixel_env(task, seed, image_size, camera))


def build_env(spec: dict):
    task, w, size = spec["task"], spec["workers"], spec["image_size"]
    if spec["side"] in ("mjwarp", "dmc"):  # --backend mjwarp: ours on either backend, W = worlds or workers
        from latentrl.envs import make_env

        if spec["side"] == "mjwarp":
            return make_env(task, obs=("pixels",), image_size=size, num_envs=w, backend="mjwarp",
                            device=spec["device"])
        return make_env(task, obs=("pixels",), image_size=size, num_envs=w, backend="dmc", num_workers=w)
    if spec["side"] == "ours":
        from latentrl.envs import make_env

        kwargs = {"num_workers": w} if spec["backend"] == "dmc" else {}
        return make_env(task, obs=("pixels",), image_size=size, num_envs=w, backend=spec["backend"],
                        device=spec["device"], **kwargs)
    camera = camera_of(task)
    if w == 1:
        return make_torchrl_env(task, 0, size, camera)
    from torchrl.envs import ParallelEnv

    fns = [functools.partial(make_torchrl_env, task, i, size, camera) for i in range(w)]
    return ParallelEnv(w, fns)


def _synchronize(env) -> None:
    """Wait for queued GPU work (a CUDA env returns before its kernels finish)."""
    import torch

    device = getattr(env, "device", None)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_one(spec: dict) -> dict:
    """Build, reset, warm up and time one configuration (in this fresh process)."""
    t0 = time.perf_counter()
    env = build_env(spec)
    td = env.reset()
    _synchronize(env)
    startup = time.perf_counter() - t0
    try:
        for _ in range(spec["warmup"]):
            td["action"] = env.action_spec.rand()
            td = env.step(td)["next"]
        fps = []
        for _ in range(spec["segments"]):
            _synchronize(env)
            t = time.perf_counter()
            for _ in range(spec["steps"]):
                td["action"] = env.action_spec.rand()
                td = env.step(td)["next"]
            _synchronize(env)
            fps.append(spec["steps"] * spec["workers"] / (time.perf_counter() - t))
        shape = list(td["pixels"].shape)
    finally:
        env.close()
    return {"fps": fps, "startup_s": startup, "pixels_shape": shape}


def check_backend(spec: dict) -> dict:
    """Whether our env can be built with ``spec["backend"]`` at all (in this fresh process)."""
    from latentrl.envs import make_env

    try:
        env = make_env(spec["task"], obs=("pixels",), image_size=spec["image_size"], num_envs=1,
                       backend=spec["backend"], device=spec["device"])
    except (NotImplementedError, ModuleNotFoundError) as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    env.close()
    return {"ok": True}


def _dmc_pose(task: str, size: int):
    """Our dmc env after 30 random steps (limbs spread out): its frame ``[H, W, 3]`` and physics state."""
    import torch

    from latentrl.envs import make_env

    env = make_env(task, obs=("pixels", "physics"), image_size=size, num_envs=1, num_workers=0)
    td = env.reset()
    torch.manual_seed(0)
    for _ in range(30):
        td["action"] = env.action_spec.rand()
        td = env.step(td)["next"]
    env.close()
    return td["pixels"][0].permute(1, 2, 0).numpy(), td["physics"]


def _write_pair(out: Path, task: str, names: tuple[str, str], frames: tuple, suffix: str) -> dict:
    """Both frames as PNGs plus a 4x side-by-side; the mean frame colours and their difference."""
    import imageio.v3 as iio
    import numpy as np

    slug = task.replace("-", "_")
    paths = {names[0]: out / f"bench_envs_{slug}_{names[0]}.png", names[1]: out / f"bench_envs_{slug}_{names[1]}.png",
             "side_by_side": out / f"bench_envs_{slug}_{suffix}.png"}
    for name, frame in zip(names, frames, strict=True):
        iio.imwrite(paths[name], frame)
    gap = np.full((frames[0].shape[0], 2, 3), 255, dtype=np.uint8)
    iio.imwrite(paths["side_by_side"],
                np.concatenate([frames[0], gap, frames[1]], axis=1).repeat(4, axis=0).repeat(4, axis=1))
    diff = np.abs(frames[0].astype(np.int16) - frames[1].astype(np.int16))
    return {"paths": {k: str(v) for k, v in paths.items()}, "mean_abs_diff": float(diff.mean()),
            "frac_pixels_diff_gt_32": float((diff.max(axis=-1) > 32).mean()),
            **{f"mean_{n}": f.reshape(-1, 3).mean(0).round(1).tolist() for n, f in zip(names, frames, strict=True)}}


def save_frames(spec: dict) -> dict:
    """One frame of each side (ours, TorchRL's dm_control pixels) from the same physics state."""
    from latentrl.envs.tasks import set_physics_state

    task, size = spec["task"], spec["image_size"]
    ours_frame, state = _dmc_pose(task, size)
    base = make_dm_pixel_env(task, 0, size, camera_of(task))
    base.reset()
    set_physics_state(base.physics, state[0].numpy())
    base_frame = base.physics.render(**base._render_kwargs)  # exactly what pixels.Wrapper returns
    return _write_pair(Path(spec["frames_dir"]), task, ("ours", "torchrl"), (ours_frame, base_frame), "side_by_side")


def save_frames_mjwarp(spec: dict) -> dict:
    """One frame of each backend (mjwarp, dmc) from the same physics state."""
    from latentrl.envs import make_env

    task, size = spec["task"], spec["image_size"]
    dmc_frame, state = _dmc_pose(task, size)
    warp = make_env(task, obs=("pixels", "physics"), image_size=size, num_envs=1, backend="mjwarp",
                    device=spec["device"])
    warp.reset()
    warp_frame = warp.set_physics_state(state.to(warp.device))["pixels"][0].permute(1, 2, 0).cpu().numpy()
    warp.close()
    return _write_pair(Path(spec["frames_dir"]), task, ("mjwarp", "dmc"), (warp_frame, dmc_frame), "mjwarp_dmc")


def child_main(payload: str) -> None:
    spec = json.loads(payload)
    job = {"run": run_one, "check": check_backend, "frames": save_frames,
           "frames_mjwarp": save_frames_mjwarp}[spec["job"]]
    print(RESULT_TAG + json.dumps(job(spec)), flush=True)


# ------------------------------------------------------------------------------------------- parent
def spawn(spec: dict, timeout: float) -> dict:
    """Run one job in a fresh interpreter and return its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{spec} did not finish in {timeout:.0f} s") from err
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"{spec} failed (exit code {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        dmc = version("dm_control")
    except PackageNotFoundError:
        dmc = "?"
    return f"{machine_description()}, dm_control {dmc}, MUJOCO_GL={os.environ.get('MUJOCO_GL')}"


def gl_renderer() -> str:
    """The OpenGL renderer string (a child process: this one must not render)."""
    code = ("import os; os.environ.setdefault('MUJOCO_GL', 'egl'); import mujoco; "
            "from dm_control import suite; e = suite.load('cartpole', 'balance'); e.physics.render(8, 8); "
            "from OpenGL import GL; print(GL.glGetString(GL.GL_RENDERER).decode(), '/', "
            "GL.glGetString(GL.GL_VERSION).decode())")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1]
    except Exception:  # noqa: BLE001
        return "unknown"


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    base = {"image_size": args.image_size, "backend": args.backend, "device": args.device}

    if args.backend != "dmc":
        check = spawn({**base, "job": "check", "task": args.tasks[0]}, args.timeout)
        if not check["ok"]:
            print(f"backend={args.backend!r} cannot be built here, nothing to measure ({check['error']}). "
                  f"Run with --backend dmc.")
            return 1
        return main_mjwarp(args, command, base)

    started = datetime.datetime.now().isoformat(timespec="seconds")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t_start = time.perf_counter()
    configs = [(task, side, w) for task in args.tasks for w in args.workers for side in ("ours", "torchrl")]
    fps, startup, failed = measure(args, base, configs, lambda side, w: f"W={w} {side:7s}")
    frames = save_all_frames(args, base, "frames")
    elapsed = time.perf_counter() - t_start

    ours_name = f"ours ({args.backend})"
    rows = ["| task | workers | ours frames/s | TorchRL frames/s | ratio | ours per worker | "
            "TorchRL per worker | startup s (ours / TorchRL) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for task in args.tasks:
        for w in args.workers:
            if (task, "ours", w) in failed or (task, "torchrl", w) in failed:
                cells = ["failed (below)" if (task, side, w) in failed else fmt(statistics.median(fps[(task, side, w)]))
                         for side in ("ours", "torchrl")]
                rows.append(f"| {task} | {w} | {cells[0]} | {cells[1]} | - | - | - | - |")
                verdicts.append(f"{task}, {w} worker(s): not measured (a run failed)")
                continue
            o = statistics.median(fps[(task, "ours", w)])
            b = statistics.median(fps[(task, "torchrl", w)])
            so = statistics.median(startup[(task, "ours", w)])
            sb = statistics.median(startup[(task, "torchrl", w)])
            ratio = o / b
            rows.append(f"| {task} | {w} | {fmt(o)} | {fmt(b)} | {ratio:.1f}x | {fmt(o / w)} | "
                        f"{fmt(b / w)} | {so:.1f} / {sb:.1f} |")
            ok = "met" if ratio >= TARGET_PER_WORKER else "NOT met"
            verdicts.append(f"{task}, {w} worker(s): {ok} ({ratio:.1f}x per worker)")
    table = "\n".join(rows)
    n = args.rounds * args.segments

    size = f"{args.image_size}x{args.image_size}"
    renderer = gl_renderer()
    notes = ["Ratio = ours frames/s / TorchRL frames/s; both sides run the same W, so it is also the ratio "
             "of the per-worker figures."]
    if "llvmpipe" in renderer or "softpipe" in renderer:
        notes.append("No GPU here: EGL is Mesa's software rasterizer, so every frame is drawn by the CPU "
                     "(llvmpipe uses all cores for each draw), and extra render passes and buffer size "
                     "(dm_control's shadow map, reflection pass and multisampled buffer) cost CPU time "
                     "directly, shared with the physics. With llvmpipe already spreading each draw over the "
                     "cores, and other work on the same cores, neither side need gain from a second worker "
                     "here; a machine with a GPU or more cores is where W > 1 pays.")
    lines = [
        "# Env benchmark: pixel frames per second",
        "",
        f"- date: {started}",
        f"- machine: {versions()}; OpenGL: {renderer}; load average at start {load:.2f} (the machine "
        "is shared with other work, so absolute figures move from run to run; both sides are interleaved "
        "so that they see the same load)",
        f"- command: `{command}` (took {elapsed:.0f} s)",
        f"- setup: {size} RGB frames, random actions from `env.action_spec.rand()`, "
        "`td = env.step(td)[\"next\"]` loop; each run is a fresh process that builds the env, resets "
        f"once, takes {args.warmup} warm-up steps, then times {args.segments} segment(s) of {args.steps} "
        f"steps per env (no reset inside); medians over {n} segments ({args.rounds} round(s) x "
        f"{args.segments}). Frames/s = env steps per second summed over the envs (one env per worker); "
        "per worker = frames/s / workers. Startup = building the env plus the first reset (worker "
        "processes included).",
        f"- {ours_name}: `latentrl.envs.make_env(task, obs=(\"pixels\",), image_size={args.image_size}, "
        "num_envs=W, num_workers=W)`: one worker process per env (forked), one `mujoco.Renderer` per env "
        f"with a {size} offscreen buffer, shadows, reflections and multisampling off; frames come back "
        "through shared memory.",
        "- TorchRL: `DMControlWrapper(pixels.Wrapper(env, pixels_only=True, render_kwargs={\"height\": "
        f"{args.image_size}, \"width\": {args.image_size}, \"camera_id\": C}}))` with dm_control's "
        "default render settings (shadows, reflections, multisampled offscreen buffer of the model's "
        "size); `ParallelEnv(W, make_fn)` (spawned workers) for W > 1. Same task (dm_control suite "
        "loader, seeds 0..W-1, infinite time limit like ours), same camera C (the task's default: 0, "
        "quadruped 2), same frame size, same number of steps.",
        "",
        table,
        "",
        f"Target (ours per worker >= {TARGET_PER_WORKER:.0f}x TorchRL's per worker): "
        + "; ".join(verdicts) + ".",
        "",
        *[line for note in notes for line in (note, "")],
        *failures_section(failed),
    ]
    if frames:
        lines += [
            "## Same scene?",
            "",
            "One frame of each side, rendered from the same physics state (ours after 30 random steps, "
            "copied into the baseline's dm_control physics with `set_physics_state`), saved as PNG and "
            "compared by eye: same body, pose, camera and floor. The differences are the render "
            "settings, by design: ours draws no shadows and no floor reflection and does not "
            "multisample, so edges are stair-stepped and the floor under the body is plain; "
            "dm_control's frame has the body's shadow and its mirror image in the floor, smoothed "
            "edges, and is a little brighter overall (mean RGB below).",
            "",
        ]
        for task, f in frames.items():
            lines.append(
                f"- {task}: `{f['paths']['ours']}`, `{f['paths']['torchrl']}`, 4x side by side (ours "
                f"left) `{f['paths']['side_by_side']}`; mean absolute difference "
                f"{f['mean_abs_diff']:.1f} / 255, {100 * f['frac_pixels_diff_gt_32']:.1f}% of pixels "
                f"differ by more than 32 in some channel; mean RGB ours {f['mean_ours']}, TorchRL "
                f"{f['mean_torchrl']}.")
        lines.append("")
    report = "\n".join(lines)
    print()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}")
    return 0


def measure(args: argparse.Namespace, base: dict, configs: list[tuple[str, str, int]],
            label) -> tuple[dict, dict, dict]:
    """Run every ``(task, side, n)`` configuration ``args.rounds`` times, each in a fresh process.

    ``n`` is the worker count (dm_control sides) or the number of worlds (mjwarp); ``label(side, n)``
    names a configuration in the progress lines. Returns frames/s per segment and startup seconds
    per round, both keyed by configuration, and the error of each configuration that failed (it is
    not retried; the others still run, so one side that cannot render here loses no measurement).
    """
    fps = {c: [] for c in configs}
    startup = {c: [] for c in configs}
    failed: dict[tuple[str, str, int], str] = {}
    for r in range(args.rounds):
        for task, side, n in configs:
            if (task, side, n) in failed:
                continue
            spec = {**base, "job": "run", "task": task, "workers": n, "side": side, "steps": args.steps,
                    "segments": args.segments, "warmup": args.warmup}
            try:
                res = spawn(spec, args.timeout)
            except RuntimeError as err:
                failed[(task, side, n)] = last_error_line(err)
                print(f"round {r + 1}/{args.rounds} {task} {label(side, n)}: FAILED: {failed[(task, side, n)]}",
                      flush=True)
                continue
            fps[(task, side, n)] += res["fps"]
            startup[(task, side, n)].append(res["startup_s"])
            print(f"round {r + 1}/{args.rounds} {task} {label(side, n)}: frames/s "
                  + ", ".join(fmt(x) for x in res["fps"]) + f" (startup {res['startup_s']:.1f} s, pixels "
                  f"{res['pixels_shape']})", flush=True)
    return fps, startup, failed


def last_error_line(err: Exception) -> str:
    """The most telling part of a child's failure: its last exception line, with the lines that continue it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[\w.]*(Error|Exception)\b", lines[i]):
            cont = [line for line in lines[i + 1:i + 4] if not line.startswith(("File ", "Traceback"))]
            return " ".join([lines[i], *cont])[:300]
    return lines[-1][:300] if lines else type(err).__name__


def failures_section(failed: dict) -> list[str]:
    """Report lines naming each configuration that failed and why."""
    if not failed:
        return []
    return ["## Failed runs", "", *[f"- {task} {side} {n}: `{why}`" for (task, side, n), why in failed.items()], ""]


def save_all_frames(args: argparse.Namespace, base: dict, job: str) -> dict:
    """The side-by-side frames of every task (``job`` "frames" or "frames_mjwarp"); none without --frames-dir.

    A task whose frames cannot be made (a side cannot render here) is left out with a message.
    """
    frames = {}
    if args.frames_dir is not None:
        args.frames_dir.mkdir(parents=True, exist_ok=True)
        for task in args.tasks:
            try:
                frames[task] = spawn({**base, "job": job, "task": task, "frames_dir": str(args.frames_dir)},
                                     args.timeout)
            except RuntimeError as err:
                print(f"{task}: no frames: {last_error_line(err)}", flush=True)
                continue
            print(f"{task}: frames saved to {frames[task]['paths']}")
    return frames


def main_mjwarp(args: argparse.Namespace, command: str, base: dict) -> int:
    """``--backend mjwarp``: ours on MuJoCo Warp (N worlds) against ours on dm_control (W workers)."""
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t_start = time.perf_counter()
    configs = [(task, side, n) for task in args.tasks
               for side, counts in (("mjwarp", args.num_envs), ("dmc", args.workers)) for n in counts]
    fps, startup, failed = measure(args, base, configs, lambda side, n: f"{side} N={n} worlds on {args.device}"
                           if side == "mjwarp" else f"{side} W={n} workers")
    frames = save_all_frames(args, base, "frames_mjwarp")
    elapsed = time.perf_counter() - t_start

    rows = ["| task | backend | envs | device | frames/s | vs best dmc | startup s (first run / median) |",
            "|---|---|---:|---|---:|---:|---:|"]
    for task in args.tasks:
        dmc = [statistics.median(fps[(task, "dmc", w)]) for w in args.workers if (task, "dmc", w) not in failed]
        best_dmc = max(dmc, default=None)
        for side, counts in (("mjwarp", args.num_envs), ("dmc", args.workers)):
            for n in counts:
                where = args.device if side == "mjwarp" else f"cpu, {n} worker(s)"
                if (task, side, n) in failed:
                    rows.append(f"| {task} | {side} | {n} | {where} | failed (below) | - | - |")
                    continue
                f = statistics.median(fps[(task, side, n)])
                s = startup[(task, side, n)]
                ratio = f"{f / best_dmc:.2f}x" if best_dmc else "-"
                rows.append(f"| {task} | {side} | {n} | {where} | {fmt(f)} | {ratio} | "
                            f"{s[0]:.1f} / {statistics.median(s):.1f} |")
    size = f"{args.image_size}x{args.image_size}"
    lines = [
        "# Env benchmark: MuJoCo Warp backend against the dm_control backend",
        "",
        f"- date: {started}",
        f"- machine: {versions()}; mjwarp device: {args.device} ({processor_name(args.device)}); load average at "
        f"start {load:.2f} (shared machine: both backends are interleaved so that they see the same load)",
        f"- command: `{command}` (took {elapsed:.0f} s)",
        f"- setup: {size} RGB frames, random actions from `env.action_spec.rand()`, `td = env.step(td)[\"next\"]` "
        f"loop; each run is a fresh process that builds the env, resets once, takes {args.warmup} warm-up steps, "
        f"then times {args.segments} segment(s) of {args.steps} steps (no reset inside; CUDA synchronised at "
        f"segment ends); medians over {args.rounds * args.segments} segments. Frames/s = env steps per second "
        "summed over the envs. Startup = building the env (Warp kernel compilation or cache load included) "
        "plus the first reset.",
        f"- mjwarp: `make_env(task, obs=(\"pixels\",), image_size={args.image_size}, num_envs=N, "
        f"backend=\"mjwarp\", device=\"{args.device}\")`: N worlds in one MuJoCo Warp batch, frames from its "
        "batch ray tracer, physics and rewards stay on the device.",
        f"- dmc: `make_env(task, obs=(\"pixels\",), image_size={args.image_size}, num_envs=W, num_workers=W)`: "
        "W forked worker processes, one dm_control env and one 64x64 OpenGL renderer each.",
        "",
        "\n".join(rows),
        "",
    ]
    if args.device == "cpu":
        lines += ["On the CPU, Warp runs each kernel launch as a serial loop on one core and a MuJoCo Warp control "
                  "step is hundreds of launches (walker: 10 physics substeps per control step), so mjwarp pays a "
                  "fixed cost per step whatever N (about 70 ms for walker here) plus a few ms of ray tracing per "
                  "64x64 frame; it reaches dm_control's frames/s only at large N. The CPU path is there for tests "
                  "and parity checks; throughput is the GPU's job.", ""]
    if frames:
        lines += ["## Same scene?", ""]
        for task, f in frames.items():
            lines.append(f"- {task}: `{f['paths']['side_by_side']}` (4x, mjwarp left, dmc right, same physics "
                         f"state); mean absolute difference {f['mean_abs_diff']:.1f} / 255, mean RGB mjwarp "
                         f"{f['mean_mjwarp']}, dmc {f['mean_dmc']}.")
        lines.append("")
    lines += failures_section(failed)
    report = "\n".join(lines)
    print()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    if "--run-one" in sys.argv:
        child_main(parse_args().run_one)
    else:
        sys.exit(main())
