"""A stage's progress as a whole (the tune and train stages, `pipeline.execute.run_stage`):
how many of the runs it runs now are done, running, queued and failed, and when it should
end.

The executor says what its runs do (`RunEvents`: started, a line of output, ended; from any
thread). The ETA comes from the step lines the runs print (`pipeline.contract.parse_step`),
timed on arrival here:

- a running run: the steps it has left (its line's total) at its own seconds per step (the
  time between two of its step lines over the steps between them), less the time since its
  latest step line;
- a queued run: its spec's iterations at the mean seconds per step of the runs measured so far
  of its configuration (dataset, architecture, batch size), or of every run measured when
  none of its configuration is (a running run not measured yet is counted the same way);
- the runs laid out on the executor's slots (its `max_parallel`, asked each time: an executor
  may settle it only once it starts, e.g. the local one by the GPUs its runs get): the running
  ones first, then each queued run in the slot that frees first, in the order the executor
  was given them.

Before any step time is measured the ETA is "?": never a number made up. Time to start a run
(a pod scheduled, its data staged) is not counted.

What it prints: on a terminal, one line that updates (tqdm), with the executor's own lines
written above it; in a log (`dvc repro` piped, CI), a plain line whenever a run ends and
otherwise at most every `interval` seconds (a minute), when a run says something.
"""

import heapq
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from .contract import parse_step
from .executors.base import RunEvents, RunOutcome
from .run_log import hms

INTERVAL = 60.0  # seconds between two plain progress lines, run ends aside
REDRAW = 1.0  # seconds between two redraws of the terminal's progress line


class SystemClock:
    """Real time. A test gives a clock of its own (anything with `monotonic()`)."""

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass
class _Run:
    spec: dict
    state: str = "queued"  # running, done, failed
    step: int | None = None  # from its latest step line
    total: int | None = None
    seen_at: float | None = None  # when its latest step line came
    base: tuple[float, int] | None = None  # (time, step) its rate is measured from
    seconds_per_step: float | None = None

    @property
    def configuration(self) -> tuple:
        spec = self.spec
        return spec.get("dataset"), spec.get("arch"), spec.get("batch_size")

    @property
    def iterations(self) -> int | None:
        return (self.spec.get("schedule") or {}).get("iterations")


