"""Where does a trained world model lose the action that check 2 asks it to find? (issue 14)

    python docs/bench_active_inference/latent_ranking.py --load-model <model.pt> --data <buffers> [bench options]

Takes the options of scripts/bench_active_inference.py (the model settings and the buffers of the page's run). On
check 2's own held-out cases and candidates (the same draws as ``bench_active_inference.scorer_ranking``), it ranks
the true a_t among 1000 random candidates with the goal set to o_{t+1} by:

1. ``G``: the benchmark's check 2 as it stands (J sampled beliefs and transition draws, common to the candidates).
2. ``risk_mean_path``: the FER risk at the means, no sampling: each ensemble member's predicted mean from the
   belief's mean, sum_d (mu'_d - mu_g,d)^2 / (2 sigma_g,d^2), averaged over the members.
3. ``risk_expected``: the same risk's expectation under each member's Gaussian prediction, in closed form
   (adds sum_d sigma'_d^2 / (2 sigma_g,d^2), which depends on the action through sigma'), averaged over members:
   the ``latent_nll`` risk (``nll_risk``, the spec §7 scorer's FER form; with its constant) from the belief's mean.
4. ``latent_distance``: ||mu' - mu_g||^2 at the means, averaged over members (no goal precision).
4b. ``overlap_expected``: the ``latent_overlap`` risk at the means (``overlap_risk``), sum_d (mu'_d - mu_g,d)^2 /
   (2 (sigma'_d^2 + sigma_g,d^2)) + log(sigma'_d^2 + sigma_g,d^2) / 2 + const, averaged over the members: each
   dimension weighed by what the model predicts it to, not by the goal belief alone. Beside the scorers, per latent
   dimension (``per_dim``; medians over cases and members): the goal belief's std, the true action's predicted std,
   the true action's miss (RMS of mu' - mu_g over cases) and the spread the candidates give the predicted mean
   (std over candidates).
5. ``latent_inverse_probe``: not a scorer of the model but a test of its latent: an MLP fitted on training
   transitions from the posterior means (mu_t, mu_{t+1} - mu_t) to a_t, candidates ranked by distance to its
   prediction. If this ranks the true action well while 1-4 do not, the latent carries the action and the
   transition or the risk loses it; if it does not, the belief has already lost it.
6. ``encoder_features_inverse_probe``: the same probe on the encoder's features before the posterior head (the
   256 values the belief's mean and std are read from): whether the encoder saw the action and the head dropped it.

7. ``state_probe``: what the belief knows of the simulator's state, against what the action changes. An MLP from
   the belief mean mu_t to the physics state at t (point_mass: position and velocity), fitted on training
   transitions and read on held-out ones: RMSE and R^2 of the position and of the velocity. Beside it, from a
   least-squares fit of the state at t+1 on the state at t and a_t (the motion is linear without contacts), how much
   a uniform random action moves the state at t+1 (the std over actions of the action's part of that fit): a belief
   whose velocity error exceeds what the action changes in the velocity cannot rank the action by it. (Reacher's
   shoulder, an unlimited joint, is read as its sine and cosine, its error wrapped.)
8. ``state_probe_pixels``: the same probe on the stacked frames themselves, average-pooled 4x4: a reference for
   what the frames hold (a lower bound: the pooling blurs motion finer than 4 pixels, as point_mass's is).

Writes ``latent_ranking.json`` to ``--fig-dir``. ``inverse_ceiling.py`` beside it is the same question for a network
trained on the pixels themselves.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_active_inference as bench  # noqa: E402

from latentrl.agents.active_inference import nll_risk, overlap_risk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inverse_ceiling import least_squares  # noqa: E402


def fraction(scores: torch.Tensor) -> dict:
    """Check 2's reading of ``scores`` ``[N, 1 + K]`` (true action first, lower is better)."""
    return bench.rank_summary(bench.true_action_rank(scores))


@torch.no_grad()
def member_predictions(wm, start: torch.Tensor, actions: torch.Tensor, chunk: int = 20000):
    """Every member's p(s'|s, a) for ``actions`` ``[N, K, A]`` from ``start`` ``[N, D]``: means, stds
    ``[E, N, K, D]``."""
    n, k, a = actions.shape
    s = start[:, None].expand(n, k, -1).reshape(n * k, -1)
    flat = actions.reshape(n * k, a)
    parts = [wm.transition_members(s[i : i + chunk], flat[i : i + chunk]) for i in range(0, n * k, chunk)]
    means = torch.cat([m for m, _ in parts], dim=1)
    stds = torch.cat([s_ for _, s_ in parts], dim=1)
    return means.reshape(-1, n, k, means.shape[-1]), stds.reshape(-1, n, k, stds.shape[-1])


