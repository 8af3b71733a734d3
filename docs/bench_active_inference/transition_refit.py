"""Is the transition what limits check 2 by the spec's G? Refit it alone on frozen beliefs (issue 14)

    python docs/bench_active_inference/transition_refit.py --load-model <model.pt> --data <buffers> [bench options] \
        --refit-pairs 60000 --refit-steps 20000 [--refit-lr 3e-4] [--residual] [--save-model <refit.pt>]

Takes the options of scripts/bench_active_inference.py (the model's settings and buffers; ``--train-episodes`` picks
the training buffer). The free energy's only term that depends on the transition ensemble is the transition KL,
``mean_e KL(q(s_{t+1}|o_{t+1}) || p_e(s_{t+1}|s_t, a_t))`` with ``s_t ~ q(s_t|o_t)``; with the encoder fixed its
targets stop moving, so minimising it over the transition alone shows how well *these beliefs* can be predicted.
The posteriors of ``--refit-pairs`` training transitions are computed once (an encoder pass per frame, no
decoder), the last 5,000 held out; each member is then trained by Adam on batches of 256 for ``--refit-steps``, the
held-out KL read every 1,000 steps and the members of the lowest kept. Nothing else in the model changes, and
the free nats (a floor the KL is above here) are left out.

``--residual``: the members are re-initialised and predict the change, ``mean = s_t + net(s_t, a_t)`` (not the
model's form, so measured here and not saved). ``--save-model``: the refit model, its record under
``transition_refit`` (readable by the benchmark's ``--load-model`` for checks 2 and 3). Writes
``transition_refit.json`` to ``--fig-dir``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402

from latentrl.world_models.layers import gaussian_kl  # noqa: E402

HELD_OUT = 5000
BATCH = 256


@torch.no_grad()
def encode_pairs(wm, buffer, pairs: int, frame_stack: int, chunk: int = 2000) -> dict[str, torch.Tensor]:
    """The beliefs of ``pairs`` random transitions of ``buffer``: ``mean0, std0`` (q(s_t|o_t)), ``action``,
    ``mean1, std1`` (q(s_{t+1}|o_{t+1})), each ``[pairs, ...]``, from torch's global generator."""
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("mean0", "std0", "action", "mean1", "std1")}
    for start in range(0, pairs, chunk):
        batch = buffer.sample(min(chunk, pairs - start), frame_stack=frame_stack, keys=["pixels"])
        m0, s0 = wm.posterior(batch["pixels"])
        m1, s1 = wm.posterior(batch["next", "pixels"])
        for key, value in zip(rows, (m0, s0, batch["action"].float(), m1, s1), strict=True):
            rows[key].append(value)
    return {k: torch.cat(v) for k, v in rows.items()}


def transition_kl(wm, data: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """The members' mean transition KL on rows ``idx``, from one draw of ``s_t ~ q(s_t|o_t)``."""
    s = data["mean0"][idx] + data["std0"][idx] * torch.randn_like(data["std0"][idx])
    means, stds = wm.transition_members(s, data["action"][idx])
    return gaussian_kl(data["mean1"][idx], data["std1"][idx], means, stds).mean()


def make_residual(wm) -> None:
    """Re-initialise the members and make them predict the change, ``s_t + net(s_t, a_t)`` (this instance only)."""
    for member in wm.transitions:
        for module in member.modules():
            if module is not member and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    plain = type(wm).transition_members

    def transition_members(self, s, action):
        means, stds = plain(self, s, action)
        return means + s, stds

    wm.transition_members = types.MethodType(transition_members, wm)


def refit(wm, data: dict[str, torch.Tensor], steps: int, lr: float, seed: int = 0, log_every: int = 1000) -> dict:
    """Train the transition members alone on ``data`` (:func:`encode_pairs`; the first :data:`HELD_OUT` rows held
    out) and keep the members of the lowest held-out KL. Returns the record: held-out KL before and at its best,
    the step of the best, ``log`` ``[(step, batch KL, held-out KL)]``."""
    n = len(data["action"])
    held = min(HELD_OUT, n // 5)
    fit = torch.arange(held, n)
    gen = torch.Generator().manual_seed(seed)
    frozen = {name: p.requires_grad for name, p in wm.named_parameters()}
    for p in wm.parameters():
        p.requires_grad_(False)
    params = list(wm.transitions.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)

    def held_out() -> float:
        with torch.no_grad(), bench.fixed_draws(seed + 1):  # the same state draws at every reading
            return float(transition_kl(wm, data, torch.arange(held)))

    before = held_out()
    best, kept, best_step, log = before, copy.deepcopy(wm.transitions.state_dict()), 0, []
    try:
        for step in range(1, steps + 1):
            idx = fit[torch.randint(len(fit), (BATCH,), generator=gen)]
            loss = transition_kl(wm, data, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % log_every == 0 or step == steps:
                now = held_out()
                log.append((step, round(loss.item(), 4), round(now, 4)))
                print(f"[transition_refit] step {step}: batch KL {loss.item():.3f}, held-out {now:.3f}", flush=True)
                if now < best:
                    best, kept, best_step = now, copy.deepcopy(wm.transitions.state_dict()), step
    finally:
        for name, p in wm.named_parameters():
            p.requires_grad_(frozen[name])
    wm.transitions.load_state_dict(kept)
    return {"pairs": n, "held_out": held, "steps": steps, "lr": lr, "held_kl_before": round(before, 4),
            "held_kl_best": round(best, 4), "best_step": best_step, "log": log}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = {"--refit-pairs": 60000, "--refit-steps": 20000, "--refit-lr": 3e-4}
    for flag, default in extra.items():
        if flag in argv:
            i = argv.index(flag)
            extra[flag] = type(default)(argv[i + 1])
            del argv[i : i + 2]
    residual = "--residual" in argv
    argv = [a for a in argv if a != "--residual"]
    args = bench.parse_args(argv)
    if residual and args.save_model:
        raise SystemExit("--residual changes the model's form, which a model file cannot hold: drop --save-model")
    torch.set_num_threads(args.threads)
    train, _ = bench.load_or_collect(args)
    agent = bench.build_agent(args)
    trained = bench.load_model_file(agent, args.load_model)  # the file's training record, kept in the refit's file
    agent.eval()
    wm = agent.world_model
    started = time.time()
    with bench.fixed_draws(args.seed):
        data = encode_pairs(wm, train, extra["--refit-pairs"], agent.frame_stack)
    print(f"[transition_refit] encoded {len(data['action'])} pairs in {time.time() - started:.0f} s", flush=True)
    if residual:
        make_residual(wm)
    record = refit(wm, data, extra["--refit-steps"], extra["--refit-lr"], seed=args.seed)
    out = {"model": args.load_model, "residual": residual, **record, "seconds": round(time.time() - started, 1)}
    if args.save_model:
        Path(args.save_model).parent.mkdir(parents=True, exist_ok=True)
        bench.save_model_file(agent.eval(), {**trained, "transition_refit": out}, args.save_model)
    print(json.dumps(out))
    fig_dir = Path(args.fig_dir or ".")
    fig_dir.mkdir(parents=True, exist_ok=True)
    (fig_dir / "transition_refit.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
