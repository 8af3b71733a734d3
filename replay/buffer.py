"""The one replay buffer: per-env streams of observations, each frame stored once.

Storage layout
--------------
The buffer keeps one stream per parallel env. Stream ``e`` is a ring of ``per_env = capacity // num_envs``
rows occupying storage rows ``[e * per_env, (e + 1) * per_env)`` of a single TorchRL storage
(``LazyTensorStorage`` in memory, ``LazyMemmapStorage`` under ``path``). Rows are numbered by an
*absolute* index ``a`` (0, 1, 2, ... for the whole life of the stream) and live at storage row
``e * per_env + a % per_env``; a stream holds rows ``[lo, hi)`` with ``hi - lo <= per_env``.

A row is one observation (``pixels``, ``state``, ``physics``, ...: the keys mirrored under
``"next"``) plus, when the observation was acted on, the transition that followed it: ``action``,
agent extras, ``("next", "reward" | "terminated" | "truncated" | "done")``. The next observation of
row ``a`` is row ``a + 1``; ``next`` observations are never stored twice. Each episode ends with a
row holding its final ``next`` observation and no transition (``("_replay", "is_transition")`` is
False). The newest ``next`` observation of an unfinished episode is written the same way (the
*pending* row), so every transition is sampleable as soon as it is added; the following step of
that env overwrites the pending row with the same observation and its action.

Bookkeeping columns, stored with the data so that a saved buffer is self-contained:
``("_replay", "first")`` the absolute index of the row's episode start, ``("_replay", "last")`` the
absolute index of its episode's final row (``int64 max`` while the episode runs) and
``("_replay", "is_transition")``. Per-stream positions (``head``, pending flag, ...) are small and
live in :meth:`ReplayBuffer.state_dict` / the ``replay.json`` written by :meth:`ReplayBuffer.save`.

Episode boundaries come from ``("next", "done")``; a step whose ``episode`` id differs from the
pending row's (an env reset without a done flag) closes that episode at its pending row.

Sampling draws rows uniformly over the stored transitions (rejection of rows that cannot start the
requested sample: no transition, a slice crossing an episode end, a frame stack whose frames were
overwritten), then gathers each observation key once with ``index_select``. Frame stacks apply to
image keys (uint8 ``[C, H, W]``, e.g. ``pixels``): the frames ``t - k + 1 .. t + L`` are gathered once
and the observation and next-observation stacks are views of them.

Memory per stored step is one row: one frame plus the small keys, against two stacked frames
``[3k, H, W]`` per step in a buffer that stores stacks (see ``docs/bench_replay.md``).

On disk (:meth:`ReplayBuffer.save`): ``<path>/storage/`` is the storage's memory-mapped TensorDict
(TorchRL ``dumps`` format) and ``<path>/replay.json`` the stream positions, layout and key specs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyMemmapStorage, LazyTensorStorage

__all__ = ["ReplayBuffer"]

_DONE_KEYS = ("terminated", "truncated", "done")
_TRANSITION_KEYS = ("reward", *_DONE_KEYS)  # stored with the row of the step they follow, under "next"
_NOT_OBS = frozenset({"episode", "step", "action", "reward", *_DONE_KEYS})
_META = "_replay"
_FIRST, _LAST, _IS_TRANSITION = (_META, "first"), (_META, "last"), (_META, "is_transition")
_NO_END = torch.iinfo(torch.int64).max
_META_FILE = "replay.json"
_STORAGE_DIR = "storage"
_FORMAT = "latentrl.replay/1"
_GOALS = (None, "future", "random")


def _key_str(key) -> str:
    return ".".join(key) if isinstance(key, tuple) else key


def _key_tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _norm_key(key):
    """TensorDict's spelling of a key: a string at the root, a tuple when nested."""
    key = tuple(key) if isinstance(key, (tuple, list)) else (key,)
    return key[0] if len(key) == 1 else key


