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
    assert decisions.adaptive_step(10, 110, 10, 110) == 30      # a fifth of the range
    assert decisions.adaptive_step(100, 10, 10, 110) == 80
    assert decisions.adaptive_step(105, 200, 10, 110) == 110    # never outside


def test_host_headroom_is_a_share() -> None:
    assert 0.0 <= host_headroom() <= 1.0
