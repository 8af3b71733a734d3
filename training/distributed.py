"""Data-parallel learners under ``torchrun``: gloo on CPUs, NCCL on GPUs, one replica of the agent per rank.

``torchrun --nproc_per_node N scripts/train_agent.py ...`` (or several nodes: ``--nnodes M --rdzv_backend c10d
--rdzv_endpoint host:port``) starts N processes that each build the same agent and train it on their own share
of every update batch. :func:`init_from_env` (called by ``train_main`` when torchrun's ``WORLD_SIZE`` is
above 1) joins the process group; the trainer then

- broadcasts rank 0's parameters and buffers (:func:`broadcast_module`), so every rank starts identical;
- averages gradients across ranks before every optimizer step (:class:`GradientAverager`);
- samples ``batch_size / world_size`` rows per rank (:func:`shard_spec`): offline each rank draws only
  from its own episodes (``ReplayBuffer.shard_episodes``: episode ids ``rank, rank + W, ...``), online each
  rank runs its own envs (seeded ``seed + rank * RANK_SEED_STRIDE``) into its own buffer;
- lets rank 0 alone log, evaluate and write checkpoints and model directories, with every rank waiting
  at a barrier around each save (:func:`barrier`), so a job stopped mid-save never leaves half-written files.

Why not ``DistributedDataParallel``: DDP's reducer hooks the backward passes of *one* wrapped module called
through its ``forward`` and expects each step's backward to cover its parameters once. Our updates run
several backward passes over different sub-networks, each with its own optimizer (METRA: ``phi`` and
``lambda``, then the twin Qs, then the policy, then ``alpha``; TD-JEPA: the model, then the actor), call
sub-modules directly (``agent.actor(...)``, ``world_model.loss(...)``) and leave parameters without gradients
in some passes. So, as Horovod's ``DistributedOptimizer`` does, the averaging sits on the optimizers: a
step pre-hook (``Optimizer.register_step_pre_hook``) all-reduces the gradients of that optimizer's
parameters in one flattened bucket per dtype and device, then divides by the world size. A parameter whose
``grad`` is ``None`` on a rank takes part with zeros, and a flag in the same bucket says whether any rank
had a gradient: the gradient is set (to the average) exactly when some rank had one, so Adam skips the same
parameters on every rank and the collectives always match. Averaged gradients are bitwise identical on all
ranks (an all-reduce hands every rank the same sums), so identical optimizers keep identical parameters.

What is not a plain gradient step stays identical across ranks by construction, and the tests hold it
(``tests/test_distributed.py``): EMA targets are functions of identical parameters; METRA's dual variable
is a gradient step; running normalisers (METRA's ``ObservationNormalizer``, RND's statistics) fold the
global batch (``world_models.layers.gather_batch``); terms that pair rows of a batch (TD-JEPA's and FB's
orthonormality losses, FB's [B, B] successor-measure matrix, the ``z`` drawn from permuted rows' goals) are
computed on the gathered global batch, with the gradient flowing back to each rank's rows. Means over a
data-dependent subset of rows (StaMo's probes on action-labelled rows, active inference's transition KL on
recorded actions, and the free-nats clamp of that mean) divide by the global count, and every rank steps every
optimizer whatever its rows hold (masked losses, no branch on the data), so the averaging never waits for a
rank that skipped a step. A loss that sums over rows (PV-RNN's) is scaled by the world size on each rank
(``layers.data_parallel_world_size``), so the averaged gradient is that of the global sum. PV-RNN's adaptive
vectors, per-segment parameters with their own per-entry Adam outside the optimizers, are the global batch's
on every rank (``world_models.pv_rnn.AdaptiveVectors``): rows are assigned for the gathered segment ids, and
each touched entry steps with its gradient gathered from every rank and averaged as the weights' are.
:func:`check_consistent` compares every parameter and buffer across ranks at each checkpoint and stops the
run, naming the tensor, if one drifted. Agents whose updates would drift (:data:`UNSUPPORTED`, and online only
:data:`UNSUPPORTED_ONLINE`) are refused.

Random draws (exploration noise, target smoothing, augmentation, the ``z`` of each row) come from each
rank's own RNG streams: a job's draws are not those of one process, only distributed alike. The equality
test makes them identical per global row on purpose (``GlobalDraws`` in the test).

Counters are the job's: online, ``env_steps`` counts every rank's frames, and ``steps``,
``learning_starts`` and ``updates_per_step`` apply to them, so W ranks of ``n`` envs make the updates one
process of ``W * n`` envs would make. Logged losses are rank 0's (its shard of the batch). Resume: the
checkpoint records ``world_size``; rank ``r >= 1`` keeps its RNG streams and (online) replay buffer in
``checkpoints/rank<r>-<step>.pt`` (:func:`rank_state_path`; on several nodes ``run_dir`` must be on shared
storage). Offline runs resume on any number of processes (episodes re-split); online runs only on their own.
Signals: the trainer's graceful stop (finish the step, save) is off under data parallelism, since ranks would
stop at different steps; a signal ends the job at once, and ``resume=true`` continues from the last checkpoint.

Failures: a rank that dies (killed, out of memory) breaks the collectives of the others; gloo reports a
closed connection at once, and any collective waits at most ``LATENTRL_DIST_TIMEOUT`` seconds (default
:data:`DEFAULT_TIMEOUT_S`: long enough for rank 0's evaluations, during which the others wait). Each rank
marks in the rendezvous store how it ended (:func:`mark_failed`), so a surviving rank's error names the ranks
that vanished (:func:`describe_peer_failure`); torchrun's summary names the failing local rank and exit code.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from latentrl.world_models.layers import set_data_parallel_group

__all__ = ["DEFAULT_TIMEOUT_S", "RANK_SEED_STRIDE", "UNSUPPORTED", "UNSUPPORTED_ONLINE", "DistContext",
           "GradientAverager", "PeerFailedError", "RankDivergedError", "barrier", "broadcast_module",
           "check_consistent", "check_supported", "current", "describe_peer_failure", "init_from_env",
           "is_collective_failure", "is_main", "main_then_share", "mark_failed", "rank_state_path", "shard_spec",
           "shutdown"]

TIMEOUT_ENV = "LATENTRL_DIST_TIMEOUT"
"""Seconds any collective (gradient averaging, barrier, broadcast) waits for the other ranks."""
DEFAULT_TIMEOUT_S = 900
"""Default of ``LATENTRL_DIST_TIMEOUT``: longer than rank 0's evaluations and saves, which the others wait out."""
BACKEND_ENV = "LATENTRL_DIST_BACKEND"
"""Overrides the backend (default: ``gloo``, or ``cpu:gloo,cuda:nccl`` when CUDA is present)."""
FAULT_ENV = "LATENTRL_FAULT_INJECT"
"""Test hook ``"<rank>:<k>"``: that rank exits with ``os._exit(1)`` (no cleanup, as a killed process) at its
``k``-th gradient averaging. Used by ``tests/test_distributed.py`` to kill a rank mid-run."""
RANK_SEED_STRIDE = 104_729
"""Rank ``r`` seeds its RNGs and its envs with ``seed + r * RANK_SEED_STRIDE``: distinct streams per rank."""
UNSUPPORTED: dict[str, str] = {}
"""Agents refused under data-parallel training, with the reason (their state would drift between ranks).
None at present; pv_rnn and stamo left it once their updates folded the global batch (module docstring)."""
UNSUPPORTED_ONLINE: dict[str, str] = {}
"""Agents refused under data-parallel training of an online run (own envs and buffer per rank), with the reason.
None at present: PV-RNN, whose adaptive vectors are keyed by episode ids, left it once each rank's buffer numbered
its episodes ``rank, rank + W, ...`` (``ReplayBuffer.number_episodes``), so ids are unique across the job."""
_STORE_PREFIX = "latentrl/"


