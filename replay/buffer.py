"""The one replay buffer: per-env streams of observations, each frame stored once.

Storage layout
--------------
The buffer keeps one stream per parallel env. Stream ``e`` is a ring of ``per_env = capacity // num_envs``
rows occupying rows ``[e * per_env, (e + 1) * per_env)`` of one TensorDict ``[num_envs * per_env]`` that the
buffer owns (:attr:`ReplayBuffer.storage`): plain tensors in memory, or tensordict ``MemoryMappedTensor``
files under ``<path>/storage/``, allocated at full capacity on the first write. Rows are numbered by an
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

Bookkeeping columns (``"_replay"``), stored with the data so that a saved buffer is self-contained:
``first`` the absolute index of the row's episode start, ``last`` the absolute index of its episode's
final row (``int64 max`` while the episode runs), ``is_transition``, ``segment`` the episode's stable id
and ``has_action`` (False on action-less (video) steps and on rows without a transition). Per-stream
positions (``head``, pending flag, ...) are small and live in :meth:`ReplayBuffer.state_dict` / the
``replay.json`` written by :meth:`ReplayBuffer.save`.

Episodes and their ids
----------------------
Episode boundaries come from ``("next", "done")``; a step whose ``episode`` id differs from the
pending row's (an env reset without a done flag) closes that episode at its pending row. Every episode
gets an id when its first step is written: 0, 1, 2, ... in the order the episodes start (by step, then
by env), kept in the ``segment`` column. An id never changes: not with later writes, epochs, checkpoints
or save / load, so a dataset written in one go has ids ``0 .. N - 1`` that can index a per-episode
table (PV-RNN's adaptive vectors). The stored part of an episode is its *segment*
(:meth:`ReplayBuffer.episodes`, :meth:`ReplayBuffer.episode`); the ring may have overwritten its
beginning, never its end.

Sampling
--------
Rows are drawn uniformly over the stored transitions (rejection of rows that cannot start the
requested sample: no transition, a slice or an offset crossing an episode end, a frame stack whose
frames were overwritten), then each observation key is gathered once with ``index_select``. Frame
stacks apply to image keys (uint8 ``[C, H, W]``, e.g. ``pixels``): the frames ``t - k + 1 .. t + L``
are gathered once and the observation and next-observation stacks are views of them. Batch layouts
are listed in :meth:`ReplayBuffer.sample`.

Memory per stored step is one row: one frame plus the small keys, against two stacked frames
``[3k, H, W]`` per step in a buffer that stores stacks (see ``docs/bench_replay.md``).

On disk
-------
:meth:`ReplayBuffer.save` writes ``<path>/storage/`` (the storage TensorDict as tensordict memory-mapped
files, ``TensorDict.load_memmap`` layout) and ``<path>/replay.json`` (format ``latentrl.replay/2``: stream
positions, layout, key specs). Format ``latentrl.replay/1`` (TorchRL ``LazyMemmapStorage.dumps``: the same
file layout plus ``storage_metadata.json``, without the ``segment`` and ``has_action`` columns) still
loads: those two columns are derived on load and kept in memory (9 bytes a row) until the buffer is saved
again in format 2.

Nothing on disk is overwritten or modified unless asked: ``save`` refuses a folder holding a dataset
(``overwrite=True`` replaces it) and writes into a temporary folder moved into place; ``load`` checks the
files against ``replay.json`` (columns, dtypes, shapes, file sizes) before it maps them, and maps them
read-only (copy-on-write) unless ``writable=True``; an on-disk buffer never writes over rows stored in its
folder. ``extend`` refuses non-finite observations, actions and extras, and infinite rewards.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import types
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tensordict import MemoryMappedTensor, TensorDict, TensorDictBase

__all__ = ["DatasetError", "ReplayBuffer"]

_DONE_KEYS = ("terminated", "truncated", "done")
_TRANSITION_KEYS = ("reward", *_DONE_KEYS)  # stored with the row of the step they follow, under "next"
_BATCH_ONLY = ("is_first", "has_action", "segment_id", "segment_step", "offset", "target")  # made by sample()
_NOT_OBS = frozenset({"episode", "step", "action", "reward", *_DONE_KEYS, *_BATCH_ONLY})
_META = "_replay"
_FIRST, _LAST, _IS_TRANSITION = (_META, "first"), (_META, "last"), (_META, "is_transition")
_SEGMENT, _HAS_ACTION = (_META, "segment"), (_META, "has_action")
_NO_END = torch.iinfo(torch.int64).max
_META_FILE = "replay.json"
_STORAGE_DIR = "storage"
_FORMAT = "latentrl.replay/2"
_FORMAT_V1 = "latentrl.replay/1"  # TorchRL storage, no segment / has_action columns
_GOALS = (None, "future", "random")


def _key_str(key) -> str:
    return ".".join(key) if isinstance(key, tuple) else key


def _key_tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _norm_key(key):
    """TensorDict's spelling of a key: a string at the root, a tuple when nested."""
    key = tuple(key) if isinstance(key, (tuple, list)) else (key,)
    return key[0] if len(key) == 1 else key


@functools.lru_cache(maxsize=64)
def _arange(start: int, stop: int) -> torch.Tensor:
    """``torch.arange(start, stop)``, cached for the sampling hot path (read-only: never write into it)."""
    return torch.arange(start, stop)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_capacity(capacity) -> int:
    if isinstance(capacity, float) and capacity.is_integer():
        capacity = int(capacity)
    if not _is_int(capacity) or capacity < 2:
        raise ValueError(f"capacity must be an int >= 2 (stored rows: about one per env step plus one per episode "
                         f"end), got {capacity!r}")
    return int(capacity)


def _check_rank_pair(method: str, index, count) -> None:
    """``index`` of ``count`` data-parallel ranks: ints with ``0 <= index < count``, else an error naming ``method``."""
    if not (_is_int(count) and _is_int(index) and count >= 1 and 0 <= index < count):
        raise ValueError(f"{method}(index, count) needs 0 <= index < count, got index={index!r}, count={count!r}")


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: use 'cpu' or 'cuda'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but this torch sees no CUDA GPU; use device='cpu'")
    return device


class DatasetError(ValueError):
    """A dataset on disk that does not match its manifest (``replay.json``) or cannot be read; nothing was changed."""


def _read_json(file: Path, fix: str) -> dict:
    """A JSON object from ``file``; damaged or unreadable content is a :class:`DatasetError` naming the file."""
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{file} is damaged ({type(err).__name__}: {err}); {fix}") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"{file} is damaged (it holds a JSON {type(meta).__name__}, not an object); {fix}")
    return meta


_REWRITE = "nothing was opened or changed; write the dataset again (ReplayBuffer.save, scripts/collect_dataset.py)"


def _mapped_columns(folder: Path, prefix: tuple = ()) -> dict[tuple, tuple[torch.dtype, list[int], Path]]:
    """The columns of a tensordict memory-mapped folder (``TensorDict.memmap`` layout): ``key -> (dtype, shape,
    file)``, read from its ``meta.json`` files (nested TensorDicts are sub-folders)."""
    file = folder / "meta.json"
    if not file.is_file():
        raise DatasetError(f"the dataset is incomplete: {file} is missing; {_REWRITE}")
    out = {}
    for key, entry in _read_json(file, _REWRITE).items():
        if key in ("shape", "device", "_type") or not isinstance(entry, dict):
            continue
        if entry.get("type") == "TensorDict":
            out |= _mapped_columns(folder / key, (*prefix, key))
            continue
        dtype = getattr(torch, str(entry.get("dtype", "")).replace("torch.", ""), None)
        shape = entry.get("shape")
        if (not isinstance(dtype, torch.dtype) or not isinstance(shape, list) or entry.get("is_nested")
                or not all(_is_int(d) and d >= 0 for d in shape)):
            raise DatasetError(f"{file} describes column {key!r} as {entry}, which is not a dense tensor "
                               f"(dtype and shape); the dataset is damaged: {_REWRITE}")
        out[(*prefix, key)] = (dtype, shape, folder / f"{key}.memmap")
    return out