@torch.no_grad()
def mean_path_scores(wm, now_mean: torch.Tensor, goal_mean: torch.Tensor, goal_std: torch.Tensor,
                     actions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores ``[N, 1 + K]`` of ``actions`` ``[N, 1 + K, A]`` (lower is better) by scorers 2-4 of the module
    docstring, from the belief means ``now_mean`` ``[N, D]`` toward the goal beliefs ``N(goal_mean, goal_std)``;
    and, as scalars (medians over cases and members): how far the candidates spread the predicted mean (the norm
    over dimensions of its std over candidates, each dimension in units of the goal belief's std), the goal std,
    and how far the true action's prediction lands from the goal mean in the same units. A miss much larger than
    the spread means the prediction is off by more than any action can move it."""
    means, stds = member_predictions(wm, now_mean, actions)  # [E, N, 1+K, D]
    precision = 1 / (2 * goal_std.square())[None, :, None]  # [1, N, 1, D]
    gap = (means - goal_mean[None, :, None]).square()
    return {
        "risk_mean_path": (gap * precision).sum(-1).mean(0),
        "risk_expected": nll_risk(means, stds, goal_mean[None, :, None], goal_std[None, :, None]).mean(0),
        "latent_distance": gap.sum(-1).mean(0),
        "overlap_expected": overlap_risk(means, stds, goal_mean[None, :, None], goal_std[None, :, None]).mean(0),
        "action_spread_in_goal_stds_median": (means[:, :, 1:].std(dim=2) / goal_std[None]).norm(dim=-1).median(),
        "goal_std_median": goal_std.median(),
        "true_action_miss_in_goal_stds_median": ((means[:, :, 0] - goal_mean[None]) / goal_std[None])
        .norm(dim=-1).median(),
        "per_dim": {"goal_std": goal_std.median(0).values,
                    "true_action_predicted_std": stds[:, :, 0].flatten(0, 1).median(0).values,
                    "true_action_miss_rms": (means[:, :, 0] - goal_mean[None]).square().mean((0, 1)).sqrt(),
                    "candidate_spread": means[:, :, 1:].std(dim=2).flatten(0, 1).median(0).values},
    }


def embed_all(embed, frames: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """``embed`` over ``frames`` in chunks, without gradients."""
    with torch.no_grad():
        return torch.cat([embed(frames[i : i + chunk]) for i in range(0, len(frames), chunk)])


def fit_probe(x: torch.Tensor, y: torch.Tensor, updates: int, seed: int):
    """An MLP from ``x`` to ``y`` (inputs standardised), keeping the weights of the update (every 100th) with the
    lowest error on the last seventh of the rows; returns it as a function of unstandardised inputs."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    gen = torch.Generator().manual_seed(seed)
    with bench.fixed_draws(seed + 501):  # the initial weights
        net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ELU(), nn.Linear(256, 256), nn.ELU(),
                            nn.Linear(256, y.shape[1]))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    fit = len(x) - len(x) // 7  # the last seventh of the transitions picks the update to keep (no overfitting)
    best, kept = float("inf"), copy.deepcopy(net.state_dict())
    for update in range(1, updates + 1):
        idx = torch.randint(0, fit, (256,), generator=gen)
        loss = (net((x[idx] - mu) / sd) - y[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if update % 100 == 0 or update == updates:
            with torch.no_grad():
                held = float((net((x[fit:] - mu) / sd) - y[fit:]).square().mean())
            if held < best:
                best, kept = held, copy.deepcopy(net.state_dict())
    net.load_state_dict(kept)
    return lambda inputs: net((inputs - mu) / sd)


def inverse_probe(embed, train, frame_stack: int, transitions: int = 20000, updates: int = 3000, seed: int = 0):
    """An MLP from (e_t, e_{t+1} - e_t) to a_t on ``transitions`` training transitions, where ``e = embed(o)``
    (the posterior mean, or the encoder's features before the posterior head); returns its prediction as a
    function of (e_t, e_{t+1})."""
    with bench.fixed_draws(seed + 500):
        batch = train.sample(transitions, frame_stack=frame_stack, keys=["pixels"])
    now, nxt = embed_all(embed, batch["pixels"]), embed_all(embed, batch["next", "pixels"])
    net = fit_probe(torch.cat([now, nxt - now], 1), batch["action"].float(), updates, seed)
    return lambda now_, nxt_: net(torch.cat([now_, nxt_ - now_], 1))


def action_effect(train, transitions: int = 20000, seed: int = 0) -> torch.Tensor:
    """Per physics component ``[P]``: the std, over uniform random actions in [-1, 1], of the action's part of the
    least-squares fit physics_{t+1} ~ [physics_t, a_t, 1] (``inverse_ceiling.least_squares``): how far one action
    moves the next state."""
    with bench.fixed_draws(seed + 502):
        batch = train.sample(transitions, keys=["physics"])
    now, nxt, a = batch["physics"].double(), batch["next", "physics"].double(), batch["action"].double()
    coef = least_squares(torch.cat([now, a], 1), nxt)  # [P + A + 1, P]
    action_part = coef[now.shape[1] : now.shape[1] + a.shape[1]]  # [A, P]
    # a uniform on [-1, 1] has variance 1/3 per independent component
    return (action_part.square().sum(0) / 3).sqrt().float()


def state_probe(embed, train, heldout, frame_stack: int, transitions: int = 20000, updates: int = 3000,
                cases: int = 2000, seed: int = 0, angles: tuple[int, ...] = ()) -> dict:
    """An MLP from ``embed(o_t)`` to the physics state at t, fitted on ``transitions`` training observations and
    read on ``cases`` held-out ones; with :func:`action_effect`, per half of the state (position, then velocity):
    RMSE, R^2 and the action's effect on the next state (as RMS over the half's components).

    ``angles``: the position components that are angles of unlimited joints (reacher's shoulder, whose recorded
    angle winds to +-13 rad): the probe predicts their sine and cosine, the error is the wrapped difference of the
    angle read back (atan2), and R^2 is against the spread of the wrapped angle."""
    with bench.fixed_draws(seed + 503):
        batch = train.sample(transitions, frame_stack=frame_stack, keys=["pixels", "physics"])
        test = heldout.sample(min(cases, len(heldout)), frame_stack=frame_stack, keys=["pixels", "physics"])
    target = probe_targets(batch["physics"].float(), angles)
    # targets standardised: point_mass's velocities spread ~8x less than its positions and would hardly count
    centre, scale = target.mean(0), target.std(0) + 1e-8
    net = fit_probe(embed_all(embed, batch["pixels"]), (target - centre) / scale, updates, seed)
    with torch.no_grad():
        predicted = net(embed_all(embed, test["pixels"])) * scale + centre
    truth = test["physics"].float()
    err, spread = component_errors(predicted, truth, angles)
    effect = action_effect(train, transitions, seed)
    half = truth.shape[1] // 2
    out = {}
    for name, part in (("position", slice(0, half)), ("velocity", slice(half, None))):
        out[f"{name}_rmse"] = float(err[part].mean().sqrt())
        out[f"{name}_r2"] = float((1 - err[part] / spread[part]).mean())
        out[f"{name}_r2_each"] = (1 - err[part] / spread[part]).tolist()  # per component
        out[f"action_effect_on_next_{name}"] = float(effect[part].square().mean().sqrt())
        out[f"{name}_rmse_over_action_effect"] = out[f"{name}_rmse"] / out[f"action_effect_on_next_{name}"]
    return out


def wrap(angle: torch.Tensor) -> torch.Tensor:
    """An angle wrapped to [-pi, pi)."""
    return torch.remainder(angle + torch.pi, 2 * torch.pi) - torch.pi


def probe_targets(physics: torch.Tensor, angles: tuple[int, ...]) -> torch.Tensor:
    """The state probe's targets ``[N, P + len(angles)]``: the components in order, each of ``angles`` as its sine
    and cosine."""
    cols = []
    for i in range(physics.shape[1]):
        cols += [physics[:, i].sin(), physics[:, i].cos()] if i in angles else [physics[:, i]]
    return torch.stack(cols, 1)


def component_errors(predicted: torch.Tensor, truth: torch.Tensor,
                     angles: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per physics component ``[P]``: the mean squared error of ``predicted`` (laid out as :func:`probe_targets`)
    against ``truth`` ``[N, P]``, and the variance it is an R^2 against; for ``angles`` both wrapped (the angle read
    back by atan2 of the predicted sine and cosine)."""
    err, spread, col = [], [], 0
    for i in range(truth.shape[1]):
        if i in angles:
            read = torch.atan2(predicted[:, col], predicted[:, col + 1])
            err.append(wrap(read - truth[:, i]).square().mean())
            spread.append(wrap(truth[:, i]).var())
            col += 2
        else:
            err.append((predicted[:, col] - truth[:, i]).square().mean())
            spread.append(truth[:, i].var())
            col += 1
    return torch.stack(err), torch.stack(spread)


def pooled_pixels(frames: torch.Tensor, pool: int = 4) -> torch.Tensor:
    """The stacked frames average-pooled ``pool`` x ``pool`` and flattened, in [0, 1]: the state probe's reference
    input, what the frames themselves hold (at a quarter of the resolution: 1,536 inputs for two 64x64 frames)."""
    return torch.nn.functional.avg_pool2d(frames.float() / 255.0, pool).flatten(1)


# the joints whose recorded angle winds without limit, per domain (the state probe reads them as sine and cosine)
UNLIMITED_ANGLES = {"reacher": (0,)}


def main(argv=None, probe_transitions: int = 20000, probe_updates: int = 3000) -> dict:
    """``probe_*``: the probes' training transitions and updates (smaller in the tests)."""
    args = bench.parse_args(argv)
    args.rank_risks = ["latent"]  # the benchmark's other risk forms are not asked for here
    torch.set_num_threads(args.threads)
    train, heldout = bench.load_or_collect(args)
    agent = bench.load_saved_agent(args)
    wm = agent.world_model
    started = time.time()
    out = {"model": args.load_model, "cases": args.rank_cases, "candidates": args.rank_candidates}
    out["G_benchmark"] = bench.scorer_ranking(agent, heldout, args, horizon=1)
    print("[latent_ranking] benchmark:", json.dumps(out["G_benchmark"]), flush=True)

    n, k = args.rank_cases, args.rank_candidates
    with bench.fixed_draws(bench.ranking_seed(args, 1)):  # check 2's own cases and candidates
        first, goal_frames, actions = bench.ranking_cases(heldout, agent.frame_stack, n, k, 1, wm.action_dim,
                                                          args.seed + 1)
    actions = actions[:, :, 0]  # [N, 1 + K, A]
    with torch.no_grad():
        now_mean, _ = wm.posterior(first)
        goal_mean, goal_std = wm.posterior(goal_frames)
    scores = mean_path_scores(wm, now_mean, goal_mean, goal_std, actions)
    per_dim = scores.pop("per_dim")
    out.update({name: fraction(value) for name, value in scores.items() if value.dim() == 2})
    out.update({name: float(value) for name, value in scores.items() if value.dim() == 0})
    out["per_dim"] = {name: [round(float(v), 4) for v in value] for name, value in per_dim.items()}
    embeddings = {"latent_inverse_probe": lambda x: wm.posterior(x)[0],  # the belief's mean
                  "encoder_features_inverse_probe": wm.encoder}  # what the posterior head reads
    for name, embed in embeddings.items():
        probe = inverse_probe(embed, train, agent.frame_stack, probe_transitions, probe_updates, args.seed)
        with torch.no_grad():
            predicted = probe(embed(first), embed(goal_frames))
        out[name] = fraction((actions - predicted[:, None]).square().sum(-1))
        out[name]["action_mse"] = float((predicted - actions[:, 0]).square().mean())
    angles = UNLIMITED_ANGLES.get(args.task.split("-")[0], ())
    for name, embed in (("state_probe", embeddings["latent_inverse_probe"]), ("state_probe_pixels", pooled_pixels)):
        out[name] = state_probe(embed, train, heldout, agent.frame_stack, probe_transitions, probe_updates,
                                seed=args.seed, angles=angles)
        print(f"[latent_ranking] {name}:", json.dumps(out[name]), flush=True)
    out["seconds"] = round(time.time() - started, 1)
    print(json.dumps(out, indent=1))
    fig_dir = Path(args.fig_dir or ".")
    fig_dir.mkdir(parents=True, exist_ok=True)
    (fig_dir / "latent_ranking.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