@dataclass(frozen=True)
class DistContext:
    """This process's place in the data-parallel job (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT: list[DistContext | None] = [None]


def current() -> DistContext | None:
    """The job this process belongs to, or ``None`` in a single process."""
    return _CONTEXT[0]


def is_main() -> bool:
    """True on rank 0 and in a single process: the process that logs, evaluates and writes files."""
    ctx = current()
    return ctx is None or ctx.is_main


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{name} is not set: start data-parallel runs with torchrun, which sets RANK, "
                             "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer (torchrun sets it)") from None


def timeout_seconds() -> float:
    """``LATENTRL_DIST_TIMEOUT`` (seconds > 0), or :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give the seconds a collective may wait for the other ranks, "
                         f"a number > 0 (default {DEFAULT_TIMEOUT_S})")
    return value


def init_from_env() -> DistContext | None:
    """Join the process group torchrun describes in the environment; ``None`` (and nothing done) when the
    process was not started by torchrun or the world has one process.

    Backend: gloo for CPU tensors, NCCL for CUDA tensors when CUDA is present (one process group serving
    both), unless ``LATENTRL_DIST_BACKEND`` names one. The group is declared as the data-parallel group of
    the update batches (``world_models.layers.set_data_parallel_group``).
    """
    if current() is not None:
        return current()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return None
    _env_int("RANK")  # required: a clear error when torchrun did not set it
    local_rank = _env_int("LOCAL_RANK", 0)
    backend = os.environ.get(BACKEND_ENV) or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    timeout = timeout_seconds()
    if torch.cuda.is_available() and "nccl" in backend:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                      backend=backend, timeout_s=timeout)
    _CONTEXT[0] = ctx
    set_data_parallel_group(dist.group.WORLD)
    return ctx