def _open_mapped(folder: Path, *, rows: int | None, writable: bool,
                 expected: dict[tuple, tuple[str, list[int]] | None] | None = None) -> TensorDict:
    """Open the memory-mapped columns under ``folder`` after checking them; nothing on disk changes.

    Every column must have ``rows`` rows (``None``: those of its ``meta.json``), the dtype and per-row
    shape of ``expected`` (``key -> (dtype, shape)``; a missing column is an error), and a file of
    exactly its size: a file cut short or missing is refused before it is opened (mapping it would extend
    the file with zeros). ``writable=False`` maps the files copy-on-write (``MAP_PRIVATE``): nothing
    written to the tensors ever reaches the disk.
    """
    columns = _mapped_columns(folder)
    if not columns:
        raise DatasetError(f"{folder} holds no stored columns; {_REWRITE}")
    if rows is None:  # a plain memory-mapped TensorDict: its own row count
        rows = (next(iter(columns.values()))[1] or [0])[0]
    for key, spec in (expected or {}).items():
        if key not in columns:
            raise DatasetError(f"{folder} lacks the column {'.'.join(key)!r} that replay.json lists (the storage "
                               f"and replay.json come from different buffers, or a file was deleted); {_REWRITE}")
        if spec is None:
            continue
        dtype, shape = spec
        got_dtype, got_shape, _ = columns[key]
        if str(got_dtype).replace("torch.", "") != dtype or list(got_shape[1:]) != list(shape):
            raise DatasetError(
                f"column {'.'.join(key)!r} is stored as {str(got_dtype).replace('torch.', '')} {got_shape[1:]} per row "
                f"but replay.json says {dtype} {list(shape)}: the storage and replay.json come from different "
                f"buffers; {_REWRITE}")
    data = TensorDict({}, batch_size=[rows])
    for key, (dtype, shape, file) in columns.items():
        if not shape or shape[0] != rows:
            raise DatasetError(f"column {'.'.join(key)!r} holds {shape[:1]} rows but the dataset's layout needs "
                               f"{rows}: the storage and replay.json come from different buffers; {_REWRITE}")
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if not file.is_file():
            raise DatasetError(f"the dataset is incomplete: {file} (column {'.'.join(key)!r}, {nbytes} bytes) is "
                               f"missing; {_REWRITE}")
        size = file.stat().st_size
        if size != nbytes:
            raise DatasetError(
                f"the dataset is damaged: {file} holds {size} bytes, but column {'.'.join(key)!r} ({dtype} "
                f"{shape}) needs {nbytes} (a copy or a write that did not finish cuts files short); {_REWRITE}")
        if numel:
            tensor = torch.from_file(str(file), shared=writable, size=numel, dtype=dtype).view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        mapped = MemoryMappedTensor(tensor)
        mapped.filename, mapped._handler, mapped.index, mapped.parent_shape = str(file), None, None, torch.Size(shape)
        data.set(_norm_key(key), mapped)
    return data


# fields of a replay.json (or a checkpoint's layout) -> their types; then those of a buffer holding rows
_MANIFEST_FIELDS = {"format": (str,), "capacity": (int,), "num_transitions": (int,)}
_LAYOUT_FIELDS = {
    "per_env": (int,), "schema": (dict,), "head": (list,), "pending": (list,), "cur_first": (list,),
    "cur_episode": (list,), "next_episode_id": (int,),
}
_SCHEMA_FIELDS = {"obs": list, "stacked": list, "extras": list, "transition": list, "has_episode": bool,
                  "has_step": bool, "specs": dict}


def _check_manifest(meta: dict, where: str, fix: str = _REWRITE) -> None:
    """A ``replay.json`` (or a checkpoint's layout) that the buffer can restore: a clear error names what is wrong."""
    def bad(what: str):
        return DatasetError(f"{where} is damaged or not a replay buffer manifest: {what}; {fix}")

    if meta.get("format") not in (_FORMAT, _FORMAT_V1):
        raise bad(f"format {meta.get('format')!r}, expected {_FORMAT!r} or the older {_FORMAT_V1!r}")
    for field, types_ in _MANIFEST_FIELDS.items():
        if not isinstance(meta.get(field), types_) or isinstance(meta.get(field), bool):
            raise bad(f"field {field!r} is {meta.get(field)!r}")
    num_envs = meta.get("num_envs")
    if num_envs is None:
        return
    if not _is_int(num_envs) or num_envs < 1:
        raise bad(f"field 'num_envs' is {num_envs!r}")
    fields = dict(_LAYOUT_FIELDS)
    if meta["format"] == _FORMAT:
        fields |= {"cur_segment": (list,), "next_segment_id": (int,)}
    for field, types_ in fields.items():
        value = meta.get(field)
        if not isinstance(value, types_) or isinstance(value, bool):
            raise bad(f"field {field!r} is {value!r}")
        if isinstance(value, list) and (len(value) != num_envs or not all(isinstance(v, (int, bool)) for v in value)):
            raise bad(f"field {field!r} must list {num_envs} ints (one per env stream), got {value!r}")
    if meta["per_env"] != meta["capacity"] // num_envs or meta["per_env"] < 2:
        raise bad(f"per_env {meta['per_env']} does not follow from capacity {meta['capacity']} over {num_envs} envs")
    if min(meta["head"]) < 0 or meta["num_transitions"] < 0:
        raise bad("negative stream positions")
    schema = meta["schema"]
    for field, type_ in _SCHEMA_FIELDS.items():
        if not isinstance(schema.get(field), type_):
            raise bad(f"schema field {field!r} is {schema.get(field)!r}")
    for key, spec in schema["specs"].items():
        if (not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str)
                or not isinstance(getattr(torch, spec["dtype"], None), torch.dtype)
                or not isinstance(spec.get("shape"), list) or not all(_is_int(d) and d >= 0 for d in spec["shape"])):
            raise bad(f"the spec of {key!r} is {spec!r}")
    if any(k not in schema["specs"] for k in schema["obs"]):
        raise bad(f"observation keys {schema['obs']} without specs")


def _expected_columns(meta: dict) -> dict[tuple, tuple[str, list[int]] | None]:
    """The storage columns a manifest promises: ``key -> (dtype, per-row shape)``, or ``None`` where only the
    column's presence is known (the ``next`` transition keys)."""
    schema, specs = meta["schema"], meta["schema"]["specs"]
    out: dict[tuple, tuple[str, list[int]] | None] = {
        (k,): (specs[k]["dtype"], specs[k]["shape"]) for k in schema["obs"]}
    if "action" in specs:
        out[("action",)] = (specs["action"]["dtype"], specs["action"]["shape"])
    for key in schema["extras"]:
        spec = specs.get(_key_str(tuple(key)))
        out[tuple(key)] = None if spec is None else (spec["dtype"], spec["shape"])
    out |= {("next", k): None for k in schema["transition"]}
    out |= {("episode",): ("int64", []), ("step",): ("int64", []), _FIRST: ("int64", []), _LAST: ("int64", []),
            _IS_TRANSITION: ("bool", [])}
    if meta["format"] == _FORMAT:
        out |= {_SEGMENT: ("int64", []), _HAS_ACTION: ("bool", [])}
    return out


def _holds_dataset(path: Path) -> bool:
    """Whether ``path`` holds a dataset (:meth:`ReplayBuffer.save` may replace it with ``overwrite=True``);
    ``False`` for a new or empty folder. A file, or a folder holding anything else, is an error: never replaced."""
    if not path.exists():
        return False
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file; save() writes a folder: pass a new or empty folder")
    if any((path / name).exists() for name in (_META_FILE, _STORAGE_DIR, "meta.json")):
        return True
    if any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty and holds no replay dataset; save() never replaces other files: "
                              "pass a new or empty folder")
    return False


