"""Collection through TorchRL's collectors: one process, several processes on one machine, or several nodes.

The trainer's own loop (``collector.kind=inline``, the default) steps a batch of envs in the learner's process
and feeds every step to the replay buffer as it happens; that is the fastest path on one machine (our env
workers already run the physics in their own processes, ``env.num_workers``) and the one MuJoCo Warp uses
on a GPU. When one process cannot step enough envs, TorchRL's collectors run them elsewhere and hand the
learner whole batches ``[envs, T]``:

=====================  ===================================================================================
``collector.kind``     what runs where
=====================  ===================================================================================
``inline``             the trainer steps ``env.num_envs`` envs itself (default; MuJoCo Warp on a GPU)
``sync``               TorchRL's ``Collector`` in the learner's process (the same envs, TorchRL's engine)
``multisync``          ``MultiSyncCollector``: ``collector.workers`` processes of ``env.num_envs`` envs each;
                       every batch holds the same number of steps from each (the slowest worker sets the pace)
``ray``                ``torchrl.collectors.distributed.RayCollector`` (``sync=True``): collector processes on
                       the nodes of a Ray cluster (``pip install ray``; ``ray start --head`` first), for CPU
                       farms past one node
=====================  ===================================================================================

TorchRL's asynchronous collectors (``MultiAsyncCollector``, ``RayCollector(sync=False)``) are not offered: they
hand over one worker's batch at a time, and the replay buffer keeps one stream per env whose steps must arrive
in order, so each batch would have to be routed to its worker's streams (not built).

Our :class:`~latentrl.agents.base.Policy` keeps its per-env state in an explicit carry. TorchRL's collectors
carry recurrent state in the step TensorDict (the way its LSTM modules do): :class:`CarryPolicyModule` reads
``carry`` and ``is_init`` (TorchRL's ``InitTracker``) from the step, calls ``policy.step`` and writes the
action, the policy's extras (METRA's ``skill``) and ``("next", "carry")``, which the env's
``TensorDictPrimer`` (:func:`collector_env`) registers so that ``step_mdp`` moves it to the next step. The
collected batch minus the carry (:func:`replay_steps`) is what :meth:`ReplayBuffer.extend` stores.

Weights: after the learner's updates the trainer calls ``collector.update_policy_weights_()``, which copies
the policy's parameters to every worker (TorchRL's weight updaters).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from latentrl.agents.base import Policy

__all__ = ["COLLECTOR_KINDS", "CarryPolicyModule", "collector_env", "make_collector", "replay_steps"]

COLLECTOR_KINDS = ("inline", "sync", "multisync", "ray")

CARRY_KEY = "carry"
_DROP = (CARRY_KEY, ("next", CARRY_KEY), "is_init", ("next", "is_init"), "collector")


class CarryPolicyModule(TensorDictModuleBase):
    """A :class:`Policy` as a TensorDict module for TorchRL's collectors, its carry kept in the step TensorDict.

    Reads the observation keys, ``carry`` (absent on the first call: every env starts) and ``is_init``
    (``[N, 1]``, written by ``InitTracker`` at each env's first step: the policy's ``is_first``); writes
    ``action``, the policy's extras and ``("next", "carry")``.
    """

    def __init__(self, policy: Policy, obs_keys: tuple[str, ...]):
        super().__init__()
        self.policy = policy
        self.obs_keys = tuple(obs_keys)
        self.extras_keys = tuple(policy.extras(policy.init_carry(1)).keys())
        self.in_keys = [*self.obs_keys, "is_init", CARRY_KEY]
        self.out_keys = ["action", *self.extras_keys, ("next", CARRY_KEY)]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        n = int(td.batch_size[0])
        carry = td.get(CARRY_KEY, None)
        if carry is None or not carry.keys():
            carry, is_first = self.policy.init_carry(n), torch.ones(n, dtype=torch.bool)
        else:
            is_first = td.get("is_init").reshape(-1)
        action, carry = self.policy.step(td.select(*self.obs_keys), carry, is_first)
        td.set("action", action)
        for key, value in self.policy.extras(carry).items():
            td.set(key, value.to(action.device))
        td.set(("next", CARRY_KEY), carry.to(action.device))
        return td


def collector_env(env_kwargs: dict[str, Any], carry: TensorDictBase | None):
    """``make_env(**env_kwargs)`` with ``InitTracker`` (``is_init``) and a primer that registers the carry
    (``carry``: one env's ``policy.init_carry(1)[0]``, on the CPU) in the env's specs, so the collector keeps it
    from one step to the next. Runs in the collector's worker processes (where TorchRL may hold the policy's
    weights on the meta device: the template comes from the learner); module-level so that it pickles."""
    from torchrl.data.tensor_specs import Composite
    from torchrl.envs import Compose, InitTracker, TensorDictPrimer, TransformedEnv
    from torchrl.envs.utils import make_composite_from_td

    from latentrl.envs import make_env

    env = make_env(**env_kwargs)
    n = int(env.batch_size[0])
    transforms = [InitTracker()]
    if carry is not None and carry.keys():
        spec = make_composite_from_td(carry.cpu()).expand(n)
        transforms.append(TensorDictPrimer(Composite({CARRY_KEY: spec}, shape=(n,)), expand_specs=False))
    return TransformedEnv(env, Compose(*transforms))


def replay_steps(batch: TensorDictBase) -> TensorDictBase:
    """A collected batch (``[envs, T]``, or ``[workers, envs, T]`` from ``multisync``) as replay steps
    ``[workers * envs, T]`` (one stream per env, worker-major, the same order in every batch): without the carry,
    ``is_init`` and the collector's ids."""
    steps = batch.exclude(*_DROP)
    return steps.reshape(-1, steps.shape[-1]) if steps.batch_dims > 2 else steps


