"""The controller's rules, as pure functions of measurements (tested alone).

CPU (scale up/down).  Between two looks at a container's cgroup, the share of
CPU periods in which it was throttled says whether its quota holds it back:
    throttled share >= scale_up_share   -> quota x scale_step, up to the spec's max
    no throttling for scale_down_after_s and quota above the spec's base
                                        -> quota / scale_step, not below the base
Memory follows the same pattern on usage / limit >= memory_high.

Instances (scale out/in).  Open sessions per running instance of a domain's
service:
    average >= scale_out_sessions and fewer than max_instances -> one more
    more than one instance, total below scale_out_sessions / 4 for
    scale_in_after_s                                           -> drain the newest

Adaptive limits.  A limit with a range moves towards
    floor + (ceiling - floor) x headroom x (1 - reject_ratio)
where headroom is 1 - the host's busiest resource share (CPU load per core,
memory in use), smoothed over rounds (HEADROOM_SMOOTHING: the load average
of one busy minute is not the host's state), and reject_ratio the domain's
share of refused messages in the last 15 minutes.  The move is damped
(damped_step):
    bounded step    at most ADAPTIVE_MAX_STEP (a tenth) of the range per round
    dead band       a target within ADAPTIVE_DEAD_BAND (a twentieth of the
                    range) of the value: no move
    hysteresis      after moving one way, the value turns only once the
                    target has pointed the other way (beyond the dead band)
                    ADAPTIVE_REVERSE_AFTER rounds in a row
so a value that swung 2993 -> 2033 -> 1224 -> 2184 in four rounds now moves
at most a tenth of its range a round and does not turn on one noisy round.
The figures (target, bound, dead band, direction, rounds against) go into
the limit_change event.  Fixed limits never move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CpuSample:
    nr_periods: int
    nr_throttled: int


def throttled_share(before: CpuSample, after: CpuSample) -> float:
    periods = after.nr_periods - before.nr_periods
    if periods <= 0:
        return 0.0
    return max(0, after.nr_throttled - before.nr_throttled) / periods


def scaled_up(current: int, most: int, step: float) -> int | None:
    """The next quota up, or None when already at the maximum."""
    if current >= most:
        return None
    return min(most, max(current + 1, int(current * step)))


def scaled_down(current: int, base: int, step: float) -> int | None:
    if current <= base:
        return None
    return max(base, int(current / step))


def wants_scale_out(open_sessions: list[int], threshold: int, max_instances: int) -> bool:
    if not open_sessions or len(open_sessions) >= max_instances:
        return False
    return sum(open_sessions) / len(open_sessions) >= threshold


def quiet_enough_to_scale_in(open_sessions: list[int], threshold: int) -> bool:
    return len(open_sessions) > 1 and sum(open_sessions) < max(1, threshold // 4)


def adaptive_target(floor: int, ceiling: int, headroom: float, reject_ratio: float) -> int:
    headroom = min(1.0, max(0.0, headroom))
    reject_ratio = min(1.0, max(0.0, reject_ratio))
    return round(floor + (ceiling - floor) * headroom * (1.0 - reject_ratio))


HEADROOM_SMOOTHING = 0.3       # weight of the newest headroom sample
ADAPTIVE_MAX_STEP = 0.1        # of the range, per round
ADAPTIVE_DEAD_BAND = 0.05      # of the range
ADAPTIVE_REVERSE_AFTER = 2     # rounds the target must point the other way


def smoothed(previous: float | None, sample: float,
             weight: float = HEADROOM_SMOOTHING) -> float:
    """Exponentially weighted mean: the first sample as it is, then a blend."""
    if previous is None:
        return sample
    return previous + weight * (sample - previous)


@dataclass(frozen=True)
class Trend:
    """What damped_step remembers of one limit between rounds."""
    direction: int = 0      # +1: last moved up, -1: down, 0: has not moved
    against: int = 0        # rounds in a row the target pointed the other way


@dataclass(frozen=True)
class AdaptiveMove:
    value: int              # the new value (== current when held)
    target: int
    step_bound: int
    dead_band: int
    trend: Trend
    held: str | None        # why it did not move, or None

    def figures(self) -> dict[str, Any]:
        """For the limit_change event's detail."""
        return {"target": self.target, "step_bound": self.step_bound,
                "dead_band": self.dead_band, "direction": self.trend.direction,
                "rounds_against": self.trend.against}


def damped_step(current: int, target: int, floor: int, ceiling: int,
                trend: Trend = Trend(), *, max_step: float = ADAPTIVE_MAX_STEP,
                dead_band: float = ADAPTIVE_DEAD_BAND,
                reverse_after: int = ADAPTIVE_REVERSE_AFTER) -> AdaptiveMove:
    """One damped move from `current` towards `target`, always inside the range."""
    span = max(0, ceiling - floor)
    bound = max(1, round(span * max_step))
    band = round(span * dead_band)
    target = min(ceiling, max(floor, target))
    inside = min(ceiling, max(floor, current))
    gap = target - inside
    if abs(gap) <= band:
        # Close enough: hold, and a reversal that was building up starts over.
        return AdaptiveMove(inside, target, bound, band, Trend(trend.direction, 0),
                            None if inside != current else "within the dead band")
    direction = 1 if gap > 0 else -1
    if trend.direction and direction != trend.direction:
        against = trend.against + 1
        if against < reverse_after:
            return AdaptiveMove(inside, target, bound, band, Trend(trend.direction, against),
                                f"turning waits ({against} of {reverse_after} rounds)")
    value = inside + max(-bound, min(bound, gap))
    return AdaptiveMove(value, target, bound, band, Trend(direction, 0), None)
