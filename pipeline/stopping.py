"""How a run stops on request: SIGTERM (preemption, eviction, `kubectl delete`, an executor's
stop, `kill`), SIGINT (Ctrl-C) or its launcher's death ask the trainer to stop after the
step in flight; it saves a checkpoint at the step it reached and the process exits 143 or
130 (`StopRequest`)."""

import signal

from .contract import signal_main_thread


class StopRequest:
    """The stop request of this process's run, for `vsgd.trainer.train(stop=...)`: SIGTERM
    or SIGINT (`handle`) or the death of the launcher (`launcher_died`) asks, the trainer
    polls (`__call__`) after every step and then saves a checkpoint and stops.

    Until the trainer's first poll (spec checks, data staging, model build, the first step
    and its compilation) there is no step worth waiting for, so a signal raises
    KeyboardInterrupt at once; so does any signal once the trainer has returned (`done`), and
    a second signal while stopping: whoever sends two means now. The launcher's death is one
    more request, never a second signal: it may come with a signal to the whole process
    group (`kill -TERM -<pgid>`), which must not cost the checkpoint.
    """

    def __init__(self):
        self.signum: int | None = None  # the first request's signal
        self.polled = False
        self._calls = 0
        self._launcher_died = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def __call__(self) -> bool:
        self.polled = True
        return self.signum is not None

    def done(self) -> None:
        """Training is over: from now on a signal interrupts at once."""
        self.polled = False

    def handle(self, signum, frame) -> None:
        self._calls += 1
        if self.signum is None:
            self.signum = signum
        if not self.polled or self._calls > 1 + self._launcher_died:
            raise KeyboardInterrupt

    def launcher_died(self) -> None:
        """From the watching thread: ask as SIGTERM does, through the main thread."""
        self._launcher_died = True
        signal_main_thread(signal.SIGTERM)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)