def make_collector(kind: str, env_kwargs: dict[str, Any], policy: Policy, obs_keys: tuple[str, ...], *,
                   workers: int = 1, steps_per_batch: int = 50, total_frames: int = -1, seed: int = 0):
    """A TorchRL collector of ``kind`` (:data:`COLLECTOR_KINDS` but ``inline``) over envs built by
    ``make_env(**env_kwargs)``, acting with ``policy``.

    Each process steps one env batch of ``env_kwargs["num_envs"]`` envs; worker ``i`` seeds its envs with
    ``seed + 7919 * i`` (``make_env`` derives an independent stream per env from it). A collected batch holds
    ``steps_per_batch`` steps of every env of every worker (:func:`replay_steps` makes it
    ``[workers * num_envs, steps_per_batch]``).
    """
    if kind not in COLLECTOR_KINDS or kind == "inline":
        raise ValueError(f"collector kind {kind!r}: use one of {', '.join(k for k in COLLECTOR_KINDS if k != 'inline')}"
                         " (inline is the trainer's own loop, not a collector)")
    for name, value in (("workers", workers), ("steps_per_batch", steps_per_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"collector.{name} must be an int >= 1, got {value!r}")
    num_envs = int(env_kwargs.get("num_envs", 1))
    module = CarryPolicyModule(policy, obs_keys)
    carry = policy.init_carry(1)[0].cpu()

    def env_fn(i: int):
        return functools.partial(collector_env, {**env_kwargs, "seed": int(seed) + 7919 * i}, carry)

    if kind == "sync":
        from torchrl.collectors import Collector

        return Collector(env_fn(0), module, frames_per_batch=num_envs * steps_per_batch, total_frames=total_frames,
                         trust_policy=True)
    if kind == "multisync":
        from torchrl.collectors import MultiSyncCollector

        return MultiSyncCollector([env_fn(i) for i in range(workers)], module,
                                  frames_per_batch=num_envs * steps_per_batch * workers, total_frames=total_frames,
                                  trust_policy=True, num_threads=1, num_sub_threads=1)
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("collector.kind=ray needs Ray: pip install ray, start a cluster (ray start --head "
                                  "on one node, ray start --address=<head>:6379 on the others), then run the "
                                  "trainer on the head node") from err
    from torchrl.collectors.distributed import RayCollector

    # RayCollector stops at once with total_frames=-1 (it compares collected < total; the local collectors read -1
    # as "no end"): the trainer decides when to stop, so give it no end of its own
    return RayCollector([env_fn(i) for i in range(workers)], module,
                        frames_per_batch=num_envs * steps_per_batch * workers,
                        total_frames=total_frames if total_frames > 0 else 2**62, num_collectors=workers, sync=True)
