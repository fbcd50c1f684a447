"""The overlap gate: one batch at a time unless overlapping was measured to be faster."""

from __future__ import annotations

import threading
import time

import pytest

from vit_attn.overlap import OVERLAP, SERIAL, OverlapGate


class Clock:
    """Time that moves only when a simulated batch says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(gate: OverlapGate, clock: Clock, seconds: dict[str, float], batches: int) -> list[str]:
    """Run batches one after another; each takes `seconds[mode]` of simulated time."""
    modes = []
    for _ in range(batches):
        with gate.batch(10) as mode:
            clock.now += seconds[mode]
        modes.append(mode)
    return modes


def test_starts_serial_and_keeps_overlap_only_when_measured_faster():
    clock = Clock()
    gate = OverlapGate(window=3, recheck=100, clock=clock)
    modes = drive(gate, clock, {SERIAL: 1.0, OVERLAP: 0.8}, 12)
    # first batch (session start) and 3 serial, then 1 skipped + 3 overlapped, then the choice
    assert modes[:4] == [SERIAL] * 4 and modes[4:8] == [OVERLAP] * 4
    assert gate.chosen == OVERLAP and modes[8:] == [OVERLAP] * 4
    assert gate.rates[SERIAL] == pytest.approx(10.0) and gate.rates[OVERLAP] == pytest.approx(12.5)


@pytest.mark.parametrize("overlap_seconds", [1.2, 1.0, 0.99])  # slower, equal, within margin
def test_overlap_that_does_not_pay_is_dropped(overlap_seconds):
    clock = Clock()
    gate = OverlapGate(window=3, recheck=100, margin=0.02, clock=clock)
    modes = drive(gate, clock, {SERIAL: 1.0, OVERLAP: overlap_seconds}, 14)
    assert gate.chosen == SERIAL and modes[-5:] == [SERIAL] * 5


def test_measures_again_after_recheck_batches():
    clock = Clock()
    gate = OverlapGate(window=2, recheck=4, clock=clock)
    seconds = {SERIAL: 1.0, OVERLAP: 0.5}
    drive(gate, clock, seconds, 7)  # 1 + 2 serial + 1 skip + 2 overlap, then the choice
    assert gate.chosen == OVERLAP
    seconds[OVERLAP] = 2.0  # the machine got busy: overlapping now costs
    modes = drive(gate, clock, seconds, 4 + 2 + 1 + 2 + 3)
    assert gate.chosen == SERIAL and modes[-3:] == [SERIAL] * 3


def test_serial_mode_runs_one_batch_at_a_time_and_overlap_lets_two_run():
    def max_concurrency(gate: OverlapGate) -> int:
        active, peak, lock = [0], [0], threading.Lock()

        def one() -> None:
            with gate.batch(1):
                with lock:
                    active[0] += 1
                    peak[0] = max(peak[0], active[0])
                time.sleep(0.05)
                with lock:
                    active[0] -= 1

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return peak[0]

    assert max_concurrency(OverlapGate(fixed=SERIAL)) == 1
    assert max_concurrency(OverlapGate(fixed=OVERLAP)) >= 2
    assert max_concurrency(OverlapGate()) == 1  # measuring starts with one at a time


def test_a_failing_batch_releases_the_gate():
    gate = OverlapGate(fixed=SERIAL)
    with pytest.raises(RuntimeError):
        with gate.batch(1):
            raise RuntimeError("decode blew up")
    with gate.batch(1) as mode:  # would deadlock if the lock were still held
        assert mode == SERIAL
    with pytest.raises(ValueError, match="fixed must be"):
        OverlapGate(fixed="sometimes")


def test_a_run_too_short_to_repay_its_probes_runs_one_batch_at_a_time():
    # An 8-batch run spent 6 batches on probes; where overlapping was the slower mode (PNGs
    # with full attention) that left the whole run 4.6% under one batch at a time.
    from vit_attn.overlap import MIN_BATCHES_TO_PROBE

    clock = Clock()
    gate = OverlapGate(window=3, recheck=4, clock=clock)
    short = MIN_BATCHES_TO_PROBE - 1
    gate.expect(short)
    modes = drive(gate, clock, {SERIAL: 1.0, OVERLAP: 2.0}, short)
    assert modes == [SERIAL] * short and gate.chosen == SERIAL
    # The next run in this process is long: it measures, and keeps what pays.
    gate.expect(100)
    modes = drive(gate, clock, {SERIAL: 1.0, OVERLAP: 0.5}, 12)
    assert OVERLAP in modes[:8] and gate.chosen == OVERLAP and modes[-3:] == [OVERLAP] * 3
    fixed = OverlapGate(fixed=OVERLAP)
    fixed.expect(1)  # benchmarks that fix a mode keep it
    assert fixed.mode == OVERLAP
