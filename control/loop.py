"""ControlLoop: a policy driving a robot at a fixed rate, behind a safety layer, with telemetry.

One tick (period ``T = 1 / rate_hz``, deadline ``D``, 0.8 T by default):

1. sleep to the tick's scheduled time; under an e-stop send the e-stop action and nothing else;
2. observe: ``robot.get_observation()``; a raise is ``OBS_ERROR``; a missing, misshapen or non-finite
   key the policy reads is ``BAD_OBS``; a ``seq`` that did not advance or an age above
   ``max_obs_age_s`` is ``STALE_OBS``;
3. infer (only on a good observation): ``policy.step(obs[None], carry, is_first)`` under
   ``inference_mode``; a raise is ``POLICY_ERROR``; the carry advances whenever the policy saw the
   observation; finishing after ``D`` is ``DEADLINE_MISS``; a NaN / inf action ``NONFINITE_ACTION``;
4. send: the policy's action clipped to the limits and rate-limited (``|a - last sent| <= max_delta``),
   or on any fault the fallback (zero, or hold the last sent action), checked once more to be finite
   and in the limits, to ``robot.send_action``; its return value is what was applied;
5. ``max_consecutive_faults`` faulty ticks in a row latch the e-stop; an overrun skips whole periods
   (counted as missed ticks), never bursts (ros2_control's periodic sleep).

The e-stop (``estop(reason)``, thread-safe; also Ctrl-C) overrides everything and latches: category
1 (default) sends the e-stop action (zeros) and ends the run, which disconnects the robot; category
2 keeps sending it until :meth:`resume`. :meth:`reset_estop` unlatches without restarting;
:meth:`resume` restarts the policy with ``is_first=True``. A software e-stop is no certified one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import Tensor

from latentrl.control.robot import Feature
from latentrl.control.telemetry import Fault, Telemetry

__all__ = ["ControlLoop", "MonotonicClock", "SafetyConfig", "SafetyLayer"]

log = logging.getLogger("latentrl.control")

_OBS_FAULTS = Fault.OBS_ERROR | Fault.BAD_OBS


class MonotonicClock:
    """Wall time from ``time.monotonic`` (the clock SimRobot stamps its observations with)."""

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)


@dataclass
class SafetyConfig:
    """What the safety layer enforces; ``None`` fields take the default named in their comment."""

    low: float = -1.0
    """Lower action limit (every element)."""
    high: float = 1.0
    """Upper action limit (every element)."""
    max_delta: float | None = None
    """Largest change of any action element from one sent action to the next (``None``: no limit)."""
    fallback: str | None = None
    """``"zero"`` or ``"hold"`` (the last sent action); ``None``: the robot's ``preferred_fallback``."""
    max_obs_age_s: float | None = None
    """An observation older than this is stale (``None``: two periods)."""
    stale_fallback: str | None = "hold"
    """Sent on a tick whose only fault is a stale observation (the camera and the loop drifting in phase
    repeat a frame now and then): ``"hold"`` the last sent action, ``"zero"``, or ``None``: ``fallback``."""
    max_consecutive_faults: int = 5
    """Faulty ticks in a row that latch the e-stop (0: never)."""
    estop_action: tuple[float, ...] | None = None
    """Sent under an e-stop (``None``: zeros)."""
    estop_category: int = 1
    """1: stop the run (then disconnect); 2: keep sending the e-stop action until ``resume()``."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"SafetyConfig needs finite limits low < high, got [{self.low}, {self.high}]")
        if self.max_delta is not None and not self.max_delta > 0:
            raise ValueError(f"SafetyConfig.max_delta must be > 0 or None, got {self.max_delta}")
        for name in ("fallback", "stale_fallback"):
            if getattr(self, name) not in (None, "zero", "hold"):
                raise ValueError(f"SafetyConfig.{name} must be 'zero', 'hold' or None, got {getattr(self, name)!r}")
        if self.estop_category not in (1, 2):
            raise ValueError(f"SafetyConfig.estop_category must be 1 or 2, got {self.estop_category}")


class SafetyLayer:
    """Turns the policy's raw action (or its absence) into an action that is safe to send."""

    def __init__(self, config: SafetyConfig, action_dim: int, fallback: str = "zero"):
        self.config, self.action_dim = config, int(action_dim)
        self.fallback_mode = config.fallback or fallback
        self.zero = torch.zeros(self.action_dim).clamp(config.low, config.high)
        self.last_sent = self.zero.clone()
        estop = torch.zeros(self.action_dim) if config.estop_action is None else torch.tensor(
            config.estop_action, dtype=torch.float32).reshape(-1)
        if estop.shape[0] != self.action_dim:
            raise ValueError(f"SafetyConfig.estop_action has {estop.shape[0]} values, the robot takes "
                             f"{self.action_dim}")
        self.estop_action = self.guard(estop)

    def filter(self, raw: Tensor) -> tuple[Tensor, bool, bool]:
        """``raw`` (finite, ``[A]``) clipped to the limits and rate-limited; also whether each changed it."""
        cfg = self.config
        clipped = raw.clamp(cfg.low, cfg.high)
        was_clipped = bool((clipped != raw).any())
        action, was_limited = clipped, False
        if cfg.max_delta is not None:
            delta = (clipped - self.last_sent).clamp(-cfg.max_delta, cfg.max_delta)
            action = self.last_sent + delta
            was_limited = bool((action != clipped).any())
        return action, was_clipped, was_limited

    def fallback(self, stale_only: bool = False) -> Tensor:
        """What to send without a good action: zeros, or the last sent action (``hold``); ``stale_only``: the
        tick's only fault is a stale observation (``SafetyConfig.stale_fallback``)."""
        mode = (self.config.stale_fallback or self.fallback_mode) if stale_only else self.fallback_mode
        return self.last_sent.clone() if mode == "hold" else self.zero.clone()

    def guard(self, action: Tensor) -> Tensor:
        """The last check before the robot: float32 ``[A]``, finite, in the limits; anything else becomes
        the zero action (never reached when the layer above works; it is the invariant's backstop)."""
        action = torch.as_tensor(action, dtype=torch.float32).detach().reshape(-1).cpu()
        if action.shape[0] != self.action_dim or not bool(torch.isfinite(action).all()):
            return self.zero.clone()
        return action.clamp(self.config.low, self.config.high)


