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
memory in use) and reject_ratio the domain's share of refused messages in the
last 15 minutes; each step moves at most a fifth of the range, so one noisy
minute does not swing it.  Fixed limits never move.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def adaptive_step(current: int, target: int, floor: int, ceiling: int) -> int:
    """One bounded move from `current` towards `target`, always inside the range."""
    largest = max(1, (ceiling - floor) // 5)
    move = max(-largest, min(largest, target - current))
    return min(ceiling, max(floor, current + move))
