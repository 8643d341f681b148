"""The progress of a long command on stderr, phase by phase, each phase in its own unit (tqdm).

A phase is one stretch of work with its own unit: a graph trace (no unit: its elapsed time), weights
(bytes), calibration samples. On a terminal each phase is a tqdm bar, redrawn every second (so the
elapsed time moves during a phase that reports nothing until it ends, a graph trace, except while
native code holds Python's lock: MindSpore's tracing does for up to minutes) and left on screen when
done. Elsewhere (CI logs, `2>file`) each phase writes one line when it ends, and never a carriage
return. Each phase shows the time left ("~12:30 left"): a command that can estimate its whole
remaining time passes `eta`, shown instead of the phase's own (which would say nothing of the phases
still to come); otherwise a counted phase's own, at its mean rate.
"""
import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

REDRAW_S = 1.0   # how often a terminal bar is redrawn between updates
TIMED = "{desc} [{elapsed}{postfix}]"                                        # a phase without a count
COUNTED_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
COUNTED_LINE = "{desc}: {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def duration(seconds: float) -> str:
    """Seconds as [H:]MM:SS, as tqdm shows them."""
    return tqdm.format_interval(max(0.0, seconds))


def size(nbytes: float) -> str:
    """Bytes with an SI prefix, as tqdm shows them (1.36MB)."""
    return tqdm.format_sizeof(nbytes, "B")


class Phase:
    """One phase: `update(n)` counts its progress; `n` and `elapsed` (seconds; fixed once it ends) are what it
    has done so far, `updated` the elapsed seconds at its last update."""

    def __init__(self, progress: "Progress", desc: str, total, unit: str, unit_scale: bool):
        self.progress, self.desc, self.total, self.unit, self.unit_scale = progress, desc, total, unit, unit_scale
        self.n, self.start, self.end, self.updated = 0, time.perf_counter(), None, 0.0
        self.bar = None
        if progress.terminal:
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=progress.file,
                            bar_format=COUNTED_BAR if total else TIMED, smoothing=0, dynamic_ncols=True,
                            mininterval=REDRAW_S / 4)
            self.bar.set_postfix_str(progress.eta_text(self), refresh=True)

    @property
    def elapsed(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    def update(self, n: int = 1):
        self.n += n
        self.updated = self.elapsed
        if self.bar is not None:
            self.bar.update(n)

    def left(self) -> float | None:
        """Seconds this phase has left at its mean rate so far (None: uncounted, or nothing counted yet)."""
        return (self.total - self.n) * self.elapsed / self.n if self.total and self.n else None

    def redraw(self):
        if self.bar is not None:
            self.bar.set_postfix_str(self.progress.eta_text(self), refresh=True)

    def close(self):
        """End the phase: the bar stays on screen, or its one line is written."""
        self.end = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(self.progress.eta_text(self), refresh=False)
            self.bar.close()
        elif self.progress.enabled:
            line = tqdm.format_meter(self.n, self.total, self.elapsed, prefix=self.desc, unit=self.unit,
                                     unit_scale=self.unit_scale, postfix=self.progress.eta_text(self),
                                     bar_format=COUNTED_LINE if self.total else TIMED)
            print(line, file=self.progress.file, flush=True)


class Progress:
    """Phases of one command on `file` (default stderr). enabled=False: nothing is shown (library calls,
    tests). `eta`: (Progress) -> seconds the whole command has left, or None while unknown, from the phase
    running (`current`) and those ended (`done`); shown with each phase."""

    def __init__(self, enabled: bool = True, file=None, eta=None):
        self.file = file or sys.stderr
        self.enabled = enabled
        self.terminal = enabled and self.file.isatty()
        self.eta = eta
        self.current, self.done = None, []

    def note(self, text: str):
        """A line of its own, e.g. the plan before the first phase."""
        if self.enabled:
            tqdm.write(text, file=self.file)

    def eta_text(self, phase: Phase) -> str:
        """What is left, shown with `phase`: the command's `eta`, or else the phase's own."""
        left = self.eta(self) if self.eta is not None else phase.left()
        return "" if left is None else f"~{duration(left)} left"

    @contextmanager
    def phase(self, desc: str, total: int | None = None, unit: str = "it", unit_scale: bool = False):
        """A phase of `total` units (None: timed only) -> the Phase to `update`; its end is shown when the block
        leaves, normally or not."""
        p = Phase(self, desc, total, unit, unit_scale)
        self.current = p
        stop = threading.Event()

        def redraw():   # the elapsed time and the ETA move while the work reports nothing
            while not stop.wait(REDRAW_S):
                p.redraw()
        redrawer = threading.Thread(target=redraw, daemon=True)
        if p.bar is not None:
            redrawer.start()
        try:
            yield p
        finally:
            stop.set()
            if redrawer.is_alive():
                redrawer.join()
            self.current = None
            self.done.append(p)
            p.close()

    def track(self, items, desc: str, unit: str = "it"):
        """Iterate `items` (a sized collection) as one phase counted in `unit`s."""
        with self.phase(desc, total=len(items), unit=unit) as p:
            for item in items:
                yield item
                p.update(1)