def shutdown() -> None:
    """Leave the process group (after a finished run; a failed one just exits)."""
    if current() is None:
        return
    _mark(f"done/{current().rank}", "finished")
    set_data_parallel_group(None)
    _CONTEXT[0] = None
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- collectives
def barrier() -> None:
    """Wait for every rank (a no-op in a single process). A small CPU all-reduce, served by gloo under both
    backends, so it needs no CUDA device mapping."""
    if current() is not None:
        dist.all_reduce(torch.zeros(1))


def main_then_share(fn: Callable[..., Any], *args: Any, share: Callable[[Any], Any] = lambda result: result) -> Any:
    """Run ``fn(*args)`` on rank 0 only and give the other ranks ``share(result)`` (picklable); an exception
    raised on rank 0 is raised on every rank. In a single process, ``fn(*args)``.

    For what must happen once per job, such as claiming a new run folder (two ranks would create two)."""
    ctx = current()
    if ctx is None:
        return fn(*args)
    payload: list[Any] = [None]
    if ctx.is_main:
        try:
            result = fn(*args)
        except Exception as err:
            payload[0] = ("error", err)
            dist.broadcast_object_list(payload, src=0)
            raise
        payload[0] = ("ok", share(result))
        dist.broadcast_object_list(payload, src=0)
        return result
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = [(f"parameter {n}", p.data) for n, p in module.named_parameters()]
    named += [(f"buffer {n}", b) for n, b in module.named_buffers() if b is not None]
    return named


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place), so that ranks which
    initialised their networks from different seeds start identical."""
    if current() is None:
        return
    for _, tensor in _tensors(module):
        dist.broadcast(tensor, src=src)


class RankDivergedError(RuntimeError):
    """Ranks hold different values in a tensor that data-parallel training keeps identical."""


@torch.no_grad()
def check_consistent(module: nn.Module, what: str = "the agent") -> None:
    """Stop with :class:`RankDivergedError` when any parameter or buffer of ``module`` differs between ranks.

    Each rank reduces every tensor to two float64 fingerprints (its sum and a position-weighted sum); rank 0
    compares them across ranks. Identical tensors give identical fingerprints bitwise; a drifted normaliser,
    EMA target or optimizer-less state shows. One all-gather of ``2 x #tensors`` numbers."""
    ctx = current()
    if ctx is None:
        return
    named = _tensors(module)
    prints = []
    for _, t in named:
        flat = t.detach().reshape(-1).to("cpu", torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(97).add_(1)
        prints.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    mine = torch.stack(prints) if prints else torch.zeros(0, 2, dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(every, mine)
    stacked = torch.stack(every)  # [W, T, 2]
    same = (stacked == stacked[:1]) | (stacked.isnan() & stacked[:1].isnan())
    bad = (~same.all(dim=2)).any(dim=0).nonzero().flatten().tolist()
    if bad:
        ranks = sorted({r for r in range(ctx.world_size) for i in bad if not bool(same[r, i].all())})
        names = ", ".join(named[i][0] for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise RankDivergedError(
            f"data-parallel ranks disagree on {what}: rank(s) {', '.join(map(str, ranks))} hold other values "
            f"than rank 0 in {names}. A part of the update that is not a gradient step (a normaliser, a "
            "per-sequence state, a draw that should be shared) differs between ranks; train this agent in one "
            "process, or make that part fold the global batch (world_models.layers.gather_batch)")


# ------------------------------------------------------------------------------------ gradient averaging
class GradientAverager:
    """Average the gradients of every optimizer's parameters over the ranks, just before each step.

    Installs a step pre-hook on each optimizer (``agent.optimizers()``); :meth:`remove` takes them off.
    The hook packs the gradients of one optimizer (zeros for ``grad is None``) and one "has a gradient" flag
    per parameter into a flat bucket per (device, dtype), all-reduces it (sum) and writes back
    ``sum / world_size`` to the parameters that had a gradient on some rank. See the module docstring for
    why this and not DDP.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer] | list[torch.optim.Optimizer]):
        ctx = current()
        self.world_size = 1 if ctx is None else ctx.world_size
        self.rank = 0 if ctx is None else ctx.rank
        self.steps = 0
        self._fault_at = _fault_injection(self.rank)
        opts = list(optimizers.values()) if isinstance(optimizers, dict) else list(optimizers)
        self._handles = []
        for opt in opts if ctx is not None else []:
            handle = opt.register_step_pre_hook(self._hook)
            # first among the optimizer's pre-hooks (they run in insertion order and torch has no `prepend=`
            # here): hooks installed with the optimizer, such as make_adam's gradient clipping, must see the
            # averaged gradient, or each rank would clip its own and the ranks would step differently
            opt._optimizer_step_pre_hooks.move_to_end(handle.id, last=False)
            self._handles.append(handle)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.steps += 1
        if self._fault_at is not None and self.steps >= self._fault_at:
            print(f"[latentrl] {FAULT_ENV}: rank {self.rank} exits now (gradient averaging {self.steps})",
                  file=sys.stderr, flush=True)
            os._exit(1)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        average_gradients(params, self.world_size)


@torch.no_grad()
def average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """All-reduce (mean) the gradients of ``params`` in one bucket per (device, dtype); see
    :class:`GradientAverager`."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    for (device, dtype), members in buckets.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in members]
                         + [torch.tensor([float(p.grad is not None) for p in members], device=device, dtype=dtype)])
        dist.all_reduce(flat)
        flags = flat[-len(members):]
        offset = 0
        for p, flag in zip(members, flags.tolist(), strict=True):
            n = p.numel()
            if flag > 0:
                avg = flat[offset:offset + n].view_as(p).div_(world_size)
                if p.grad is None:
                    p.grad = avg.clone()
                else:
                    p.grad.copy_(avg)
            offset += n


def _fault_injection(rank: int) -> int | None:
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    try:
        which, after = (int(part) for part in raw.split(":"))
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={raw!r}: expected '<rank>:<k>' (that rank exits at its k-th gradient "
                         "averaging); it is a test hook, unset it for real runs") from None
    return after if which == rank else None


# ------------------------------------------------------------------------------------------- batches
def shard_spec(spec, world_size: int):
    """The agent's ``sample_spec()`` with each request's ``batch_size`` divided by ``world_size`` (the global
    batch stays the agent's ``batch_size``); refuses a batch that does not split evenly."""
    if world_size <= 1:
        return spec
    if isinstance(spec, dict):
        return {name: shard_spec(one, world_size) for name, one in spec.items()}
    if spec.batch_size % world_size:
        lower = spec.batch_size // world_size * world_size
        raise ValueError(
            f"agent.batch_size={spec.batch_size} does not split over {world_size} data-parallel processes: each "
            f"samples batch_size / world_size rows of the global batch; set agent.batch_size to a multiple of "
            f"{world_size} (e.g. agent.batch_size={max(lower, world_size)})")
    return dataclasses.replace(spec, batch_size=spec.batch_size // world_size)


def check_supported(agent_name: str, *, online: bool = True) -> None:
    """Refuse agents whose update would drift between ranks (:data:`UNSUPPORTED`; with ``online``, a run that
    collects its own data, also :data:`UNSUPPORTED_ONLINE`)."""
    ctx = current()
    if ctx is None:
        return
    reason = UNSUPPORTED.get(agent_name) or (UNSUPPORTED_ONLINE.get(agent_name) if online else None)
    if reason is not None:
        run = "an online run " if agent_name not in UNSUPPORTED else ""
        raise ValueError(f"agent={agent_name} cannot train {run}data-parallel yet ({ctx.world_size} processes): "
                         f"{reason}. Run it in one process (without torchrun, or --nproc_per_node 1)")


def rank_state_path(checkpoint: Path, rank: int, step: int) -> Path:
    """Where rank ``rank`` (>= 1) keeps its own resume state (RNG streams, online replay buffer) of the
    checkpoint at ``step``: ``checkpoints/rank<r>-<step>.pt`` beside ``latest.pt``."""
    return checkpoint.with_name(f"rank{rank}-{step:09d}.pt")


# ------------------------------------------------------------------------------------------- failures
class PeerFailedError(RuntimeError):
    """Another rank of the job failed or vanished, so this one cannot continue."""


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank is gone (gloo: a closed connection;
    NCCL: an aborted communicator; any backend: the timeout), rather than this rank's own error."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(word in text for word in (
        "gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out", "timeout"))


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def _mark(key: str, value: str) -> bool:
    store = _store()
    if store is None:
        return False
    try:
        store.set(_STORE_PREFIX + key, value.encode())
        return True
    except (RuntimeError, OSError):
        return False


def mark_failed(err: BaseException, *, peer: bool = False) -> None:
    """Record in the rendezvous store that this rank stopped on ``err`` (``peer``: because another rank
    failed), for the other ranks' messages."""
    ctx = current()
    if ctx is not None:
        _mark(f"failed/{ctx.rank}", ("peer " if peer else "error ") + _first_line(err))


def describe_peer_failure(err: BaseException, wait_s: float = 5.0) -> str:
    """What happened to the other ranks, after ``err`` (a collective that failed) on this one.

    Every rank that stops on an error marks it in the rendezvous store (:func:`mark_failed`); this rank
    marks itself, waits up to ``wait_s`` for the others' marks, and names the ranks that left none (killed,
    ``os._exit``, out of memory) and those that reported an error.
    """
    ctx = current()
    if ctx is None:
        return str(err)
    mark_failed(err, peer=True)
    store = _store()
    others = [r for r in range(ctx.world_size) if r != ctx.rank]
    reported: dict[int, str] = {}
    if store is not None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                for r in others:
                    key = _STORE_PREFIX + f"failed/{r}"
                    if r not in reported and store.check([key]):
                        reported[r] = store.get(key).decode()
            except (RuntimeError, OSError):
                store = None
                break
            if len(reported) == len(others) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    if store is None:
        return (f"rank {ctx.rank} of {ctx.world_size}: a collective failed ({_first_line(err)}) and the rendezvous "
                "store is unreachable: the process hosting it (rank 0 outside torchrun) has probably failed")
    silent = [r for r in others if r not in reported]
    failed_elsewhere = {r: why[len("error "):] for r, why in reported.items() if why.startswith("error ")}
    parts = []
    if silent:
        parts.append(f"rank {', '.join(map(str, silent))} failed: it stopped without reporting an error (killed, "
                     "out of memory, or exited abruptly)")
    for r, why in failed_elsewhere.items():
        parts.append(f"rank {r} failed with {why}")
    if not parts:
        parts.append(f"a collective failed on every rank ({_first_line(err)})")
    return (f"{'; '.join(parts)}. Rank {ctx.rank} of {ctx.world_size} stopped with it (its collective: "
            f"{_first_line(err)})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__
