"""The wall time of a run's training steps: the log windows its `seconds_per_iter` and
images/s are measured over, with each process's compile step kept out of them.

A window runs from the end of one log point's work (its evaluation, logging and checkpoint)
to the next log point's read-back of the running sums, which waits for the window's last
step: so it holds the training steps and nothing else. A checkpoint taken inside a window (on
a stop request) records the window (`record`) and the resumed process goes on with it.

The compile step: with a compiled model (`vsgd.engine.build`: `training.compile` true, or
auto on CUDA) the first training step of every process compiles it, tens of seconds on a GPU
and about a minute on a CPU, and a resumed process compiles again. That step is a real step
(the run ends bit-identical whether it was interrupted or not); only its time is left out:
`compile_step` takes it, waits for it (the one wait for the device outside a log point, in no
window) and starts the window's clock again after it. Its seconds add up in
`compile_seconds` and its count in `compile_steps`, so that `seconds_per_iter` is the mean
over the timed steps, `steps_done - compile_steps`. Both totals count every process whose
steps the run's state holds (a process that died after its last checkpoint took steps that
are taken again, and their compilation with them).

A checkpoint carries `compile_steps` and `compile_seconds`, and an open window's record its
own `compile_steps`. One written before they existed has none: they read as 0 (every step
timed; its seconds then hold its processes' compilation, as they did when it was written).
"""

import time

# What a checkpoint carries of the clock (`StepClock.record`); none is required.
CHECKPOINT_KEYS = ("window", "compile_steps", "compile_seconds")


class StepClock:
    """The current window of training steps and the run's compile steps.

    `StepClock(step, saved)`: the clock of a run at `step`, resumed from the checkpoint dict
    `saved` (only `CHECKPOINT_KEYS` are read; a new run's is {}). A checkpoint without a
    window (a log point's, or an older one) had its window start at its own step."""

    def __init__(self, step: int, saved: dict):
        window = saved.get("window") or {"step": step, "seconds": 0.0}
        self.compile_steps = saved.get("compile_steps", 0)
        self.compile_seconds = saved.get("compile_seconds", 0.0)
        self.window_step = window["step"]
        # The window's seconds and compile steps before this process resumed it.
        self.carried = window["seconds"]
        self.window_compile_steps = window.get("compile_steps", 0)
        self.last_compile: float | None = None  # this process's, until a log point reports it
        self.start = time.perf_counter()

    def restart(self, step: int) -> None:
        """A new window at `step`, after a log point's work."""
        self.start = time.perf_counter()
        self.window_step, self.carried, self.window_compile_steps = step, 0.0, 0

    def compile_step(self, train_step, run, state):
        """`train_step(run, state)`, waited for and timed apart; returns what it returns."""
        began = time.perf_counter()
        out = train_step(run, state)
        state.sums.cpu()  # waits for the step: its compilation and its kernels
        ended = time.perf_counter()
        self.last_compile = ended - began
        self.compile_seconds += self.last_compile
        self.compile_steps += 1
        self.window_compile_steps += 1
        self.carried += began - self.start  # the window's steps before it (none, usually)
        self.start = ended
        return out

    def elapsed(self) -> float:
        return self.carried + time.perf_counter() - self.start

    def close(self, state, batch_size: int) -> float | None:
        """Close the window at `state.step`, once its last step was waited for: its seconds
        go into `state.seconds`. Returns its images/s, None when it timed no step (its only
        step was a compile step)."""
        seconds = self.elapsed()
        state.seconds += seconds
        timed = state.step - self.window_step - self.window_compile_steps
        return timed * batch_size / seconds if timed and seconds > 0 else None

    def record(self, state, inside_window: bool) -> dict:
        """What a checkpoint at `state.step` carries of the clock. `inside_window`: taken
        inside a window (a stop between log points), whose last step is waited for first (the
        copy of the sums), as a log point does, so that its time is in the seconds; else the
        window was just closed and restarts at this step."""
        window = None
        if inside_window:
            state.sums.cpu()
            window = {
                "step": self.window_step,
                "seconds": self.elapsed(),
                "compile_steps": self.window_compile_steps,
            }
        return {
            "window": window,
            "compile_steps": self.compile_steps,
            "compile_seconds": self.compile_seconds,
        }

    def timed_steps(self, steps_done: int) -> int:
        """The steps `state.seconds` holds, of the `steps_done` the run's state holds."""
        return steps_done - self.compile_steps