class ReplayBuffer:
    """Replay buffer of steps from ``num_envs`` parallel envs, each frame stored once.

    Args:
        capacity: number of stored rows (observations); about one row per env step plus one per
            episode end. Split evenly over the env streams (``capacity // num_envs`` each).
        path: folder for an on-disk (memory-mapped) buffer; ``None`` keeps it in memory.
        device: where :meth:`sample` puts its batches (storage stays on the CPU).

    ``extend(td)`` takes TorchRL env steps (``[num_envs]`` or ``[num_envs, T]``), ``sample`` returns
    transitions ``[B]`` or slices ``[B, horizon]`` with frame stacks built at sample time.
    """

    def __init__(self, capacity: int, *, path: str | Path | None = None, device: str | torch.device = "cpu"):
        if int(capacity) < 2:
            raise ValueError(f"capacity must hold at least 2 rows (one transition), got {capacity}")
        self.capacity = int(capacity)
        self.path = None if path is None else Path(path)
        self.device = torch.device(device)
        if self.path is not None and (self.path / _META_FILE).exists():
            raise FileExistsError(
                f"{self.path} already holds a saved replay buffer; open it with ReplayBuffer.load(path) "
                "or pass an empty folder"
            )
        self.num_envs: int | None = None
        self._storage: LazyTensorStorage | None = None
        self._num_transitions = 0

    # ------------------------------------------------------------------ layout and state
    def _init_layout(self, num_envs: int, td: TensorDictBase) -> None:
        per_env = self.capacity // num_envs
        if per_env < 2:
            raise ValueError(
                f"capacity {self.capacity} is too small for {num_envs} env streams (each needs >= 2 rows); "
                f"use capacity >= {2 * num_envs}"
            )
        self._schema = self._infer_schema(td)
        self.num_envs, self.per_env = num_envs, per_env
        self._head = torch.zeros(num_envs, dtype=torch.int64)  # next absolute row of each stream
        self._pending = torch.zeros(num_envs, dtype=torch.bool)  # row `head` holds the pending next obs
        self._cur_first = torch.zeros(num_envs, dtype=torch.int64)  # first row of the running episode
        self._cur_episode = torch.full((num_envs,), -1, dtype=torch.int64)
        self._next_episode_id = 0  # for data without an `episode` key
        self._refresh_bounds()

    def _make_storage(self, size: int):
        if self.path is None:
            return LazyTensorStorage(size)
        return LazyMemmapStorage(size, scratch_dir=self.path / _STORAGE_DIR, existsok=True)

    @staticmethod
    def _infer_schema(td: TensorDictBase) -> dict:
        if "next" not in td.keys() or not isinstance(td.get("next"), TensorDictBase):
            raise KeyError("extend() expects TorchRL env steps with a 'next' sub-TensorDict (the env output)")
        nxt = td.get("next")
        if "action" not in td.keys():
            raise KeyError("extend() expects an 'action' entry (float32 [*, A])")
        obs = [k for k in td.keys() if k not in _NOT_OBS and k != "next" and k in nxt.keys()
               and isinstance(td.get(k), torch.Tensor)]
        if not obs:
            raise KeyError(
                "extend() found no observation keys: expected keys such as 'pixels', 'state' or 'physics' "
                f"both at the root and under 'next'; got root keys {sorted(td.keys())} and "
                f"next keys {sorted(nxt.keys())}"
            )
        unmirrored = [k for k in ("pixels", "state", "physics") if k in td.keys() and k not in nxt.keys()]
        if unmirrored:
            raise KeyError(f"observation keys {unmirrored} are missing under 'next': store env steps as "
                           "TorchRL returns them, with ('next', key) holding the observation after the step")
        if "done" not in nxt.keys() and not {"terminated", "truncated"} <= set(nxt.keys()):
            raise KeyError(
                "extend() expects ('next', 'done') (or ('next', 'terminated') and ('next', 'truncated'))"
            )
        skip = set(obs) | _NOT_OBS | {"next"}
        extras = [k for k in td.keys(include_nested=True, leaves_only=True)
                  if _key_tuple(k)[0] not in skip and isinstance(td.get(k), torch.Tensor)]
        transition = [k for k in _TRANSITION_KEYS if k in nxt.keys() or k == "done"]
        bd = td.batch_dims

        def spec(x):
            return {"shape": list(x.shape[bd:]), "dtype": str(x.dtype).replace("torch.", "")}

        return {
            "obs": obs,
            "stacked": [k for k in obs if td.get(k).dtype == torch.uint8 and td.get(k).dim() == bd + 3],
            "extras": [list(_key_tuple(k)) for k in extras],
            "transition": transition,
            "has_episode": "episode" in td.keys(),
            "has_step": "step" in td.keys(),
            "specs": {_key_str(k): spec(td.get(k)) for k in [*obs, "action", *extras]},
        }

    @property
    def _extra_keys(self) -> list:
        return [_norm_key(k) for k in self._schema["extras"]]

    def _refresh_bounds(self) -> None:
        self._hi = self._head + self._pending.long()
        self._lo = (self._hi - self.per_env).clamp_min(0)
        n = self._hi - self._lo
        cum = n.cumsum(0)
        self._n, self._cum = n, cum
        self._num_rows = int(cum[-1])
        self._max_rows = max(int(n.max()), 1)

    def _attach(self, storage) -> None:
        """Cache plain-tensor views of the storage columns for the sampling hot path.

        TorchRL's storage indexes a TensorDict leaf by leaf with advanced indexing, measured ~5x
        slower than ``index_select`` for uint8 frames (scripts/bench_replay.py), so sampling reads
        the storage's tensors directly; all writes go through ``storage.set``.
        """
        self._storage = storage
        data = storage._storage
        n = data.shape[0]
        self._cols, self._shapes = {}, {}
        for key in data.keys(include_nested=True, leaves_only=True):
            col = data.get(key).as_subclass(torch.Tensor)
            self._shapes[_norm_key(key)] = col.shape[1:]
            self._cols[_norm_key(key)] = col.reshape(n, -1)
        self._first = self._cols[_FIRST].view(-1)
        self._last = self._cols[_LAST].view(-1)
        self._is_transition = self._cols[_IS_TRANSITION].view(-1)

    def _metadata(self) -> dict:
        meta = {"format": _FORMAT, "capacity": self.capacity, "num_envs": self.num_envs,
                "num_transitions": self._num_transitions}
        if self.num_envs is not None:
            meta.update({
                "per_env": self.per_env,
                "schema": self._schema,
                "head": self._head.tolist(),
                "pending": self._pending.tolist(),
                "cur_first": self._cur_first.tolist(),
                "cur_episode": self._cur_episode.tolist(),
                "next_episode_id": self._next_episode_id,
            })
        return meta

    def _restore(self, meta: dict, storage) -> None:
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"not a latentrl replay buffer (format {meta.get('format')!r}, expected {_FORMAT!r})"
            )
        self.capacity, self.num_envs = meta["capacity"], meta["num_envs"]
        self._num_transitions = meta["num_transitions"]
        if self.num_envs is None:
            return
        self.per_env, self._schema = meta["per_env"], meta["schema"]
        self._head = torch.tensor(meta["head"], dtype=torch.int64)
        self._pending = torch.tensor(meta["pending"], dtype=torch.bool)
        self._cur_first = torch.tensor(meta["cur_first"], dtype=torch.int64)
        self._cur_episode = torch.tensor(meta["cur_episode"], dtype=torch.int64)
        self._next_episode_id = meta["next_episode_id"]
        self._refresh_bounds()
        self._attach(storage)

    def state_dict(self) -> dict:
        """Checkpoint: stream positions, plus the data for an in-memory buffer (plain tensors only).

        A path-backed buffer keeps its data on disk; only its positions go in the checkpoint.
        """
        out = {"layout": self._metadata()}
        if self._storage is not None:
            if self.path is None:
                # only the rows written so far: the storage is allocated at full capacity on the first
                # write, and saving all of it made early checkpoints full-size (3.7 GB for 1,500 pixel steps)
                rows = min(self.per_env, int(self._hi.max()))
                data = self._storage._storage.reshape(self.num_envs, self.per_env)[:, :rows]
                out["storage"] = data.reshape(-1).clone().to_dict()  # clone: a view would save the whole storage
                out["rows_per_env"] = rows
            else:
                self._storage.dumps(self.path / _STORAGE_DIR)
                self._attach(self._storage)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        meta = state_dict["layout"]
        storage = None
        if meta.get("num_envs") is not None:
            size = meta["num_envs"] * meta["per_env"]
            if "storage" in state_dict:
                rows = state_dict.get("rows_per_env", meta["per_env"])  # older checkpoints: every row
                data = TensorDict(state_dict["storage"], batch_size=[meta["num_envs"] * rows])
                index = torch.arange(meta["num_envs"])[:, None] * meta["per_env"] + torch.arange(rows)
                storage = LazyTensorStorage(size)
                storage.set(index.reshape(-1), data)
            elif self.path is not None:
                storage = LazyMemmapStorage(size, scratch_dir=self.path / _STORAGE_DIR, existsok=True)
                storage.loads(self.path / _STORAGE_DIR)
            else:
                raise ValueError("this checkpoint holds positions only (a path-backed buffer); "
                                 "construct the buffer with the same path before loading it")
        self._restore(meta, storage)

    # ------------------------------------------------------------------ size
    def __len__(self) -> int:
        """Number of stored (sampleable) transitions."""
        return self._num_transitions

    @property
    def num_rows(self) -> int:
        """Number of stored observation rows (frames)."""
        return 0 if self.num_envs is None else self._num_rows

    @property
    def num_episodes(self) -> int:
        """Number of episodes with at least one stored row."""
        if self.num_envs is None or self._num_rows == 0:
            return 0
        slot = torch.arange(self.num_envs * self.per_env)
        env, pos = slot // self.per_env, slot % self.per_env
        hi, lo = self._hi[env], self._lo[env]
        row = hi - 1 - torch.remainder(hi - 1 - pos, self.per_env)
        first = self._first
        starts = (row >= lo) & ((first == row) | ((row == lo) & (first < row)))
        return int(starts.sum())

    def __repr__(self) -> str:
        where = "memory" if self.path is None else str(self.path)
        keys = [] if self.num_envs is None else self._schema["obs"]
        return (f"ReplayBuffer(transitions={len(self)}, episodes={self.num_episodes}, "
                f"capacity={self.capacity}, num_envs={self.num_envs}, obs={keys}, storage={where})")

    # ------------------------------------------------------------------ writing
    def extend(self, td: TensorDictBase, *, flat: bool = False) -> None:
        """Add env steps.

        Args:
            td: TorchRL env steps, ``[num_envs]`` (one step of every env) or ``[num_envs, T]``
                (``T`` consecutive steps of every env); with ``flat=True``, ``[N]`` consecutive steps
                of a single stream (an offline dataset: episodes one after another).
        """
        if not isinstance(td, TensorDictBase):
            raise TypeError(f"extend() expects a TensorDict, got {type(td).__name__}")
        if flat:
            if td.batch_dims != 1:
                raise ValueError(
                    f"extend(flat=True) expects a [N] dataset, got batch size {list(td.batch_size)}"
                )
            td = td.unsqueeze(0)
        elif td.batch_dims == 1:
            td = td.unsqueeze(1)
        elif td.batch_dims != 2:
            raise ValueError(
                "extend() expects env steps with batch [num_envs] or [num_envs, T] (or a flat [N] dataset "
                f"with flat=True), got batch size {list(td.batch_size)}"
            )
        td = td.to("cpu")
        num_envs, steps = td.batch_size
        if num_envs == 0 or steps == 0:
            return
        if self.num_envs is None:
            self._init_layout(num_envs, td)
        elif num_envs != self.num_envs:
            raise ValueError(
                f"this buffer holds {self.num_envs} env streams but got a batch of {num_envs}; pass "
                "[num_envs] or [num_envs, T] steps (or flat=True for a single-stream dataset into a "
                "1-stream buffer)"
            )
        self._check_schema(td)
        # one write must not wrap a stream onto itself (each step adds at most 2 rows)
        chunk = max(1, self.per_env // 2)
        for start in range(0, steps, chunk):
            self._extend_chunk(td[:, start:start + chunk])

    def _check_schema(self, td: TensorDictBase) -> None:
        schema = self._schema
        obs = [k for k in td.keys() if k not in _NOT_OBS and k != "next" and k in td.get("next").keys()
               and isinstance(td.get(k), torch.Tensor)]
        if sorted(obs) != sorted(schema["obs"]):
            raise KeyError(
                f"observation keys {sorted(obs)} differ from the stored ones {sorted(schema['obs'])}"
            )
        for key in [*schema["obs"], "action", *self._extra_keys]:
            x = td.get(key, None)
            if x is None:
                raise KeyError(f"missing key {key!r}: every extend() must carry the keys of the first one")
            spec = schema["specs"][_key_str(key)]
            if list(x.shape[2:]) != spec["shape"] or str(x.dtype).replace("torch.", "") != spec["dtype"]:
                raise ValueError(
                    f"{key!r} has shape {list(x.shape[2:])} and dtype {x.dtype} per step, but the buffer "
                    f"stores {spec['shape']} {spec['dtype']}"
                )

    def _extend_chunk(self, td: TensorDictBase) -> None:
        num_envs, steps = td.batch_size
        nxt = td.get("next")
        done = self._done(nxt).reshape(num_envs, steps)
        if self._schema["has_episode"] and bool(self._pending.any()):
            # an env whose step opens another episode without a done flag: its episode was cut
            cut = self._pending & (td.get("episode").reshape(num_envs, steps)[:, 0] != self._cur_episode)
            if bool(cut.any()):
                self._close_pending(cut)
        head, pending, per_env = self._head, self._pending, self.per_env
        has_next_row = done.clone()
        has_next_row[:, -1] = True
        n_rows = 1 + has_next_row.long()
        abs_obs = head[:, None] + n_rows.cumsum(1) - n_rows
        abs_next = abs_obs + 1
        start = torch.zeros_like(done)
        start[:, 1:] = done[:, :-1]
        start[:, 0] = ~pending
        start_val = torch.where(start, abs_obs, -1)
        start_val[:, 0] = torch.where(pending, self._cur_first, abs_obs[:, 0])
        first = start_val.cummax(1).values
        last = torch.where(done, abs_next, _NO_END).flip(1).cummin(1).values.flip(1)
        episode, step = self._episode_and_step(td, start, abs_obs - first)

        # rows of episodes that started before this chunk and end in it learn their end
        for env in (pending & done.any(1)).nonzero().flatten().tolist():
            rows = torch.arange(max(int(self._cur_first[env]), int(self._lo[env])), int(head[env]))
            self._last[env * per_env + rows % per_env] = last[env, 0]

        total = n_rows.sum(1)
        if self._storage is not None:  # transitions pushed out of the rings
            lo_new = (head + total - per_env).clamp_min(0)
            old = self._lo[:, None] + torch.arange(2 * steps + 1)
            leaving = old < lo_new[:, None]
            slots = torch.arange(num_envs)[:, None] * per_env + old % per_env
            self._num_transitions -= int((self._is_transition[slots] & leaving).sum())

        base = torch.arange(num_envs)[:, None] * per_env
        obs_rows = TensorDict(
            {k: td.get(k) for k in self._schema["obs"]}
            | {"action": td.get("action"), "episode": episode, "step": step}
            | {k: td.get(k) for k in self._extra_keys},
            batch_size=[num_envs, steps],
        )
        obs_rows["next"] = TensorDict(
            {k: (done[..., None] if k == "done" and "done" not in nxt.keys() else nxt.get(k))
             for k in self._schema["transition"]},
            batch_size=[num_envs, steps],
        )
        obs_rows[_META] = TensorDict(
            first=first, last=last, is_transition=torch.ones_like(done), batch_size=[num_envs, steps]
        )
        if self._storage is None:
            storage = self._make_storage(num_envs * per_env)
            storage.set((base + abs_obs % per_env).reshape(-1), obs_rows.reshape(-1))
            self._attach(storage)
        else:
            self._storage.set((base + abs_obs % per_env).reshape(-1), obs_rows.reshape(-1))

        # the next observation of each episode end and of each stream's newest step
        mask = has_next_row
        count = int(mask.sum())
        next_rows = TensorDict({k: nxt.get(k)[mask] for k in self._schema["obs"]}, batch_size=[count])
        next_rows["episode"] = episode[mask]
        next_rows["step"] = step[mask] + 1
        for key in ["action", *self._extra_keys]:
            x = obs_rows.get(key)
            next_rows[key] = torch.zeros((count, *x.shape[2:]), dtype=x.dtype)
        next_rows["next"] = obs_rows.get("next")[mask].apply(torch.zeros_like)
        if "reward" in self._schema["transition"]:
            next_rows["next", "reward"].fill_(float("nan"))
        next_rows[_META] = TensorDict(
            first=first[mask], last=last[mask], is_transition=torch.zeros(count, dtype=torch.bool),
            batch_size=[count],
        )
        self._storage.set((base + abs_next % per_env)[mask], next_rows)

        ended = done[:, -1]
        self._num_transitions += num_envs * steps
        self._head = head + total - (~ended).long()
        self._pending = ~ended
        self._cur_first = first[:, -1]
        self._cur_episode = episode[:, -1]
        self._refresh_bounds()

    @staticmethod
    def _done(nxt: TensorDictBase) -> torch.Tensor:
        if "done" in nxt.keys():
            return nxt.get("done").bool()
        return nxt.get("terminated").bool() | nxt.get("truncated").bool()

    def _episode_and_step(self, td, start, offset):
        """Episode ids and steps of the chunk's rows; numbered by the buffer when the data has none."""
        if self._schema["has_episode"]:
            episode = td.get("episode")
        else:
            ids = self._next_episode_id + start.reshape(-1).long().cumsum(0).reshape(start.shape) - 1
            episode = torch.where(start, ids, -1)
            episode[:, 0] = torch.where(start[:, 0], episode[:, 0], self._cur_episode)
            episode = episode.cummax(1).values
            self._next_episode_id += int(start.sum())
        step = td.get("step") if self._schema["has_step"] else offset
        return episode.reshape(start.shape).long(), step.reshape(start.shape).long()

    def _close_pending(self, envs: torch.Tensor) -> None:
        """Keep the pending rows of ``envs`` as the final rows of their (cut) episodes."""
        for env in envs.nonzero().flatten().tolist():
            end = int(self._head[env])
            rows = torch.arange(max(int(self._cur_first[env]), int(self._lo[env])), end + 1)
            self._last[env * self.per_env + rows % self.per_env] = end
        self._head = self._head + envs.long()
        self._pending = self._pending & ~envs
        self._refresh_bounds()

    def end_episodes(self) -> None:
        """End every running episode at its last stored observation (e.g. after resuming a run, whose
        envs start new episodes that must not be joined to the ones in flight when it stopped)."""
        if self.num_envs is not None and bool(self._pending.any()):
            self._close_pending(self._pending.clone())

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, *, frame_stack: int = 1, horizon: int = 1, goal: str | None = None,
               keys: Sequence[str] | None = None, future_discount: float = 0.99) -> TensorDict:
        """Sample transitions ``[B]`` (``horizon=1``) or episode slices ``[B, horizon]``.

        Returns a TensorDict with the observation keys (``pixels`` as ``[*, 3 * frame_stack, H, W]``,
        oldest frame first, clamped to the episode's first frame), ``action``, agent extras, ``episode``,
        ``step``, and ``("next", obs keys)``, ``("next", "reward")`` (when stored), ``("next", "terminated"
        | "truncated" | "done")``. ``goal="future"`` adds a ``goal`` sub-TensorDict holding the observation
        keys (and ``episode``, ``step``) of a later step of the same episode, ``t + g`` with
        ``g ~ Geometric(1 - future_discount)`` clamped at the episode's last stored observation;
        ``goal="random"`` one of any stored observation. ``keys`` restricts the observation keys.

        ``pixels`` and ``("next", "pixels")`` are overlapping views of one gather (as are the windows
        of a ``[B, L]`` slice): copy them before writing into them in place.
        """
        batch_size, frame_stack, horizon = self._check_sample_args(batch_size, frame_stack, horizon, goal,
                                                                   future_discount)
        obs_keys = self._select_keys(keys)
        env, start, first = self._draw(batch_size, frame_stack, horizon, transition=True)
        per_env, length = self.per_env, horizon
        shape = [batch_size] if length == 1 else [batch_size, length]
        base = env[:, None] * per_env
        slot = (base + (start[:, None] + torch.arange(length)) % per_env).view(shape)
        out = {key: self._gather(key, slot) for key in ["action", "episode", "step", *self._extra_keys]}
        nxt = {key: self._gather(("next", key), slot) for key in self._schema["transition"]}
        goal_slot = None
        if goal is not None:  # ``goal`` rows ``shape`` (and their stacks ``[*shape, k]``)
            goal_slot, goal_stack_slot = self._goal_rows(goal, env, start, first, frame_stack, length,
                                                         future_discount)
            out["goal"] = {key: self._gather(key, goal_slot) for key in ("episode", "step")}

        # one gather per observation key: rows t .. t + L (observations and, shifted by one, the next
        # observations), frames t - k + 1 .. t + L for stacked keys (clamped at the episode start),
        # followed by the goal's rows
        obs_slot = base + (start[:, None] + torch.arange(length + 1)) % per_env
        rows = torch.maximum(start[:, None] + torch.arange(1 - frame_stack, length + 1), first[:, None])
        stack_slot = base + rows % per_env
        for key in obs_keys:
            stacked = key in self._schema["stacked"]
            own = stack_slot if stacked else obs_slot
            if goal_slot is None:
                g = self._gather(key, own)
            else:
                extra = goal_stack_slot if stacked else goal_slot
                both = self._gather(key, torch.cat([own.reshape(-1), extra.reshape(-1)]))
                g, goal_g = both[:own.numel()].view(*own.shape, *both.shape[1:]), both[own.numel():]
                goal_g = goal_g.view(*extra.shape, *goal_g.shape[1:])
                out["goal"][key] = goal_g.flatten(-4, -3) if stacked else goal_g
            if stacked:
                out[key], nxt[key] = _windows(g, frame_stack, length, 0), _windows(g, frame_stack, length, 1)
            elif length == 1:
                out[key], nxt[key] = g[:, 0], g[:, 1]
            else:
                out[key], nxt[key] = g[:, :-1], g[:, 1:]
        out["next"] = nxt
        return TensorDict(out, batch_size=shape, device=self.device)

    def _check_sample_args(self, batch_size, frame_stack, horizon, goal, future_discount):
        for name, value in (("batch_size", batch_size), ("frame_stack", frame_stack), ("horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if goal not in _GOALS:
            raise ValueError(f"goal must be one of {_GOALS}, got {goal!r}")
        if goal == "future" and not 0.0 <= future_discount < 1.0:
            raise ValueError(f"future_discount must be in [0, 1), got {future_discount}")
        if self.num_envs is None or self._num_transitions == 0:
            raise RuntimeError("cannot sample from an empty replay buffer: extend() it with env steps first")
        if horizon > self.per_env - 1:
            raise ValueError(
                f"horizon {horizon} is longer than a stream can hold ({self.per_env - 1} transitions per env "
                f"with capacity {self.capacity} over {self.num_envs} envs); lower horizon or raise capacity"
            )
        return int(batch_size), int(frame_stack), int(horizon)

    def _select_keys(self, keys) -> list[str]:
        stored = self._schema["obs"]
        if keys is None:
            return list(stored)
        if isinstance(keys, str):
            keys = (keys,)
        keys = list(keys)
        unknown = [k for k in keys if k not in stored]
        if unknown or not keys:
            raise KeyError(f"unknown observation keys {unknown} in keys={keys}; this buffer stores {stored}")
        return keys

    def _gather(self, key, slot: torch.Tensor) -> torch.Tensor:
        """Rows ``slot`` of a column, on the sampling device (moved before any view is taken)."""
        key = _norm_key(key)
        out = self._cols[key].index_select(0, slot.reshape(-1)).view(*slot.shape, *self._shapes[key])
        return out if self.device.type == "cpu" else out.to(self.device, non_blocking=True)

    def _valid(self, env, row, frame_stack: int, horizon: int, transition: bool):
        """Which candidate rows can start a sample; also returns their episode starts."""
        per_env = self.per_env
        slot = env * per_env + row % per_env
        first = self._first.index_select(0, slot)
        ok = torch.maximum(row - (frame_stack - 1), first) >= self._lo[env]  # the stack was not overwritten
        if transition:
            end = row + (horizon - 1)
            end_slot = slot if horizon == 1 else env * per_env + end % per_env
            ok &= self._is_transition.index_select(0, end_slot)
            if horizon > 1:  # the slice stays in one stored episode
                ok &= (end < self._hi[env]) & (self._first.index_select(0, end_slot) <= row)
        return ok, first

    def _candidates(self, n: int):
        """``n`` stored rows: uniform over the stored rows once rows past a stream's end are rejected.

        Streams grow in lockstep, so drawing the stream uniformly and the row within ``max(rows)``
        rejects few draws (and avoids ``torch.searchsorted``, which stalls for milliseconds in its
        thread pool on a busy 2-core machine).
        """
        env = torch.randint(self.num_envs, (n,))
        offset = torch.randint(self._max_rows, (n,))
        return env, self._lo[env] + offset, offset < self._n[env]

    def _all_rows(self):
        env = torch.repeat_interleave(torch.arange(self.num_envs), self._n)
        row = torch.arange(self._num_rows) - (self._cum - self._n)[env] + self._lo[env]
        return env, row

    def _draw(self, n: int, frame_stack: int, horizon: int, transition: bool):
        """``n`` rows drawn uniformly among the valid ones (rejection sampling, exact fallback)."""
        got_env, got_row, got_first, have, rate = [], [], [], 0, 1.0
        for _ in range(4):
            draws = math.ceil((n - have) * 1.1 / rate) + 16
            env, row, stored = self._candidates(draws)
            ok, first = self._valid(env, row, frame_stack, horizon, transition)
            ok &= stored
            accepted = int(ok.sum())
            got_env.append(env[ok]), got_row.append(row[ok]), got_first.append(first[ok])
            have += accepted
            if have >= n:
                return (torch.cat(got_env)[:n], torch.cat(got_row)[:n], torch.cat(got_first)[:n])
            rate = max(accepted / draws, 1e-3)
            if rate < 0.05:
                break
        # rare valid rows: enumerate them all
        env, row = self._all_rows()
        ok, first = self._valid(env, row, frame_stack, horizon, transition)
        valid = ok.nonzero().flatten()
        if len(valid) == 0:
            raise ValueError(self._nothing_valid_message(frame_stack, horizon, transition))
        pick = valid[torch.randint(len(valid), (n,))]
        return env[pick], row[pick], first[pick]

    def _nothing_valid_message(self, frame_stack: int, horizon: int, transition: bool) -> str:
        env, row = self._all_rows()
        slot = env * self.per_env + row % self.per_env
        since_start = row - torch.maximum(self._first[slot], self._lo[env]) + 1
        run = torch.where(self._is_transition[slot], since_start, 0)
        longest = int(run.max()) if len(run) else 0
        if transition and horizon > longest:
            return (f"horizon {horizon} is longer than every stored episode: the longest run of stored "
                    f"transitions in one episode is {longest}; lower horizon or collect longer episodes")
        return (f"no stored sample has frame_stack={frame_stack} frames of its episode still in the buffer; "
                "lower frame_stack or raise capacity")

    def _goal_rows(self, mode, env, start, first, frame_stack, length, future_discount):
        """Storage rows of the goals ``[B(, L)]`` and of their frame stacks ``[B(, L), k]``."""
        per_env = self.per_env
        t = start if length == 1 else start[:, None] + torch.arange(length)
        if mode == "future":
            offset = torch.empty(t.shape).geometric_(1.0 - future_discount).clamp_(max=per_env).long()
            start_slot = env * per_env + start % per_env
            end = torch.minimum(self._last.index_select(0, start_slot), self._hi[env] - 1)
            row = torch.minimum(t + offset, end if length == 1 else end[:, None])
            goal_env = env if length == 1 else env[:, None].expand_as(row)
            goal_first = first if length == 1 else first[:, None].expand_as(row)
        else:
            goal_env, row, goal_first = self._draw(t.numel(), frame_stack, 1, transition=False)
            goal_env, row, goal_first = goal_env.view(t.shape), row.view(t.shape), goal_first.view(t.shape)
        base = goal_env * per_env
        stack = torch.maximum(row[..., None] + torch.arange(1 - frame_stack, 1), goal_first[..., None])
        return base + row % per_env, base[..., None] + stack % per_env

    # ------------------------------------------------------------------ rewards
    @staticmethod
    def relabel(task, td: TensorDictBase) -> TensorDictBase:
        """Write ``task``'s reward of ``("next", "physics")`` (and ``action``) into ``("next", "reward")``.

        ``task`` is a :class:`latentrl.envs.tasks.Task`; ``td`` a sampled batch ``[B]`` or ``[B, L]``
        (sampled with ``physics`` among its keys). Modifies ``td`` in place and returns it.
        """
        if ("next", "physics") not in td.keys(include_nested=True):
            raise KeyError("relabel() needs ('next', 'physics'): sample with keys that include 'physics' "
                           "from a buffer that stores physics states")
        physics = td.get(("next", "physics"))
        states = physics.reshape(-1, physics.shape[-1]).detach().cpu().double().numpy()
        actions = None
        if "action" in td.keys():
            action = td.get("action")
            actions = action.reshape(-1, action.shape[-1]).detach().cpu().numpy()
        reward = task.rewards_from_states(states, actions)
        reward = torch.as_tensor(np.asarray(reward, dtype=np.float32)).view(*td.batch_size, 1)
        td.set(("next", "reward"), reward.to(physics.device))
        return td

    # ------------------------------------------------------------------ datasets on disk
    def save(self, path: str | Path) -> None:
        """Write the buffer to ``path``: memory-mapped TensorDict (``storage/``) plus ``replay.json``.

        Saving a path-backed buffer to its own path writes the metadata only (no copy); save again
        after extending a buffer opened with :meth:`load` so that its positions follow.
        """
        if self._storage is None:
            raise RuntimeError("cannot save an empty replay buffer: extend() it first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._storage.dumps(path / _STORAGE_DIR)
        self._attach(self._storage)
        tmp = path / (_META_FILE + ".tmp")
        tmp.write_text(json.dumps(self._metadata(), indent=1))
        tmp.replace(path / _META_FILE)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> ReplayBuffer:
        """Open a buffer written by :meth:`save` as a memory-mapped dataset (nothing is copied to memory).

        A folder holding a plain memory-mapped TensorDict ``[N]`` of consecutive steps (``td.memmap(path)``)
        is read as a flat dataset into an in-memory buffer (see :meth:`from_dataset`).
        """
        path = Path(path)
        if not (path / _META_FILE).exists():
            if (path / "meta.json").exists():
                return cls.from_dataset(TensorDict.load_memmap(path), device=device)
            raise FileNotFoundError(
                f"{path} holds no replay buffer ({_META_FILE} is missing); write one with save()"
            )
        meta = json.loads((path / _META_FILE).read_text())
        buffer = cls(meta["capacity"], device=device)
        buffer.path = path
        storage = None
        if meta.get("num_envs") is not None:
            storage = LazyMemmapStorage(meta["num_envs"] * meta["per_env"], scratch_dir=path / _STORAGE_DIR,
                                        existsok=True)
            storage.loads(path / _STORAGE_DIR)
        buffer._restore(meta, storage)
        return buffer

    @classmethod
    def from_dataset(cls, td: TensorDictBase, *, path: str | Path | None = None,
                     device: str | torch.device = "cpu") -> ReplayBuffer:
        """A one-stream buffer holding a flat dataset ``[N]`` of consecutive steps (episode after episode)."""
        if td.batch_dims != 1:
            raise ValueError(f"from_dataset() expects a [N] dataset, got batch size {list(td.batch_size)}")
        ends = int(cls._done(td.get("next")).sum())
        buffer = cls(td.shape[0] + ends + 1, path=path, device=device)
        buffer.extend(td, flat=True)
        return buffer


def _windows(frames: torch.Tensor, k: int, length: int, offset: int) -> torch.Tensor:
    """Views ``[B, (L,) k * C, H, W]`` of ``k`` consecutive frames of ``frames`` ``[B, L + k, C, H, W]``."""
    batch, rows, channels, *rest = frames.shape
    frame = frames[0, 0].numel()
    plane = frame // channels
    size = [batch, length, k * channels, *rest]
    stride = [rows * frame, frame, plane, *frames.stride()[3:]]
    if length == 1:
        del size[1], stride[1]
    return frames.as_strided(size, stride, frames.storage_offset() + offset * frame)