class _buffer_or_class_method:
    """A method that also works on the class: ``ReplayBuffer.relabel(task, td)`` runs it with ``self=None``."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, owner=None):
        if obj is not None:
            return types.MethodType(self.fn, obj)
        return functools.wraps(self.fn)(functools.partial(self.fn, None))


class ReplayBuffer:
    """Replay buffer of steps from ``num_envs`` parallel envs, each frame stored once.

    Args:
        capacity: number of stored rows (observations); about one row per env step plus one per
            episode end. Split evenly over the env streams (``capacity // num_envs`` each).
        path: folder for an on-disk (memory-mapped) buffer; ``None`` keeps it in memory. Rows already
            stored there are never overwritten (open them with :meth:`load` or :meth:`load_state_dict`).
        device: where :meth:`sample` puts its batches.
        storage_device: where an in-memory buffer keeps its rows (observations, actions, extras, rewards);
            ``None`` (default): the CPU. ``"cuda"`` keeps them on the GPU beside MuJoCo Warp envs and the
            learner, so that neither :meth:`extend` nor :meth:`sample` copies frames between host and GPU
            (the trainer's online loop on a GPU). The small bookkeeping columns (episode bounds, ids, steps)
            stay on the CPU, where rows are drawn; an ``extend`` then reads only its done flags and episode
            ids on the host (extend ``[num_envs, T]`` steps at once to make that one read per ``T`` steps).
        domain: the domain whose physics states the buffer holds (``"walker"``), saved with it; lets
            :meth:`relabel` refuse another domain's task whose physics happen to have the same size
            (cheetah and walker states both have 18 numbers).

    ``extend(td)`` takes TorchRL env steps (``[num_envs]`` or ``[num_envs, T]``); ``sample`` returns
    transitions ``[B]``, slices ``[B, horizon]`` or fixed-offset pairs ``[B]``, with frame stacks built
    at sample time; ``episodes()`` / ``episode(id)`` enumerate and read the stored episodes.
    """

    def __init__(self, capacity: int, *, path: str | Path | None = None, device: str | torch.device = "cpu",
                 domain: str | None = None, storage_device: str | torch.device | None = None):
        self.capacity = _check_capacity(capacity)
        self.path = None if path is None else Path(path)
        self.device = _check_device(device)
        self.storage_device = None if storage_device is None else _check_device(storage_device)
        if self.storage_device is not None and self.path is not None:
            raise ValueError(f"storage_device={str(self.storage_device)!r} is for in-memory buffers; a path-backed "
                             f"buffer ({self.path}) keeps its rows in memory-mapped files on the host")
        if domain is not None and (not isinstance(domain, str) or not domain or "-" in domain):
            raise ValueError(f"domain must be a domain name such as 'walker' (a task name's part before '-'), "
                             f"got {domain!r}")
        self.domain = domain
        self._writable = True  # False for a dataset opened read-only by load()
        if self.path is not None and self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"path {self.path} is a file; an on-disk buffer needs a folder (new or empty)")
        if self.path is not None and (self.path / _META_FILE).exists():
            raise FileExistsError(
                f"{self.path} already holds a saved replay buffer; open it with ReplayBuffer.load(path) "
                "or pass an empty folder"
            )
        self.num_envs: int | None = None
        self._data: TensorDict | None = None
        self._num_transitions = 0
        self._version = 0  # bumped by every write; keys the cached episode table
        self._table: tuple[int, TensorDict] | None = None
        self._shard: tuple[int, int] | None = None  # (index, count): sample only episodes id % count == index
        self._segment_numbering = (0, 1)  # (first id, stride) of the episode ids this buffer gives out

    # ------------------------------------------------------------------ layout and state
    def _init_layout(self, num_envs: int, td: TensorDictBase, actions: bool, action_shape) -> None:
        per_env = self.capacity // num_envs
        if per_env < 2:
            raise ValueError(
                f"capacity {self.capacity} is too small for {num_envs} env streams (each needs >= 2 rows); "
                f"use capacity >= {2 * num_envs}"
            )
        self._set_schema(self._infer_schema(td, actions, action_shape))
        self.num_envs, self.per_env = num_envs, per_env
        self._head = torch.zeros(num_envs, dtype=torch.int64)  # next absolute row of each stream
        self._pending = torch.zeros(num_envs, dtype=torch.bool)  # row `head` holds the pending next obs
        self._cur_first = torch.zeros(num_envs, dtype=torch.int64)  # first row of the running episode
        self._cur_episode = torch.full((num_envs,), -1, dtype=torch.int64)
        self._cur_segment = torch.full((num_envs,), -1, dtype=torch.int64)  # id of the running episode
        self._next_episode_id = 0  # for data without an `episode` key
        self._next_segment_id = self._segment_numbering[0]
        self._any_actionless = False  # some step was written with actions=False (else has_action needs no read)
        self._refresh_bounds()

    @staticmethod
    def _infer_schema(td: TensorDictBase, actions: bool, action_shape) -> dict:
        if "next" not in td.keys() or not isinstance(td.get("next"), TensorDictBase):
            raise KeyError("extend() expects TorchRL env steps with a 'next' sub-TensorDict (the env output)")
        nxt = td.get("next")
        if actions and "action" not in td.keys():
            raise KeyError("extend() expects an 'action' entry (float32 [*, A]); for action-less steps "
                           "(video) call extend(td, actions=False)")
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

        specs = {k: spec(td.get(k)) for k in obs}
        if "action" in td.keys():
            specs["action"] = spec(td.get("action"))
        elif action_shape is not None:
            shape = [action_shape] if isinstance(action_shape, (int, np.integer)) else list(action_shape)
            if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError(f"action_shape must be an int or a sequence of ints, got {action_shape!r}")
            specs["action"] = {"shape": [int(d) for d in shape], "dtype": "float32"}
        specs |= {_key_str(k): spec(td.get(k)) for k in extras}
        return {
            "obs": obs,
            "stacked": [k for k in obs if td.get(k).dtype == torch.uint8 and td.get(k).dim() == bd + 3],
            "extras": [list(_key_tuple(k)) for k in extras],
            "transition": transition,
            "has_episode": "episode" in td.keys(),
            "has_step": "step" in td.keys(),
            "specs": specs,
        }

    def _set_schema(self, schema: dict) -> None:
        self._schema = schema
        self._extra_keys = [_norm_key(k) for k in schema["extras"]]
        # per-row keys other than observations: ``action`` (when stored), ``episode``, ``step``, extras
        action = ["action"] if "action" in schema["specs"] else []
        self._row_keys = [*action, "episode", "step", *self._extra_keys]
        self._next_keys = [("next", k) for k in schema["transition"]]

    def _refresh_bounds(self) -> None:
        self._hi = self._head + self._pending.long()
        self._lo = (self._hi - self.per_env).clamp_min(0)
        n = self._hi - self._lo
        cum = n.cumsum(0)
        self._n, self._cum = n, cum
        self._num_rows = int(cum[-1])
        self._max_rows = max(int(n.max()), 1)
        self._version += 1

    def _allocate(self, template: TensorDictBase) -> TensorDict:
        """The storage ``[num_envs * per_env]`` with ``template``'s columns (one row ``[1]``).

        In memory, ``torch.empty`` (pages are mapped on first write); on disk, sparse memory-mapped
        files under ``<path>/storage``. The small bookkeeping columns start at zero.
        """
        size = self.num_envs * self.per_env
        if self.path is None:
            data = template.named_apply(
                lambda key, x: torch.empty((size, *x.shape[1:]), dtype=x.dtype, device=self._column_device(key)),
                nested_keys=True, batch_size=[size], device=None)
        else:
            storage = self.path / _STORAGE_DIR
            if storage.is_dir() and any(storage.iterdir()):
                raise FileExistsError(
                    f"{storage} already holds stored rows (of another buffer, or of an earlier run in this folder); "
                    f"writing would overwrite them. Open them with ReplayBuffer.load({str(self.path)!r}) (a saved "
                    "dataset) or load_state_dict(checkpoint) (a run's buffer), or pass a new or empty folder as path"
                )
            data = template.expand(size).memmap_like(prefix=storage, existsok=True)
        data.get(_META).apply_(lambda x: x.zero_())
        return data

    def _column_device(self, key) -> torch.device:
        """Where column ``key`` lives: the bookkeeping (``_replay`` columns, ``episode``, ``step``) on the CPU,
        where rows are drawn and episodes are tracked; the rest on ``storage_device`` (default the CPU)."""
        if self.storage_device is None or _key_tuple(key)[0] in (_META, "episode", "step"):
            return torch.device("cpu")
        return self.storage_device

    def _place_columns(self, data: TensorDict) -> TensorDict:
        """``data`` (rows on the CPU) with each column moved to :meth:`_column_device`."""
        if self.storage_device is None:
            return data
        return data.named_apply(lambda key, x: x.as_subclass(torch.Tensor).to(self._column_device(key)),
                                nested_keys=True, device=None)

    def _attach(self) -> None:
        """Cache flat ``[rows, -1]`` views of the storage columns for the sampling hot path.

        Indexing a TensorDict leaf by leaf with advanced indexing was measured ~5x slower than
        ``index_select`` for uint8 frames (scripts/bench_replay.py), so sampling and writing use these
        views of the storage tensors.
        """
        data = self._data
        n = data.shape[0]
        self._cols, self._shapes = {}, {}
        for key in data.keys(include_nested=True, leaves_only=True):
            col = data.get(key).as_subclass(torch.Tensor)
            self._shapes[_norm_key(key)] = col.shape[1:]
            self._cols[_norm_key(key)] = col.reshape(n, -1)
        self._first = self._cols[_FIRST].view(-1)
        self._last = self._cols[_LAST].view(-1)
        self._is_transition = self._cols[_IS_TRANSITION].view(-1)
        self._segment = self._cols[_SEGMENT].view(-1)
        self._has_action = self._cols[_HAS_ACTION].view(-1)

    def _write(self, slots: torch.Tensor, rows: TensorDictBase) -> None:
        """Write ``rows`` ``[n]`` (every storage column) at storage rows ``slots`` ``[n]``."""
        n = slots.numel()
        for key, value in rows.items(include_nested=True, leaves_only=True):
            col = self._cols[_norm_key(key)]
            index = slots if col.device == slots.device else slots.to(col.device, non_blocking=True)
            col.index_copy_(0, index, value.reshape(n, -1).to(col.device, col.dtype))

    def _metadata(self) -> dict:
        meta = {"format": _FORMAT, "capacity": self.capacity, "num_envs": self.num_envs,
                "num_transitions": self._num_transitions, "domain": self.domain}
        if self.num_envs is not None:
            meta.update({
                "per_env": self.per_env,
                "schema": self._schema,
                "head": self._head.tolist(),
                "pending": self._pending.tolist(),
                "cur_first": self._cur_first.tolist(),
                "cur_episode": self._cur_episode.tolist(),
                "cur_segment": self._cur_segment.tolist(),
                "next_episode_id": self._next_episode_id,
                "next_segment_id": self._next_segment_id,
                "segment_stride": self._segment_numbering[1],
                "any_actionless": self._any_actionless,
            })
        return meta

    def _restore(self, meta: dict, data: TensorDict | None) -> None:
        """Positions from ``meta`` (a ``replay.json`` or checkpoint layout), rows from ``data``."""
        if meta.get("format") not in (_FORMAT, _FORMAT_V1):
            raise ValueError(f"not a latentrl replay buffer (format {meta.get('format')!r}, expected "
                             f"{_FORMAT!r} or the older {_FORMAT_V1!r})")
        domain = meta.get("domain")
        if domain is not None and self.domain is not None and domain != self.domain:
            raise ValueError(f"the stored buffer holds {domain} steps but this buffer is for {self.domain} "
                             f"(domain={self.domain!r}); restore it into a buffer of its own domain")
        self.domain = domain or self.domain
        self.capacity, self.num_envs = meta["capacity"], meta["num_envs"]
        self._num_transitions = meta["num_transitions"]
        self._data, self._table = None, None
        if self.num_envs is None:
            return
        self.per_env = meta["per_env"]
        self._set_schema(meta["schema"])
        size = self.num_envs * self.per_env
        if data is None or data.batch_dims != 1 or data.shape[0] != size:
            got = None if data is None else list(data.batch_size)
            raise ValueError(f"the stored rows have batch size {got}, but the layout ({self.num_envs} env streams "
                             f"of {self.per_env} rows) needs [{size}]: the storage and replay.json (or the "
                             "checkpoint's layout) come from different buffers")
        self._head = torch.tensor(meta["head"], dtype=torch.int64)
        self._pending = torch.tensor(meta["pending"], dtype=torch.bool)
        self._cur_first = torch.tensor(meta["cur_first"], dtype=torch.int64)
        self._cur_episode = torch.tensor(meta["cur_episode"], dtype=torch.int64)
        self._next_episode_id = meta["next_episode_id"]
        self._refresh_bounds()
        self._data = data
        if _SEGMENT in data.keys(include_nested=True, leaves_only=True):
            self._cur_segment = torch.tensor(meta["cur_segment"], dtype=torch.int64)
            self._next_segment_id = meta["next_segment_id"]
            stride = int(meta.get("segment_stride", 1))  # older layouts: ids 0, 1, 2, ...
            self._segment_numbering = (self._next_segment_id % stride, stride)
            self._any_actionless = meta.get("any_actionless", True)  # unknown: read the column
            self._attach()
        else:
            self._derive_segment_columns()

    def _derive_segment_columns(self) -> None:
        """Add the ``segment`` and ``has_action`` columns to rows written in format 1 (in memory).

        Ids follow the episodes' first absolute rows (then the env): a fixed function of the stored data,
        so a format-1 dataset gets the same ids every time it is opened.
        """
        data, size = self._data, self._data.shape[0]
        first = data.get(_FIRST).as_subclass(torch.Tensor).reshape(-1)
        self._first = first  # read by _segment_bounds
        env, row, slot, starts, index, _ = self._segment_bounds()
        key = first[slot[starts]] * self.num_envs + env[starts]
        ids = torch.empty_like(key)
        ids[key.argsort()] = torch.arange(len(key))
        segment = torch.full((size,), -1, dtype=torch.int64)
        segment[slot] = ids[index]
        data.set(_SEGMENT, segment)
        data.set(_HAS_ACTION, data.get(_IS_TRANSITION).as_subclass(torch.Tensor).clone())
        self._next_segment_id = len(key)
        self._any_actionless = False  # format 1 stored actions with every step
        pending_slot = torch.arange(self.num_envs) * self.per_env + self._head % self.per_env
        self._cur_segment = torch.where(self._pending, segment[pending_slot], -1)
        self._attach()

    def _persist(self) -> None:
        """Give a path-backed buffer's in-memory columns (derived from format 1) files under its path (not for a
        dataset opened read-only: its files are never changed)."""
        if not self._writable:
            return
        leaves = self._data.values(include_nested=True, leaves_only=True)
        if not all(isinstance(x, MemoryMappedTensor) for x in leaves):
            self._data.memmap_(prefix=self.path / _STORAGE_DIR, existsok=True)
            self._attach()

    def state_dict(self) -> dict:
        """Checkpoint: stream positions, plus the rows written so far for an in-memory buffer.

        Holds only tensors, dicts, lists, str, int, bool and None, so ``torch.load(weights_only=True)``
        reads it back. A path-backed buffer keeps its rows on disk; only its positions go in the checkpoint.
        """
        out = {"layout": self._metadata()}
        if self._data is not None:
            if self.path is None:
                # only the rows written so far: the storage is allocated at full capacity on the first
                # write, and saving all of it made early checkpoints full-size (3.7 GB for 1,500 pixel steps)
                rows = min(self.per_env, int(self._hi.max()))
                data = self._data.reshape(self.num_envs, self.per_env)[:, :rows].reshape(-1)
                # clone: a view would save the whole storage
                out["storage"] = data.apply(lambda x: x.as_subclass(torch.Tensor).to("cpu", copy=True)).to_dict()
                out["rows_per_env"] = rows
            else:
                self._persist()
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (also one written by the format-1 buffer)."""
        self._check_writable("load_state_dict")
        meta = state_dict["layout"]
        _check_manifest(meta, "the checkpoint's replay buffer layout",
                        "nothing was restored: resume from another checkpoint, or start a fresh run")
        data = None
        if meta.get("num_envs") is not None:
            num_envs, per_env = meta["num_envs"], meta["per_env"]
            if "storage" in state_dict:
                rows = state_dict.get("rows_per_env", per_env)  # older checkpoints: every row
                saved = TensorDict(state_dict["storage"], batch_size=[num_envs * rows])
                self.num_envs, self.per_env = num_envs, per_env
                path, self.path = self.path, None  # an in-memory checkpoint restores in memory
                index = torch.arange(num_envs)[:, None] * per_env + torch.arange(rows)
                storage_device, self.storage_device = self.storage_device, None  # placed on the CPU, then moved
                data = self._allocate(saved[:1])
                self.storage_device = storage_device
                self.path = path
                data[index.reshape(-1)] = saved
                data = self._place_columns(data)
            elif self.path is not None:
                data = _open_mapped(self.path / _STORAGE_DIR, rows=num_envs * per_env, writable=True,
                                    expected=_expected_columns(meta))
            else:
                raise ValueError("this checkpoint holds positions only (a path-backed buffer); "
                                 "construct the buffer with the same path before loading it")
        self._restore(meta, data)

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
        return len(self._segment_table())

    @property
    def storage(self) -> TensorDict | None:
        """The rows ``[num_envs * per_env]`` (plain tensors, or ``MemoryMappedTensor`` on disk); ``None``
        before the first write. For reading (memory accounting, inspection): write through :meth:`extend`."""
        return self._data

    def __repr__(self) -> str:
        where = "memory" if self.path is None else str(self.path)
        keys = [] if self.num_envs is None else self._schema["obs"]
        return (f"ReplayBuffer(transitions={len(self)}, episodes={self.num_episodes}, "
                f"capacity={self.capacity}, num_envs={self.num_envs}, obs={keys}, storage={where})")

    # ------------------------------------------------------------------ writing
    def extend(self, td: TensorDictBase, *, flat: bool = False, actions: bool = True,
               action_shape: int | Sequence[int] | None = None) -> None:
        """Add env steps.

        Args:
            td: TorchRL env steps, ``[num_envs]`` (one step of every env) or ``[num_envs, T]``
                (``T`` consecutive steps of every env); with ``flat=True``, ``[N]`` consecutive steps
                of a single stream (an offline dataset: episodes one after another).
            actions: ``False`` for action-less steps (video): ``action`` may be missing (any given
                is ignored), as may ``("next", "reward")`` (stored as NaN), agent extras (zeros) and
                ``terminated`` / ``truncated`` (``False`` / ``done``). They are stored with a zero
                action and ``has_action`` False, which every sampled batch carries. A buffer mixes
                both kinds of steps.
            action_shape: the action shape ``[A]`` to store when the buffer's first steps are
                action-less (later steps may then carry actions); without it such a buffer stores
                no ``action`` column and accepts only action-less steps.
        """
        if not isinstance(td, TensorDictBase):
            raise TypeError(f"extend() expects a TensorDict, got {type(td).__name__}")
        self._check_writable("extend")
        layout = "flat" if flat else "steps" if td.batch_dims == 1 else "rollout"
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
        if self.storage_device is None:
            td = td.to("cpu")
        actions = bool(actions)
        num_envs, steps = td.batch_size
        if num_envs == 0 or steps == 0:
            return
        schema = self._schema if self.num_envs is not None else self._infer_schema(td, actions, action_shape)
        self._check_finite(td, schema, actions, layout)
        if self.num_envs is None:
            self._init_layout(num_envs, td, actions, action_shape)
        elif num_envs != self.num_envs:
            raise ValueError(
                f"this buffer holds {self.num_envs} env streams but got a batch of {num_envs}; pass "
                "[num_envs] or [num_envs, T] steps (or flat=True for a single-stream dataset into a "
                "1-stream buffer)"
            )
        self._check_schema(td, actions)
        # one write must not wrap a stream onto itself (each step adds at most 2 rows)
        chunk = max(1, self.per_env // 2)
        for start in range(0, steps, chunk):
            self._extend_chunk(td[:, start:start + chunk], actions)

    def _check_writable(self, what: str) -> None:
        if not self._writable:
            raise RuntimeError(
                f"{what}() on a dataset opened read-only from {self.path}: ReplayBuffer.load(path) never modifies "
                "a dataset. To add steps, work on a copy (buffer.save(new_path); "
                "ReplayBuffer.load(new_path, writable=True)), or open this one with "
                "ReplayBuffer.load(path, writable=True), which changes it in place"
            )

    @staticmethod
    def _check_finite(td: TensorDictBase, schema: dict, actions: bool, layout: str) -> None:
        """Refuse non-finite (NaN, inf) observations, actions and extras, and infinite rewards (NaN marks a
        reward-free step), naming the key and the rows; ``td`` is ``[E, T]``."""
        keys = [*schema["obs"], *(("next", k) for k in schema["obs"])]
        if actions:
            keys += [k for k in ("action",) if k in td.keys()] + [_norm_key(k) for k in schema["extras"]]
        for key in keys:
            x = td.get(key, None)
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                finite = torch.isfinite(x).reshape(*td.batch_size, -1).all(-1)
                if not bool(finite.all()):
                    raise ValueError(ReplayBuffer._nonfinite_message(key, x, ~finite, layout,
                                                                     "non-finite (NaN or inf)"))
        reward = td.get(("next", "reward"), None)
        if isinstance(reward, torch.Tensor) and reward.is_floating_point():
            infinite = torch.isinf(reward).reshape(*td.batch_size, -1).any(-1)
            if bool(infinite.any()):
                what = "infinite (NaN marks reward-free steps; inf is refused)"
                raise ValueError(ReplayBuffer._nonfinite_message(("next", "reward"), reward, infinite, layout, what))

    @staticmethod
    def _nonfinite_message(key, x: torch.Tensor, bad: torch.Tensor, layout: str, what: str) -> str:
        index = bad.nonzero().tolist()
        if layout == "flat":
            where = f"dataset rows {[t for _, t in index[:10]]}"
        elif layout == "steps":
            where = f"env rows {[e for e, _ in index[:10]]}"
        else:
            where = f"(env, step) rows {[tuple(i) for i in index[:10]]}"
        e, t = index[0]
        values = x[e, t].reshape(-1)
        shown = values[~torch.isfinite(values)][:4].tolist()
        return (f"extend() refused {_key_str(key)!r}: {len(index)} step(s) hold {what} values at {where} "
                f"(e.g. {shown}); the buffer stores only finite data, so that no update trains on it. Fix the source "
                "(an env whose physics diverged, a policy that output NaN) or leave those steps out of extend()")

    def _check_schema(self, td: TensorDictBase, actions: bool) -> None:
        schema = self._schema
        if "next" not in td.keys() or not isinstance(td.get("next"), TensorDictBase):
            raise KeyError("extend() expects TorchRL env steps with a 'next' sub-TensorDict (the env output)")
        obs = [k for k in td.keys() if k not in _NOT_OBS and k != "next" and k in td.get("next").keys()
               and isinstance(td.get(k), torch.Tensor)]
        if sorted(obs) != sorted(schema["obs"]):
            raise KeyError(
                f"observation keys {sorted(obs)} differ from the stored ones {sorted(schema['obs'])}"
            )
        if actions and "action" not in schema["specs"]:
            raise ValueError("this buffer stores no actions: its first steps were action-less and gave no "
                             "action_shape; create it with extend(td, actions=False, action_shape=[A]) to mix "
                             "in steps with actions")
        if actions and "action" not in td.keys():
            raise KeyError("extend() expects an 'action' entry (float32 [*, A]); for action-less steps "
                           "(video) call extend(td, actions=False)")
        nxt = td.get("next")
        if "done" not in nxt.keys() and not {"terminated", "truncated"} <= set(nxt.keys()):
            raise KeyError(
                "extend() expects ('next', 'done') (or ('next', 'terminated') and ('next', 'truncated'))"
            )
        for key in [*schema["obs"], *self._row_keys]:
            if key in ("episode", "step"):
                continue
            x = td.get(key, None)
            if x is None:
                if not actions:  # action-less steps: zero action, zero extras
                    continue
                raise KeyError(f"missing key {key!r}: every extend() must carry the keys of the first one")
            spec = schema["specs"][_key_str(key)]
            if list(x.shape[2:]) != spec["shape"] or str(x.dtype).replace("torch.", "") != spec["dtype"]:
                raise ValueError(
                    f"{key!r} has shape {list(x.shape[2:])} and dtype {x.dtype} per step, but the buffer "
                    f"stores {spec['shape']} {spec['dtype']}"
                )

    def _zeros(self, key, batch: list[int]) -> torch.Tensor:
        spec = self._schema["specs"][_key_str(key)]
        return torch.zeros((*batch, *spec["shape"]), dtype=getattr(torch, spec["dtype"]))

    def _transition_column(self, nxt: TensorDictBase, key: str, done: torch.Tensor) -> torch.Tensor:
        """``("next", key)`` of the steps ``[E, T, 1]``; filled in when action-less data leaves it out."""
        if key in nxt.keys():
            return nxt.get(key)
        if key in ("done", "truncated"):  # a clip that ends is truncated, not terminal
            return done[..., None]
        if key == "terminated":
            return torch.zeros_like(done[..., None])
        dtype = self._cols[("next", "reward")].dtype if self._data is not None else torch.float32
        return torch.full((*done.shape, 1), float("nan"), dtype=dtype)

    def _extend_chunk(self, td: TensorDictBase, actions: bool) -> None:
        num_envs, steps = td.batch_size
        nxt = td.get("next")
        done = self._done(nxt).reshape(num_envs, steps).cpu()  # the host's one read of the steps (bookkeeping)
        if self._schema["has_episode"] and bool(self._pending.any()):
            # an env whose step opens another episode without a done flag: its episode was cut
            cut = self._pending & (td.get("episode").reshape(num_envs, steps)[:, 0].cpu() != self._cur_episode)
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
        # episode ids in start order: by step, then by env (so chunking does not change them)
        stride = self._segment_numbering[1]
        new_ids = self._next_segment_id + stride * (start.T.reshape(-1).long().cumsum(0).reshape(steps, num_envs).T - 1)
        segment = torch.where(start, new_ids, -1)
        segment[:, 0] = torch.where(start[:, 0], segment[:, 0], self._cur_segment)
        segment = segment.cummax(1).values

        # rows of episodes that started before this chunk and end in it learn their end
        for env in (pending & done.any(1)).nonzero().flatten().tolist():
            rows = torch.arange(max(int(self._cur_first[env]), int(self._lo[env])), int(head[env]))
            self._last[env * per_env + rows % per_env] = last[env, 0]

        total = n_rows.sum(1)
        if self._data is not None:  # transitions pushed out of the rings
            lo_new = (head + total - per_env).clamp_min(0)
            old = self._lo[:, None] + torch.arange(2 * steps + 1)
            leaving = old < lo_new[:, None]
            slots = torch.arange(num_envs)[:, None] * per_env + old % per_env
            self._num_transitions -= int((self._is_transition[slots] & leaving).sum())

        batch = [num_envs, steps]
        row_values = {"episode": episode, "step": step}
        for key in self._row_keys:
            if key not in row_values:
                x = td.get(key, None) if actions or key != "action" else None
                row_values[key] = x if x is not None else self._zeros(key, batch)
        obs_rows = TensorDict({k: td.get(k) for k in self._schema["obs"]} | row_values, batch_size=batch)
        obs_rows["next"] = TensorDict(
            {k: self._transition_column(nxt, k, done) for k in self._schema["transition"]}, batch_size=batch
        )
        obs_rows[_META] = TensorDict(
            first=first, last=last, is_transition=torch.ones_like(done), segment=segment,
            has_action=torch.full_like(done, actions), batch_size=batch,
        )
        if self._data is None:
            self._data = self._allocate(obs_rows[:1, 0])
            self._attach()
        base = torch.arange(num_envs)[:, None] * per_env
        self._write((base + abs_obs % per_env).reshape(-1), obs_rows.reshape(-1))

        # the next observation of each episode end and of each stream's newest step
        mask = has_next_row
        count = int(mask.sum())
        next_rows = TensorDict({k: nxt.get(k)[mask] for k in self._schema["obs"]}, batch_size=[count])
        for key in self._row_keys:
            x = obs_rows.get(key)
            next_rows[key] = torch.zeros((count, *x.shape[2:]), dtype=x.dtype)
        next_rows["episode"] = episode[mask]
        next_rows["step"] = step[mask] + 1
        next_rows["next"] = obs_rows.get("next")[mask].apply(torch.zeros_like)
        if "reward" in self._schema["transition"]:
            next_rows["next", "reward"].fill_(float("nan"))
        next_rows[_META] = TensorDict(
            first=first[mask], last=last[mask], is_transition=torch.zeros(count, dtype=torch.bool),
            segment=segment[mask], has_action=torch.zeros(count, dtype=torch.bool), batch_size=[count],
        )
        self._write((base + abs_next % per_env)[mask], next_rows)

        ended = done[:, -1]
        self._num_transitions += num_envs * steps
        self._head = head + total - (~ended).long()
        self._pending = ~ended
        self._cur_first = first[:, -1]
        self._cur_episode = episode[:, -1]
        self._cur_segment = segment[:, -1]
        self._next_segment_id += stride * int(start.sum())
        self._any_actionless |= not actions
        self._refresh_bounds()

    @staticmethod
    def _done(nxt: TensorDictBase) -> torch.Tensor:
        if "done" in nxt.keys():
            return nxt.get("done").bool()
        return nxt.get("terminated").bool() | nxt.get("truncated").bool()

    def _episode_and_step(self, td, start, offset):
        """Episode ids and steps of the chunk's rows; numbered by the buffer when the data has none."""
        if self._schema["has_episode"]:
            episode = td.get("episode").cpu()
        else:
            ids = self._next_episode_id + start.reshape(-1).long().cumsum(0).reshape(start.shape) - 1
            episode = torch.where(start, ids, -1)
            episode[:, 0] = torch.where(start[:, 0], episode[:, 0], self._cur_episode)
            episode = episode.cummax(1).values
            self._next_episode_id += int(start.sum())
        step = td.get("step").cpu() if self._schema["has_step"] else offset
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
        self._check_writable("end_episodes")
        if self.num_envs is not None and bool(self._pending.any()):
            self._close_pending(self._pending.clone())

    # ------------------------------------------------------------------ episodes
    def _segment_bounds(self):
        """Stored rows by stream and row, and where each episode's stored part (segment) starts.

        Returns ``env``, ``row``, ``slot`` (``[R]`` over the ``R`` stored rows), ``starts`` (positions
        of segment starts in those), ``index`` (``[R]``: each row's segment) and ``length`` ``[S]``.
        """
        env, row = self._all_rows()
        slot = env * self.per_env + row % self.per_env
        is_start = (row == self._first[slot]) | (row == self._lo[env])
        starts = is_start.nonzero().flatten()
        index = is_start.long().cumsum(0) - 1
        length = torch.diff(starts, append=torch.tensor([len(row)]))
        return env, row, slot, starts, index, length

    def _segment_table(self) -> TensorDict:
        """The table behind :meth:`episodes`, cached until the next write."""
        if self._table is not None and self._table[0] == self._version:
            return self._table[1]
        if self.num_envs is None or self._num_rows == 0:
            none, no = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
            table = TensorDict(id=none, env=none, start=none, length=none, first_step=none, complete=no,
                               has_action=no, batch_size=[0])
        else:
            env, row, slot, starts, index, length = self._segment_bounds()
            start_slot = slot[starts]
            no_action = (self._is_transition[slot] & ~self._has_action[slot]).long()
            missing = torch.zeros(len(starts), dtype=torch.int64).index_add_(0, index, no_action)
            table = TensorDict({
                "id": self._segment[start_slot],
                "env": env[starts],
                "start": row[starts],
                "length": length,
                "first_step": row[starts] - self._first[start_slot],
                "complete": self._last[start_slot] != _NO_END,
                "has_action": missing == 0,
            }, batch_size=[len(starts)])
            table = table[table["id"].argsort()]
        self._table = (self._version, table)
        return table

    def episodes(self) -> TensorDict:
        """The stored episodes (segments), one row each, sorted by ``id``: a TensorDict ``[S]`` of

        - ``id`` int64: the episode's stable id (see the module docstring: it never changes, across
          writes, epochs, checkpoints and save / load);
        - ``env`` int64: its env stream; ``start`` int64: the stream's absolute row of its first stored
          observation; ``length`` int64: stored observations (its transitions plus its final or pending
          observation);
        - ``first_step`` int64: observations of the episode before ``start`` that the ring already
          overwrote (0 for a whole episode; ``segment_step`` of its first stored row);
        - ``complete`` bool: its final observation is stored (it ended: done flag, cut or
          :meth:`end_episodes`); False while it runs;
        - ``has_action`` bool: every stored transition carries a recorded action (False for video).
        """
        return self._segment_table().clone()

    def episode(self, id: int, *, keys: Sequence[str] | None = None, frame_stack: int = 1) -> TensorDict:
        """The stored rows of episode ``id`` (see :meth:`episodes`) as a TensorDict ``[T]``, ``T = length``.

        Holds the observation keys (frame stacks as in :meth:`sample`, clamped at the segment's first
        stored frame), ``action`` (when stored), agent extras, ``episode``, ``step``, ``is_first``,
        ``has_action``, ``segment_id``, ``segment_step`` and ``("next", "reward" | "terminated" |
        "truncated" | "done")`` of the step taken from each row. The final row holds the last
        observation and no transition: zero action, ``has_action`` False, NaN reward, False done flags
        (the step into it carries ``done``).
        """
        table = self._segment_table()
        frame_stack = _positive_int("frame_stack", frame_stack)
        match = (table["id"] == int(id)).nonzero().flatten()
        if len(match) == 0:
            ids = table["id"]
            stored = f"{len(ids)} ids from {int(ids[0])} to {int(ids[-1])}" if len(ids) else "none"
            raise KeyError(f"episode id {id!r} is not stored (stored: {stored}); list them with episodes()")
        seg = table[int(match[0])]
        env, start, length = int(seg["env"]), int(seg["start"]), int(seg["length"])
        rows = start + torch.arange(length)
        base = env * self.per_env
        slot = base + rows % self.per_env
        first = start - int(seg["first_step"])
        out = {key: self._gather(key, slot) for key in self._row_keys}
        out["next"] = {key[1]: self._gather(key, slot) for key in self._next_keys}
        out["is_first"] = rows == first
        out["has_action"] = self._gather(_HAS_ACTION, slot)
        out["segment_id"] = self._gather(_SEGMENT, slot)
        out["segment_step"] = rows - first
        # frame stacks clamped at the segment's first stored frame (its episode start when whole)
        stack = base + torch.clamp_min(rows[:, None] + torch.arange(1 - frame_stack, 1), start) % self.per_env
        for key in self._select_keys(keys):
            if key in self._schema["stacked"]:
                out[key] = self._gather(key, stack).flatten(1, 2)
            else:
                out[key] = self._gather(key, slot)
        return TensorDict(out, batch_size=[length], device=self.device)

    def number_episodes(self, index: int, count: int) -> None:
        """Give new episodes the ids ``index, index + count, index + 2 count, ...`` instead of ``0, 1, 2, ...``:
        the buffers of ``count`` data-parallel ranks that collect their own data (online) then never give two
        episodes one id, so per-episode state keyed by it (PV-RNN's adaptive vectors) stays apart. Only for a
        buffer that holds no steps yet; saved with it."""
        _check_rank_pair("number_episodes", index, count)
        if self.num_envs is not None:
            raise RuntimeError("number_episodes() is for an empty buffer: this one already numbered its episodes")
        self._segment_numbering = (int(index), int(count))

    def shard_episodes(self, index: int, count: int) -> None:
        """From now on, :meth:`sample` draws only from the episodes whose id satisfies ``id % count == index``
        (data-parallel training: rank ``index`` of ``count`` learns from its own share of a dataset, split by
        episode); ``count=1`` lifts the restriction. Goals with ``goal="random"`` may still come from any
        episode. Nothing is copied: the restriction applies when rows are drawn."""
        _check_rank_pair("shard_episodes", index, count)
        if count == 1:
            self._shard = None
            return
        ids = self._segment_table()["id"]
        if len(ids) and not bool((ids % count == index).any()):
            raise ValueError(f"the buffer holds {len(ids)} episodes (ids {int(ids.min())}..{int(ids.max())}), none of "
                             f"them in shard {index} of {count} (ids with id % {count} == {index}); use fewer "
                             "processes than episodes, or a dataset with more episodes")
        self._shard = (int(index), int(count))

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, *, frame_stack: int = 1, horizon: int = 1, goal: str | None = None,
               keys: Sequence[str] | None = None, future_discount: float = 0.99,
               offset: int | None = None) -> TensorDict:
        """Sample transitions ``[B]`` (``horizon=1``), episode slices ``[B, horizon]``, or fixed-offset
        pairs ``[B]`` (``offset=k``).

        Transitions and slices hold the observation keys (``pixels`` as ``[*, 3 * frame_stack, H, W]``,
        oldest frame first, clamped to the episode's first frame), ``action`` (when stored), agent
        extras, ``episode``, ``step``, and ``("next", obs keys)``, ``("next", "reward")`` (when stored),
        ``("next", "terminated" | "truncated" | "done")``, plus, all of the batch shape ``[B]`` /
        ``[B, horizon]``:

        - ``is_first`` bool: the observation is its episode's first (DreamerV3's convention);
        - ``has_action`` bool: ``action`` is a recorded action (False on action-less, video, steps:
          their ``action`` is zero);
        - ``segment_id`` int64: the episode's stable id (:meth:`episodes`, :meth:`episode`);
        - ``segment_step`` int64: the observation's index in its episode (0 at ``is_first``), which
          stays valid when the ring overwrites the episode's beginning.

        ``goal="future"`` adds a ``goal`` sub-TensorDict holding the observation keys (and ``episode``,
        ``step``) of a later step of the same episode, ``t + g`` with ``g ~ Geometric(1 -
        future_discount)`` clamped at the episode's last stored observation; ``goal="random"`` one of
        any stored observation. ``keys`` restricts the observation keys.

        ``offset=k`` (any ``k >= 1``; StaMo probes use 1, 2, 4, 8) returns ``(o_t, o_{t+k},
        a_{t:t+k})`` with ``t + k`` in the same episode (``o_{t+k}`` may be its final observation):
        the observation keys at ``t`` (frame stacks as above), ``("target", obs keys)`` and
        ``("target", "step")`` at ``t + k`` (stacks clamped at the same episode start), ``action``
        ``[B, k, A]`` = ``a_t .. a_{t+k-1}``, ``has_action`` ``[B]`` (all ``k`` actions recorded),
        ``offset`` int64 ``[B]`` (= ``k``), and at ``t``: agent extras, ``episode``, ``step``,
        ``is_first``, ``segment_id``, ``segment_step``. It takes no ``horizon`` or ``goal``.

        ``pixels`` and ``("next", "pixels")`` are overlapping views of one gather (as are the windows
        of a ``[B, L]`` slice): copy them before writing into them in place.
        """
        if offset is not None:
            return self._sample_offset(batch_size, offset, frame_stack, horizon, goal, keys)
        batch_size, frame_stack, horizon = self._check_sample_args(batch_size, frame_stack, horizon, goal,
                                                                   future_discount)
        obs_keys = self._select_keys(keys)
        env, start, first = self._draw(batch_size, frame_stack, horizon, transition=True)
        per_env, length = self.per_env, horizon
        shape = [batch_size] if length == 1 else [batch_size, length]
        base = env[:, None] * per_env
        rows = start if length == 1 else start[:, None] + _arange(0, length)  # ``shape``
        slot = (base.view(-1) if length == 1 else base) + rows % per_env
        out = {key: self._gather(key, slot) for key in self._row_keys}
        nxt = {key[1]: self._gather(key, slot) for key in self._next_keys}
        out["segment_step"] = rows - (first if length == 1 else first[:, None])
        out["is_first"] = out["segment_step"] == 0
        out["has_action"] = self._transition_has_action(slot)
        # one episode per slice: its id is read once, at the slice's start
        out["segment_id"] = self._gather(_SEGMENT, slot if length == 1 else slot[:, 0])
        if length > 1:
            out["segment_id"] = out["segment_id"][:, None].expand(shape).clone()
        goal_slot = None
        if goal is not None:  # ``goal`` rows ``shape`` (and their stacks ``[*shape, k]``)
            goal_slot, goal_stack_slot = self._goal_rows(goal, env, rows, slot, first, frame_stack, future_discount)
            out["goal"] = {key: self._gather(key, goal_slot) for key in ("episode", "step")}

        # one gather per observation key: rows t .. t + L (observations and, shifted by one, the next
        # observations), frames t - k + 1 .. t + L for stacked keys (clamped at the episode start),
        # followed by the goal's rows
        stacked_keys = self._schema["stacked"]
        if any(key not in stacked_keys for key in obs_keys):
            obs_slot = base + (start[:, None] + _arange(0, length + 1)) % per_env
        if any(key in stacked_keys for key in obs_keys):
            stack_rows = torch.maximum(start[:, None] + _arange(1 - frame_stack, length + 1), first[:, None])
            stack_slot = base + stack_rows % per_env
        for key in obs_keys:
            stacked = key in stacked_keys
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

    def _sample_offset(self, batch_size, offset, frame_stack, horizon, goal, keys) -> TensorDict:
        """``sample(offset=k)``: ``(o_t, o_{t+k}, a_{t:t+k})`` pairs ``[B]`` (layout in :meth:`sample`)."""
        k = _positive_int("offset", offset)
        if horizon != 1 or goal is not None:
            raise ValueError(f"sample(offset={k}) returns pairs (o_t, o_t+k) with the actions between them and "
                             f"takes no horizon or goal (got horizon={horizon!r}, goal={goal!r}); sample slices "
                             "or goals in a separate call")
        batch_size, frame_stack, _ = self._check_sample_args(batch_size, frame_stack, 1, None, 0.0)
        if k > self.per_env - 1:
            raise ValueError(
                f"offset {k} is longer than a stream can hold ({self.per_env - 1} transitions per env with "
                f"capacity {self.capacity} over {self.num_envs} envs); lower offset or raise capacity"
            )
        obs_keys = self._select_keys(keys)
        # a start t whose k-step slice stays in one episode has o_{t+k} stored in that episode
        env, t, first = self._draw(batch_size, frame_stack, k, transition=True, name="offset")
        per_env = self.per_env
        base = env * per_env
        slot = base + t % per_env
        action_slot = base[:, None] + (t[:, None] + _arange(0, k)) % per_env
        out = {key: self._gather(key, slot) for key in self._row_keys if key != "action"}
        if "action" in self._schema["specs"]:
            out["action"] = self._gather("action", action_slot)
        out["has_action"] = self._transition_has_action(action_slot).all(1)
        out["is_first"] = t == first
        out["segment_id"] = self._gather(_SEGMENT, slot)
        out["segment_step"] = t - first
        out["offset"] = torch.full((batch_size,), k, dtype=torch.int64)
        pair = t[:, None] + torch.tensor([0, k])  # rows t and t + k  [B, 2]
        target = {"step": self._gather("step", base + (t + k) % per_env)}
        stack_rows = torch.maximum(pair[..., None] + _arange(1 - frame_stack, 1), first[:, None, None])
        for key in obs_keys:
            if key in self._schema["stacked"]:  # [B, 2, k, C, H, W] -> [B, 2, k * C, H, W]
                g = self._gather(key, base[:, None, None] + stack_rows % per_env).flatten(2, 3)
            else:
                g = self._gather(key, base[:, None] + pair % per_env)
            out[key], target[key] = g[:, 0], g[:, 1]
        out["target"] = target
        return TensorDict(out, batch_size=[batch_size], device=self.device)

    def _check_sample_args(self, batch_size, frame_stack, horizon, goal, future_discount):
        for name, value in (("batch_size", batch_size), ("frame_stack", frame_stack), ("horizon", horizon)):
            _positive_int(name, value)
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

    def _transition_has_action(self, slot: torch.Tensor) -> torch.Tensor:
        """``has_action`` of transition rows ``slot``: read only once some step came without actions (every
        read of a small column costs a cache miss per row once the frames have streamed through the cache)."""
        if self._any_actionless:
            return self._gather(_HAS_ACTION, slot)
        return torch.ones(slot.shape, dtype=torch.bool, device=self.device)

    def _gather(self, key, slot: torch.Tensor) -> torch.Tensor:
        """Rows ``slot`` of a column (``key`` as TensorDict spells it: a str, or a tuple when nested), on the
        sampling device (moved before any view is taken)."""
        col = self._cols[key]
        index = slot if slot.dim() == 1 else slot.reshape(-1)
        if index.device != col.device:  # a column on storage_device: the row indices go there, not the rows here
            index = index.to(col.device, non_blocking=True)
        out = col.index_select(0, index).view(*slot.shape, *self._shapes[key])
        return out if out.device == self.device else out.to(self.device, non_blocking=True)

    def _valid(self, env, row, frame_stack: int, horizon: int, transition: bool):
        """Which candidate rows (``row >= lo``) can start a sample; also returns their episode starts."""
        slot = env * self.per_env + row % self.per_env
        first = self._first.index_select(0, slot)
        if not transition:
            ok = torch.ones_like(row, dtype=torch.bool)
        elif horizon == 1:
            ok = self._is_transition.index_select(0, slot)
        else:
            # rows ``row .. row + L - 1`` are transitions of one episode: its final row comes after them
            # (``last``, int64 max while it runs) and so does the newest stored row (the pending one)
            end = row + horizon
            ok = (end <= self._last.index_select(0, slot)) & (end < self._hi.index_select(0, env))
        if frame_stack > 1:  # the stack was not overwritten
            ok &= torch.maximum(row - (frame_stack - 1), first) >= self._lo.index_select(0, env)
        if self._shard is not None:  # shard_episodes: only this share of the episodes
            index, count = self._shard
            ok &= self._segment.index_select(0, slot) % count == index
        return ok, first

    def _candidates(self, n: int):
        """``n`` stored rows: uniform over the stored rows once rows past a stream's end are rejected.

        Streams grow in lockstep, so drawing the stream uniformly and the row within ``max(rows)``
        rejects few draws (and avoids ``torch.searchsorted``, which stalls for milliseconds in its
        thread pool on a busy 2-core machine).
        """
        env = torch.randint(self.num_envs, (n,))
        offset = torch.randint(self._max_rows, (n,))
        return env, self._lo.index_select(0, env) + offset, offset < self._n.index_select(0, env)

    def _all_rows(self):
        """``env``, ``row`` of every stored row ``[R]``, by stream then row."""
        env = torch.repeat_interleave(torch.arange(self.num_envs), self._n)
        row = torch.arange(self._num_rows) - (self._cum - self._n)[env] + self._lo[env]
        return env, row

    def _draw(self, n: int, frame_stack: int, horizon: int, transition: bool, name: str = "horizon"):
        """``n`` rows drawn uniformly among the valid ones (rejection sampling, exact fallback)."""
        got_env, got_row, got_first, have, rate = [], [], [], 0, 1.0
        for _ in range(4):
            draws = math.ceil((n - have) * 1.1 / rate) + 16
            env, row, stored = self._candidates(draws)
            ok, first = self._valid(env, row, frame_stack, horizon, transition)
            keep = (ok & stored).nonzero().flatten()
            accepted = len(keep)
            if not got_env and accepted >= n:  # the usual case: one round of draws
                keep = keep[:n]
                return env.index_select(0, keep), row.index_select(0, keep), first.index_select(0, keep)
            got_env.append(env[keep]), got_row.append(row[keep]), got_first.append(first[keep])
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
            raise ValueError(self._nothing_valid_message(frame_stack, horizon, transition, name))
        pick = valid[torch.randint(len(valid), (n,))]
        return env[pick], row[pick], first[pick]

    def _nothing_valid_message(self, frame_stack: int, horizon: int, transition: bool, name: str) -> str:
        env, row = self._all_rows()
        slot = env * self.per_env + row % self.per_env
        since_start = row - torch.maximum(self._first[slot], self._lo[env]) + 1
        run = torch.where(self._is_transition[slot], since_start, 0)
        longest = int(run.max()) if len(run) else 0
        if transition and horizon > longest:
            return (f"{name} {horizon} is longer than every stored episode: the longest run of stored "
                    f"transitions in one episode is {longest}; lower {name} or collect longer episodes")
        return (f"no stored sample has frame_stack={frame_stack} frames of its episode still in the buffer; "
                "lower frame_stack or raise capacity")

    def _goal_rows(self, mode, env, t, slot, first, frame_stack, future_discount):
        """Storage rows of the goals ``[B(, L)]`` and of their frame stacks ``[B(, L), k]``, for samples of
        stream ``env`` ``[B]`` at rows ``t`` / storage rows ``slot`` ``[B(, L)]`` of episodes starting at ``first``."""
        per_env, length = self.per_env, 1 if t.dim() == 1 else t.shape[1]
        if mode == "future":
            offset = torch.empty(t.shape).geometric_(1.0 - future_discount).clamp_(max=per_env).long()
            start_slot = slot if length == 1 else slot[:, 0]
            end = torch.minimum(self._last.index_select(0, start_slot), self._hi.index_select(0, env) - 1)
            row = torch.minimum(t + offset, end if length == 1 else end[:, None])
            goal_env = env if length == 1 else env[:, None].expand_as(row)
            goal_first = first if length == 1 else first[:, None].expand_as(row)
        else:
            goal_env, row, goal_first = self._draw(t.numel(), frame_stack, 1, transition=False)
            goal_env, row, goal_first = goal_env.view(t.shape), row.view(t.shape), goal_first.view(t.shape)
        base = goal_env * per_env
        stack = torch.maximum(row[..., None] + _arange(1 - frame_stack, 1), goal_first[..., None])
        return base + row % per_env, base[..., None] + stack % per_env

    # ------------------------------------------------------------------ rewards
    @_buffer_or_class_method
    def relabel(self, task, td: TensorDictBase) -> TensorDictBase:
        """Write ``task``'s reward of ``("next", "physics")`` (and ``action``) into ``("next", "reward")``.

        ``task`` is a :class:`latentrl.envs.tasks.Task` (or its name); ``td`` a sampled batch ``[B]`` or
        ``[B, L]`` (sampled with ``physics`` among its keys). Modifies ``td`` in place and returns it.

        A task whose physics states have another size than the batch's is refused. Called on a buffer that
        knows its domain (``ReplayBuffer(..., domain="walker")``, kept by save / load and checkpoints), a
        task of another domain is refused too; ``ReplayBuffer.relabel(task, td)`` (on the class) can check
        only the size, and cheetah and walker states have the same size.
        """
        if ("next", "physics") not in td.keys(include_nested=True):
            raise KeyError("relabel() needs ('next', 'physics'): sample with keys that include 'physics' "
                           "from a buffer that stores physics states")
        if isinstance(task, str):
            from latentrl.envs.tasks import get_task  # a name is a convenience; the buffer needs no env code

            task = get_task(task)
        if not callable(getattr(task, "rewards_from_states", None)):
            raise TypeError(f"relabel() expects a task (latentrl.envs.get_task('walker-run')) or a task name, "
                            f"got {task!r}")
        physics = td.get(("next", "physics"))
        name, domain = getattr(task, "name", repr(task)), getattr(task, "domain", None)
        ours = None if self is None else self.domain
        if ours is not None and domain is not None and domain != ours:
            raise ValueError(
                f"task {name!r} is a {domain} task, but this buffer holds {ours} physics states: its rewards of them "
                f"would be meaningless. Relabel with a {ours} task (latentrl.envs.list_tasks({ours!r}))"
            )
        size = getattr(task, "physics_size", None)
        if size is not None and physics.shape[-1] != size:
            held = f" ({ours} physics)" if ours else ""
            raise ValueError(
                f"task {name!r} reads {domain} physics states of size {size}, but the batch holds states of size "
                f"{physics.shape[-1]}{held}: they come from another domain. Relabel with a task of the domain the "
                "data was collected in"
            )
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
    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the buffer to ``path``: memory-mapped TensorDict (``storage/``) plus ``replay.json``.

        ``path`` must be new or an empty folder; a folder holding a dataset is replaced only with
        ``overwrite=True``, and a folder holding anything else never is. The dataset is written into a
        temporary folder next to ``path`` and moved into place, so a crash leaves the old dataset (or
        none), never a half-written one.

        Saving a path-backed buffer to its own path writes the metadata only (no copy; after extending a
        buffer opened with ``load(path, writable=True)``, save it so that its positions follow); for a
        dataset opened read-only it does nothing (the folder already holds it).
        """
        if self._data is None:
            raise RuntimeError("cannot save an empty replay buffer: extend() it first")
        path = Path(path)
        if self.path is not None and path.exists() and path.resolve() == self.path.resolve():
            if self._writable:
                self._persist()
                self._write_manifest(path)
            return
        if _holds_dataset(path) and not overwrite:
            raise FileExistsError(
                f"{path} already holds a replay dataset and save() would replace it; pass overwrite=True to replace "
                "it, or save to a new folder"
            )
        if self.path is not None and self.path.resolve().is_relative_to(path.resolve()):
            raise ValueError(f"cannot save into {path}: it holds this buffer's own storage ({self.path})")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.saving-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            data = self._data if self.storage_device is None else self._data.to("cpu")
            data.memmap(prefix=tmp / _STORAGE_DIR, copy_existing=True)
            self._write_manifest(tmp)
            if path.exists():  # an empty folder, or the dataset to replace (overwrite=True)
                old = path.parent / f".{path.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _write_manifest(self, folder: Path) -> None:
        tmp = folder / (_META_FILE + ".tmp")
        tmp.write_text(json.dumps(self._metadata(), indent=1))
        tmp.replace(folder / _META_FILE)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", writable: bool = False) -> ReplayBuffer:
        """Open a buffer written by :meth:`save` as a memory-mapped dataset (nothing is copied to memory).

        The files are checked against ``replay.json`` (columns, dtypes, shapes, file sizes) before they are
        opened: a damaged or incomplete dataset is refused with an error naming the file, and is left as it
        was. By default the dataset is opened read-only (mapped copy-on-write: nothing ever reaches the
        files, and :meth:`extend` refuses); ``writable=True`` opens it for writing in place.

        Reads format 2 and the older format 1 (see the module docstring). A folder holding a plain
        memory-mapped TensorDict ``[N]`` of consecutive steps (``td.memmap(path)``) is read as a flat
        dataset into an in-memory buffer (see :meth:`from_dataset`).
        """
        path = Path(path)
        if not (path / _META_FILE).exists():
            if (path / "meta.json").exists():
                return cls.from_dataset(_open_mapped(path, rows=None, writable=False), device=device)
            if (path / _STORAGE_DIR).is_dir():
                raise DatasetError(f"the dataset is incomplete: {path / _STORAGE_DIR} holds stored rows but "
                                   f"{path / _META_FILE}, which describes them, is missing (a save that did not "
                                   f"finish, or a run's on-disk buffer: resume that run instead); {_REWRITE}")
            raise FileNotFoundError(
                f"{path} holds no replay buffer ({_META_FILE} is missing); write one with save()"
            )
        meta = _read_json(path / _META_FILE, _REWRITE)
        _check_manifest(meta, str(path / _META_FILE))
        domain = meta.get("domain") if isinstance(meta.get("domain"), str) else None
        buffer = cls(meta["capacity"], device=device, domain=domain)
        buffer.path = path
        data = None
        if meta.get("num_envs") is not None:
            rows = meta["num_envs"] * meta["per_env"]
            data = _open_mapped(path / _STORAGE_DIR, rows=rows, writable=bool(writable),
                                expected=_expected_columns(meta))
        buffer._restore(meta, data)
        buffer._writable = bool(writable)
        return buffer

    @classmethod
    def from_dataset(cls, td: TensorDictBase, *, path: str | Path | None = None,
                     device: str | torch.device = "cpu", actions: bool = True,
                     action_shape: int | Sequence[int] | None = None) -> ReplayBuffer:
        """A one-stream buffer holding a flat dataset ``[N]`` of consecutive steps (episode after episode);
        ``actions`` / ``action_shape`` as in :meth:`extend`."""
        if td.batch_dims != 1:
            raise ValueError(f"from_dataset() expects a [N] dataset, got batch size {list(td.batch_size)}")
        ends = int(cls._done(td.get("next")).sum())
        buffer = cls(td.shape[0] + ends + 1, path=path, device=device)
        buffer.extend(td, flat=True, actions=actions, action_shape=action_shape)
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
