"""The controller's rules as pure functions."""

from __future__ import annotations

from mailfc.controller import decisions
from mailfc.controller.controller import host_headroom


def test_throttled_share() -> None:
    before = decisions.CpuSample(nr_periods=100, nr_throttled=10)
    assert decisions.throttled_share(before, decisions.CpuSample(200, 60)) == 0.5
    assert decisions.throttled_share(before, before) == 0.0


def test_cpu_steps_stay_between_base_and_max() -> None:
    assert decisions.scaled_up(50_000, 200_000, 1.5) == 75_000
    assert decisions.scaled_up(180_000, 200_000, 1.5) == 200_000
    assert decisions.scaled_up(200_000, 200_000, 1.5) is None
    assert decisions.scaled_down(75_000, 50_000, 1.5) == 50_000
    assert decisions.scaled_down(50_000, 50_000, 1.5) is None


def test_scale_out_and_in() -> None:
    assert decisions.wants_scale_out([50], 50, 2)
    assert not decisions.wants_scale_out([49], 50, 2)
    assert not decisions.wants_scale_out([80, 80], 50, 2)  # at max_instances
    assert decisions.quiet_enough_to_scale_in([3, 2], 50)
    assert not decisions.quiet_enough_to_scale_in([3], 50)  # never below one
    assert not decisions.quiet_enough_to_scale_in([20, 20], 50)


def test_adaptive_target_and_step() -> None:
    assert decisions.adaptive_target(10, 110, 1.0, 0.0) == 110
    assert decisions.adaptive_target(10, 110, 0.5, 0.0) == 60
    assert decisions.adaptive_target(10, 110, 1.0, 1.0) == 10
    assert decisions.adaptive_target(10, 110, 7.0, -3.0) == 110  # clamped inputs
    assert decisions.damped_step(10, 110, 10, 110).value == 20    # a tenth of the range
    assert decisions.damped_step(100, 10, 10, 110).value == 90
    assert decisions.damped_step(100, 200, 10, 110).value == 110  # never outside
    assert decisions.damped_step(500, 200, 10, 110).value == 110


def test_host_headroom_is_a_share() -> None:
    assert 0.0 <= host_headroom() <= 1.0


def test_damped_step_bounds_the_step_and_has_a_dead_band() -> None:
    # The range of the swing seen on the test platform: 1000..5000.
    move = decisions.damped_step(2993, 1224, 1000, 5000)
    assert move.value == 2593 and move.step_bound == 400 and move.held is None
    assert move.trend == decisions.Trend(-1, 0)
    held = decisions.damped_step(3000, 3150, 1000, 5000)       # within 200 (5 %)
    assert held.value == 3000 and held.held == "within the dead band"
    assert held.figures()["dead_band"] == 200


def test_damped_step_turns_only_after_the_target_stays_on_the_other_side() -> None:
    falling = decisions.Trend(-1, 0)
    first = decisions.damped_step(2000, 3000, 1000, 5000, falling)
    assert first.value == 2000 and first.held == "turning waits (1 of 2 rounds)"
    second = decisions.damped_step(2000, 3000, 1000, 5000, first.trend)
    assert second.value == 2400 and second.trend == decisions.Trend(1, 0)
    # One noisy round the other way, then back: never turns.
    blip = decisions.damped_step(2000, 3000, 1000, 5000, falling)
    back = decisions.damped_step(2000, 1500, 1000, 5000, blip.trend)
    assert back.value == 1600 and back.trend == decisions.Trend(-1, 0)


def test_the_swing_seen_on_the_platform_is_damped() -> None:
    """Targets that swing as the reported values did: the value moves at most a
    tenth of the range a round, and one round against does not turn it."""
    targets = [2033, 1224, 2184, 2978, 1300, 2900, 1200, 3000]
    value, trend, values = 2993, decisions.Trend(), []
    for target in targets:
        move = decisions.damped_step(value, target, 1000, 5000, trend)
        assert abs(move.value - value) <= 400
        value, trend = move.value, move.trend
        values.append(value)
    turns = sum(1 for a, b, c in zip(values, values[1:], values[2:], strict=False)
                if (b - a) * (c - b) < 0)
    assert turns <= 1, values
    assert max(values) - min(values) <= 1200, values


def test_headroom_is_smoothed() -> None:
    assert decisions.smoothed(None, 0.8) == 0.8
    assert abs(decisions.smoothed(0.8, 0.2) - 0.62) < 1e-9