class StageProgress(RunEvents):
    """The progress of `specs`, the runs a stage runs now (`done_before`: how many of its runs
    were finished before); `slots()` says how many runs the executor runs at once (None: all
    at once; default one). Lines go to `out` (default stdout), a terminal's updating line
    when `tty` (default: whether `out` is one). `stream` is what the executor should print
    through; `close()` when done."""

    def __init__(
        self,
        stage: str,
        specs: list[dict],
        *,
        done_before: int = 0,
        slots: Callable[[], int | None] = lambda: 1,
        out=None,
        tty: bool | None = None,
        clock=None,
        interval: float = INTERVAL,
    ):
        self.stage = stage
        self._runs = {s["name"]: _Run(s) for s in specs}
        self.done_before = done_before
        self.slots = slots
        self.out = out or sys.stdout
        self.tty = _isatty(self.out) if tty is None else tty
        self.clock = clock or SystemClock()
        self.interval = interval
        self._lock = threading.RLock()
        self._last_line = self.clock.monotonic()
        self._last_draw = None
        self._bar = None
        self.stream = _Lines(self)

    # -- RunEvents: what the executor says, from any thread -----------------------------------

    def run_started(self, name: str, where: str | None = None) -> None:
        with self._lock:
            run = self._runs.get(name)
            if run is not None and run.state == "queued":
                run.state = "running"
                self._show()

    def run_output(self, name: str, line: str) -> None:
        step = parse_step(line)
        with self._lock:
            run = self._runs.get(name)
            if run is None or run.state in ("done", "failed"):
                return
            run.state = "running"  # an executor that does not say when a run starts
            if step is not None:
                self._measure(run, *step)
            self._show()

    def run_ended(self, outcome: RunOutcome) -> None:
        with self._lock:
            run = self._runs.get(outcome.name)
            if run is not None:
                run.state = "done" if outcome.ok else "failed"
                self._show(ended=True)

    def close(self) -> None:
        with self._lock:
            self.stream.flush_partial()
            if self._bar is not None:
                self._draw()
                self._bar.close()
                self._bar = None

    # -- what it knows --------------------------------------------------------------------------

    def _measure(self, run: _Run, step: int, total: int) -> None:
        now = self.clock.monotonic()
        if step == run.step:
            return  # the same line read again (the Kubernetes executor reads the last one)
        if run.base is None or run.step is None or step < run.step:
            # Its first step line, or a restart from its checkpoint (a new pod): the rate
            # is measured anew from here; the one measured before counts until then.
            run.base = (now, step)
        elif now > run.base[0]:
            run.seconds_per_step = (now - run.base[0]) / (step - run.base[1])
        run.step, run.total, run.seen_at = step, total, now

    def counts(self) -> dict:
        with self._lock:
            counts = dict.fromkeys(("done", "running", "queued", "failed"), 0)
            for run in self._runs.values():
                counts[run.state] += 1
            return counts

    def eta(self) -> float | None:
        """Seconds until every run has ended, from the step times measured so far (module
        docstring); None before any is measured, or where a run's steps are unknown."""
        with self._lock:
            runs = list(self._runs.values())
            measured = [r for r in runs if r.seconds_per_step is not None]
            if not measured:
                return None
            overall = statistics.fmean(r.seconds_per_step for r in measured)
            by_configuration = {}
            for r in measured:
                by_configuration.setdefault(r.configuration, []).append(r.seconds_per_step)

            def rate(run):
                if run.seconds_per_step is not None:
                    return run.seconds_per_step
                same = by_configuration.get(run.configuration)
                return statistics.fmean(same) if same else overall

            now = self.clock.monotonic()
            running, queued = [], []
            for run in runs:
                total = run.total or run.iterations
                if run.state in ("done", "failed"):
                    continue
                if total is None:
                    return None
                if run.state == "queued":
                    queued.append(total * rate(run))
                    continue
                left = (total - (run.step or 0)) * rate(run)
                if run.seen_at is not None:
                    left -= now - run.seen_at
                running.append(max(0.0, left))
            slots = self.slots() or len(running) + len(queued)
            ends = running + [0.0] * max(0, slots - len(running))
            heapq.heapify(ends)
            for seconds in queued:
                heapq.heappush(ends, heapq.heappop(ends) + seconds)
            return max(ends, default=0.0)

    def line(self) -> str:
        """The stage's progress in one line."""
        with self._lock:
            c = self.counts()
            text = (
                f"{self.stage}: {c['done']} done, {c['running']} running, {c['queued']} "
                f"queued, {c['failed']} failed of {len(self._runs)}"
            )
            if self.done_before:
                text += f" ({self.done_before} done before)"
            if c["running"] or c["queued"]:
                eta = self.eta()
                text += f"; ETA {'?' if eta is None else hms(eta)}"
            return text

    # -- what it prints --------------------------------------------------------------------------

    def _show(self, ended: bool = False) -> None:
        now = self.clock.monotonic()
        if self.tty:
            if ended or self._last_draw is None or now - self._last_draw >= REDRAW:
                self._draw()
            return
        if ended or now - self._last_line >= self.interval:
            self._last_line = now
            self.out.write(self.line() + "\n")
            self.out.flush()

    def _draw(self) -> None:
        self._last_draw = self.clock.monotonic()
        if self._bar is None:
            self._bar = tqdm(
                total=len(self._runs),
                desc=self.line(),
                file=self.out,
                bar_format="{desc} |{bar:20}|",
                dynamic_ncols=True,
            )
        c = self.counts()
        self._bar.n = c["done"] + c["failed"]
        self._bar.set_description_str(self.line(), refresh=False)
        self._bar.refresh()

    def _write_line(self, line: str) -> None:
        """One line of the executor's, whole, above the terminal's progress line."""
        with self._lock:
            if self._bar is not None:
                self._bar.clear()
            self.out.write(line + "\n")
            if self._bar is not None:
                self._bar.refresh()
            self.out.flush()


class _Lines:
    """What the executor prints through while the stage shows its progress: its text passed
    on in whole lines (a thread's `print` writes a line, then its newline: another thread's
    line could land between), above the progress line on a terminal."""

    def __init__(self, progress: StageProgress):
        self._progress = progress
        self._partial = {}  # thread -> the text of its line so far

    def write(self, text: str) -> int:
        with self._progress._lock:
            key = threading.get_ident()
            *lines, rest = (self._partial.pop(key, "") + text).split("\n")
            if rest:
                self._partial[key] = rest
            for line in lines:
                self._progress._write_line(line)
        return len(text)

    def flush(self) -> None:
        self._progress.out.flush()

    def flush_partial(self) -> None:
        """Lines left without their newline, written as they are."""
        with self._progress._lock:
            for key in list(self._partial):
                self._progress._write_line(self._partial.pop(key))

    def isatty(self) -> bool:
        return _isatty(self._progress.out)

    def __getattr__(self, name):  # encoding, fileno, ...: the real stream's
        return getattr(self._progress.out, name)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or closed
        return False
