"""Whether a process's batches overlap, decided from the throughput it measures.

A worker holds two batches so that one decodes, builds maps and writes while the other runs
inference. That pays when the host work is light next to inference and the cores are not
all taken by onnxruntime's threads (JPEGs decoded at reduced size: +8%), and costs when it is
heavy (PNGs on 2 cores: onnxruntime's parallel regions stall whenever a decode takes one of
its cores; inference became 21% slower). Which case a run is in depends on the image format,
the model, the outputs and the machine's other load, so the process measures it: it runs a
few batches one at a time, a few overlapped, keeps the faster mode, and measures again now
and then. One batch at a time is the starting mode and the choice when the two are within
`margin`, so overlapping can only be chosen where it was measured to be faster. The probes
themselves cost when overlapping is the slower mode (4.6% of an 8-batch run of PNGs with full
attention, docs/PERFORMANCE.md): a run that is known to be short (`expect`) does not probe
and runs one batch at a time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

SERIAL, OVERLAP = "serial", "overlap"
# Fewer batches than this in a run: its probes (about 8 batches) would be a large part of it,
# and the overlapped ones cost where overlapping is slower; one batch at a time throughout.
MIN_BATCHES_TO_PROBE = 16


class OverlapGate:
    """Lets batches of one process overlap, or runs them one at a time, by measured throughput.

    Args:
        window: completed batches per measurement of one mode.
        recheck: batches run in the chosen mode before both are measured again.
        margin: how much faster (relative) overlapping must be to be chosen.
        clock: seconds, monotonic.
        fixed: SERIAL or OVERLAP to keep one mode and measure nothing (benchmarks compare them).
    """

    def __init__(
        self,
        window: int = 3,
        recheck: int = 30,
        margin: float = 0.02,
        clock: Callable[[], float] = time.perf_counter,
        fixed: str | None = None,
    ) -> None:
        if fixed not in (None, SERIAL, OVERLAP):
            raise ValueError(f"fixed must be None, {SERIAL!r} or {OVERLAP!r}, got {fixed!r}")
        self.window, self.recheck, self.margin, self.clock = window, recheck, margin, clock
        self._serial = threading.Lock()  # held for a whole batch in serial mode
        self._state = threading.Lock()
        self.mode = SERIAL
        self.chosen: str | None = None  # the mode kept after the last comparison
        self.rates: dict[str, float] = {}  # images/s of the last measurement of each mode
        self.fixed = fixed
        if fixed is not None:
            self.mode = self.chosen = fixed
        self._plan: list[str] = [] if fixed else [SERIAL, OVERLAP]  # modes still to measure
        self._settled = 0  # batches finished in the chosen mode since the comparison
        self._recheck_on = True  # off for a run too short to repay a comparison
        self._skip = 1  # completions to ignore: the first batch builds the session
        self._mark: float | None = None
        self._count = self._images = 0

    def expect(self, batches: int) -> None:
        """A run of `batches` batches starts in this process: measure anew, or, for a run too
        short to repay its probes, run it one batch at a time."""
        if self.fixed is not None:
            return
        with self._state:
            self.mode = SERIAL
            self.rates = {}
            self._settled = 0
            self._skip = 1
            self._start_window(self.clock())
            self._recheck_on = batches >= MIN_BATCHES_TO_PROBE
            if self._recheck_on:
                self.chosen, self._plan = None, [SERIAL, OVERLAP]
            else:
                self.chosen, self._plan = SERIAL, []

    @contextlib.contextmanager
    def batch(self, n_images: int) -> Iterator[str]:
        """Run one batch under the current mode; yields the mode it ran in."""
        with self._state:
            mode = self.mode
        if mode == SERIAL:
            with self._serial:
                yield mode
        else:
            yield mode
        self._finished(mode, n_images)

    def _finished(self, mode: str, n_images: int) -> None:
        if self.fixed is not None:
            return
        with self._state:
            if mode != self.mode:
                return  # a batch that started before the last switch: not part of any window
            now = self.clock()
            if self._skip:
                self._skip -= 1
                self._mark = now
                return
            if not self._plan:  # running the chosen mode
                self._settled += 1
                if self._recheck_on and self._settled >= self.recheck:
                    self._plan = [self.mode, OVERLAP if self.mode == SERIAL else SERIAL]
                    self._start_window(now)
                return
            self._count += 1
            self._images += n_images
            if self._count < self.window or self._mark is None:
                return
            self.rates[mode] = self._images / max(now - self._mark, 1e-9)
            self._plan.pop(0)
            if self._plan:
                self._switch(self._plan[0], now)
            else:
                best = (
                    OVERLAP
                    if self.rates[OVERLAP] > self.rates[SERIAL] * (1 + self.margin)
                    else SERIAL
                )
                self.chosen = best
                self._settled = 0
                self._switch(best, now)

    def _switch(self, mode: str, now: float) -> None:
        changed = mode != self.mode
        self.mode = mode
        self._start_window(now)
        # The first completion in a new mode still carries the old mode's pipeline: skip it.
        self._skip = 1 if changed else 0

    def _start_window(self, now: float) -> None:
        self._mark, self._count, self._images = now, 0, 0