class ControlLoop:
    """``policy`` driving ``robot`` at ``rate_hz`` (see the module docstring).

    Args:
        robot: anything with the :class:`~latentrl.control.robot.Robot` protocol; connected by
            :meth:`run` when it is not yet.
        policy: a ``Policy`` (``init_carry`` / ``step``) or an exported one (``OnnxPolicy``).
        rate_hz: ticks per second.
        safety: the :class:`SafetyConfig`.
        recorder: a :class:`~latentrl.control.recorder.Recorder`; every tick with an observation is
            recorded and the dataset saved at the end of :meth:`run`.
        clock: ``now()`` / ``sleep_until(t)``; a fake clock makes the loop deterministic in tests.
        deadline_s: the action must be ready this long after the tick starts (default 0.8 / rate_hz).
        out_dir: where ``telemetry.csv`` / ``telemetry.json`` go at the end of :meth:`run`.
        logger: a TensorBoard ``SummaryWriter`` for the per-tick latencies and the summary.
        on_status: called about once a second with ``(telemetry, tick)`` (the live status line).
        disconnect: disconnect the robot at the end of :meth:`run` (category-1 e-stops always do).
        warmup: one untimed policy call on the first observation before the first tick.
    """

    def __init__(self, robot, policy, rate_hz: float, *, safety: SafetyConfig | None = None, recorder=None,
                 clock=None, deadline_s: float | None = None, out_dir: str | Path | None = None, logger=None,
                 on_status: Callable | None = None, disconnect: bool = True, warmup: bool = True):
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        self.robot, self.policy, self.rate_hz = robot, policy, float(rate_hz)
        self.period = 1.0 / self.rate_hz
        self.deadline_s = float(deadline_s) if deadline_s is not None else 0.8 * self.period
        self.safety_config = safety or SafetyConfig()
        self.max_obs_age_s = self.safety_config.max_obs_age_s or 2.0 * self.period
        feature = robot.action_features["action"]
        self.safety = SafetyLayer(self.safety_config, int(feature.shape[0]),
                                  getattr(robot, "preferred_fallback", "zero"))
        self.recorder, self.clock = recorder, clock or MonotonicClock()
        self.out_dir, self.logger, self.on_status = out_dir, logger, on_status
        self.disconnect_at_end, self.warmup = bool(disconnect), bool(warmup)
        keys = getattr(policy, "obs_keys", None) or ((policy.obs_key,) if getattr(policy, "obs_key", None) else ())
        self.obs_keys: tuple[str, ...] = tuple(keys)
        self.obs_features: dict[str, Feature] = dict(robot.observation_features)
        missing = [k for k in self.obs_keys if k not in self.obs_features]
        if missing:
            raise ValueError(f"the policy reads {missing} but {robot.name} observes {sorted(self.obs_features)}; "
                             "give the robot those observations (e.g. SimRobot(image_size=...)) or another model")
        self.uses_autograd = bool(getattr(policy, "uses_autograd", False))
        self._lock = threading.Lock()
        self._estop_state = "running"  # running | latched | unlatched (waiting for resume)
        self._estop_reason: str | None = None
        self._restart = False
        self.telemetry: Telemetry | None = None
        self.policy_calls = 0
        self._last_warn = -math.inf

    # ------------------------------------------------------------------------------ e-stop
    def estop(self, reason: str = "estop()") -> None:
        """Latch the emergency stop (thread-safe): from the next tick on only the e-stop action is sent."""
        with self._lock:
            if self._estop_state != "latched":
                self._estop_state, self._estop_reason = "latched", reason

    def reset_estop(self) -> None:
        """Unlatch the e-stop; the loop keeps sending the e-stop action until :meth:`resume`."""
        with self._lock:
            if self._estop_state == "latched":
                self._estop_state = "unlatched"

    def resume(self) -> None:
        """Restart the policy (``is_first=True``) after :meth:`reset_estop`."""
        with self._lock:
            if self._estop_state == "latched":
                raise RuntimeError("the e-stop is latched: reset_estop() first, then resume()")
            self._estop_state, self._restart = "running", True

    @property
    def estopped(self) -> bool:
        return self._estop_state != "running"

    # -------------------------------------------------------------------------------- pieces
    def _validate(self, obs) -> tuple[int, str | None]:
        if not isinstance(obs, TensorDict):
            return int(Fault.BAD_OBS), f"the observation is a {type(obs).__name__}, not a TensorDict"
        for key in self.obs_keys:
            if key not in obs.keys():
                return int(Fault.BAD_OBS), f"the observation has no {key!r}"
            why = self.obs_features[key].check(obs[key], key)
            if why:
                return int(Fault.BAD_OBS), why
        return 0, None

    def _stale(self, obs, now: float) -> tuple[int, str | None]:
        seq = obs.get("seq", None)
        if seq is not None:
            seq = int(seq)
            if seq <= self._last_seq:
                return int(Fault.STALE_OBS), f"seq {seq} did not advance"
        stamp = obs.get("timestamp", None)
        if stamp is not None:
            age = now - float(stamp)
            if not math.isfinite(age) or age > self.max_obs_age_s:
                return int(Fault.STALE_OBS), f"the observation is {age * 1e3:.1f} ms old"
        return 0, None

    def _policy_input(self, obs: TensorDict) -> TensorDict:
        return TensorDict({k: obs[k].unsqueeze(0) for k in self.obs_keys}, batch_size=[1])

    def _step_policy(self, obs: TensorDict, carry, is_first: bool):
        x = self._policy_input(obs)
        first = torch.tensor([is_first])
        self.policy_calls += 1
        if self.uses_autograd:
            return self.policy.step(x, carry, first)
        with torch.inference_mode():
            return self.policy.step(x, carry, first)

    def _send(self, action: Tensor) -> tuple[Tensor, int, str | None]:
        action = self.safety.guard(action)
        try:
            sent = self.robot.send_action(action)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
            return action, int(Fault.SEND_ERROR), f"send_action raised {type(err).__name__}: {err}"
        sent = self.safety.guard(sent if isinstance(sent, Tensor) else action)
        self.safety.last_sent = sent
        return sent, 0, None

    def _report(self, t: float, k: int, fault: int, why: str | None) -> None:
        names = "|".join(f.name for f in Fault if fault & int(f))
        message = f"tick {k}: {names}" + (f" ({why})" if why else "")
        self.telemetry.log(t, message)
        if t - self._last_warn >= 1.0:
            self._last_warn = t
            log.warning("control loop %s", message)

    # ----------------------------------------------------------------------------------- run
    def run(self, max_ticks: int | None = None, duration_s: float | None = None,
            episode_ticks: int | None = None) -> Telemetry:
        """Run until ``max_ticks`` ticks or ``duration_s`` seconds (or a category-1 e-stop); returns the
        telemetry (also written to ``out_dir``). ``episode_ticks`` starts a new episode (the robot's
        ``reset_episode`` if it has one, and ``is_first``) every that many ticks."""
        if max_ticks is None and duration_s is None:
            raise ValueError("give max_ticks or duration_s")
        limit = max_ticks if max_ticks is not None else math.inf
        capacity = int(min(limit, (duration_s or math.inf) * self.rate_hz + 16, 1_000_000))
        tel = self.telemetry = Telemetry(self.rate_hz, self.deadline_s, capacity=max(capacity, 16))
        robot, clock, T, D = self.robot, self.clock, self.period, self.deadline_s
        carry, is_first = None, True
        self._last_seq = -1
        consecutive = 0
        episode, episode_k = 0, 0
        try:
            if not robot.is_connected:
                robot.connect()
            carry = self.policy.init_carry(1)
            if self.warmup:
                self._warmup()
            t0 = clock.now()
            end = t0 + duration_s if duration_s is not None else math.inf
            k = 0
            last_status = t0
            while tel.n < limit:
                t_sched = t0 + k * T
                if t_sched >= end:
                    break
                clock.sleep_until(t_sched)
                ts = clock.now()
                fault, why, obs, raw = 0, None, None, None
                t_obs = t_infer = math.nan
                obs_stamp, obs_seq = math.nan, -1
                with self._lock:
                    state, restart = self._estop_state, self._restart
                    self._restart = False
                if restart:
                    is_first = True
                if state != "running":
                    fault = int(Fault.ESTOP)
                    sent, send_fault, send_why = self._send(self.safety.estop_action)
                    fault |= send_fault
                    t_sent = clock.now()
                    tel.add(k=k, t_sched=t_sched, t_start=ts, t_obs=ts, t_infer=ts, t_sent=t_sent, fault=fault,
                            episode=episode, sleep_ms=math.nan)
                    if self.recorder is not None:
                        self.recorder.add(None, sent, raw_action=None, fault=fault, loop_latency_ms=0.0,
                                          obs_age_ms=math.nan, fallback=True)
                    if self.safety_config.estop_category == 1:
                        self._report(t_sent, k, fault, f"e-stop: {self._estop_reason}; stopping (category 1)")
                        break
                    k = self._next_tick(k, t0)
                    continue
                # ---- observe
                try:
                    obs = robot.get_observation()
                except (ConnectionError, TimeoutError, RuntimeError) as err:
                    fault, why = int(Fault.OBS_ERROR), f"get_observation raised {type(err).__name__}: {err}"
                t_obs = clock.now()
                if not fault:
                    fault, why = self._validate(obs)
                if not fault:
                    obs_stamp = float(obs.get("timestamp", torch.tensor(math.nan)))
                    obs_seq = int(obs.get("seq", torch.tensor(-1)))
                    fault, why = self._stale(obs, t_obs)
                # ---- infer
                if not fault:
                    try:
                        raw, next_carry = self._step_policy(obs, carry, is_first)
                    except Exception as err:  # noqa: BLE001 - any policy failure falls back
                        fault, why = int(Fault.POLICY_ERROR), f"policy.step raised {type(err).__name__}: {err}"
                    else:
                        carry, is_first = next_carry, False
                        self._last_seq = max(self._last_seq, obs_seq)
                        raw = torch.as_tensor(raw).detach().float().reshape(-1).cpu()
                        if clock.now() > ts + D:
                            fault, why = int(Fault.DEADLINE_MISS), f"the policy took {(clock.now() - ts) * 1e3:.1f} ms"
                        if raw.shape[0] != self.safety.action_dim or not bool(torch.isfinite(raw).all()):
                            fault |= int(Fault.NONFINITE_ACTION)
                            why = f"the policy returned {raw.tolist()}"
                t_infer = clock.now()
                # ---- send
                clipped = limited = False
                if fault:
                    action = self.safety.fallback(stale_only=fault == int(Fault.STALE_OBS))
                else:
                    action, clipped, limited = self.safety.filter(raw)
                sent, send_fault, send_why = self._send(action)
                fault |= send_fault
                why = why or send_why
                t_sent = clock.now()
                if fault:
                    self._report(t_sent, k, fault, why)
                tel.add(k=k, t_sched=t_sched, t_start=ts, t_obs=t_obs, t_infer=t_infer, t_sent=t_sent,
                        obs_timestamp=obs_stamp, obs_seq=obs_seq, fault=fault, clipped=clipped, rate_limited=limited,
                        episode=episode, sleep_ms=(t_sched + T - t_sent) * 1e3)
                if self.recorder is not None:
                    usable = obs if obs is not None and not (fault & int(_OBS_FAULTS)) else None
                    self.recorder.add(usable, sent, raw_action=raw, fault=fault,
                                      loop_latency_ms=(t_sent - ts) * 1e3, obs_age_ms=(t_obs - obs_stamp) * 1e3,
                                      fallback=bool(fault))
                consecutive = consecutive + 1 if fault else 0
                limit_faults = self.safety_config.max_consecutive_faults
                if limit_faults and consecutive >= limit_faults:
                    self.estop(f"{consecutive} faulty ticks in a row (last: {why})")
                    consecutive = 0
                if self.on_status is not None and t_sent - last_status >= 1.0:
                    last_status = t_sent
                    self.on_status(tel, k)
                episode_k += 1
                if episode_ticks and episode_k >= episode_ticks:
                    episode, episode_k, is_first = episode + 1, 0, True
                    if self.recorder is not None:
                        self.recorder.end_segment()
                    reset = getattr(robot, "reset_episode", None)
                    if reset is not None:
                        before = clock.now()
                        reset()
                        t0 += clock.now() - before  # the reset is outside the timed ticks
                k = self._next_tick(k, t0)
        except KeyboardInterrupt:
            self.estop("KeyboardInterrupt (Ctrl-C)")
        finally:
            self._finish()
        return tel

    def _next_tick(self, k: int, t0: float) -> int:
        """The next tick index: the next period that has not started yet (overruns skip, never burst)."""
        due = math.floor((self.clock.now() - t0) / self.period) + 1
        nxt = max(k + 1, due)
        self.telemetry.missed_ticks += nxt - k - 1
        if nxt > k + 1 and self.telemetry.n:
            self.telemetry._cols["skipped"][self.telemetry.n - 1] = nxt - k - 1
        return nxt

    def _warmup(self) -> None:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                obs = self.robot.get_observation()
            except (ConnectionError, TimeoutError, RuntimeError):
                time.sleep(0.01)
                continue
            if self._validate(obs)[0]:
                time.sleep(0.01)
                continue
            try:
                self._step_policy(obs, self.policy.init_carry(1), True)
            except Exception:  # noqa: BLE001 - the timed ticks report policy failures
                pass
            self.policy_calls = 0
            return

    def _finish(self) -> None:
        tel = self.telemetry
        tel.estop_reason = self._estop_reason
        try:
            if self.robot.is_connected:
                self._send(self.safety.estop_action if self.estopped else self.safety.fallback())
        finally:
            if self.disconnect_at_end or (self.estopped and self.safety_config.estop_category == 1):
                try:
                    self.robot.disconnect()
                except Exception as err:  # noqa: BLE001 - report, keep writing the records
                    log.warning("disconnect raised %s: %s", type(err).__name__, err)
            if self.recorder is not None and self.recorder.num_steps + len(self.recorder._rows) > 0:
                self.recorder.save(overwrite=True)
            if self.out_dir is not None:
                tel.write(self.out_dir, logger=self.logger)
            elif self.logger is not None:
                tel.to_tensorboard(self.logger)
