"""What a run shows and keeps of itself: its progress (a tqdm bar on a terminal, one plain
line per log point otherwise), the copy of everything it prints in `<output_dir>/train.log`
(`TeeLog`, with VSGD_TEE_LOG=1: a pod's own log is gone with its Job), and why it failed or
stopped, for Kubernetes to show in the pod's status (`write_termination_message`)."""

import datetime
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .contract import (
    LOG_NAME,
    TEE_LOG_ENV,
    TERMINATION_LOG_ENV,
    TERMINATION_LOG_LIMIT,
    step_line,
)


class Progress:
    """tqdm bar on a terminal, else one plain line per log point, with an ETA either way."""

    def __init__(self, name: str, tty: bool):
        self.name, self.tty = name, tty
        self.bar = None
        self.t0 = self.step0 = None

    def __call__(self, step, total, info):
        if self.t0 is None:  # the rate of this process, from its first log point
            self.t0, self.step0 = time.monotonic(), step
        if self.tty:
            self._bar(step, total, info)
            return
        rate = (step - self.step0) / max(time.monotonic() - self.t0, 1e-9)
        eta = hms((total - step) / rate) if step > self.step0 else "?"
        # None where the window's only step compiled the model: nothing was timed.
        speed = info.get("images_per_sec")
        # Its start is the contract's (launchers read the step from it: `parse_step`).
        line = (
            f"{step_line(step, total)} loss {info['loss']:.4f} acc {info['acc']:.4f} "
            f"lr {info['lr']:.4g} {'-' if speed is None else f'{speed:.0f}'} img/s eta {eta}"
        )
        if "test_acc" in info:
            line += f" | test_acc {info['test_acc']:.4f} test_loss {info['test_loss']:.4f}"
        if info.get("val_acc") is not None:  # also the tune stage's runs, which skip test
            line += f"{'' if 'test_acc' in info else ' |'} val_acc {info['val_acc']:.4f}"
        print(line, file=sys.stderr, flush=True)

    def _bar(self, step, total, info):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=step, desc=self.name, unit="it", dynamic_ncols=True
            )
        self.bar.update(step - self.bar.n)
        post = {"loss": f"{info['loss']:.3f}", "acc": f"{info['acc']:.3f}"}
        for key in ("test_acc", "val_acc"):
            if info.get(key) is not None:
                post[key] = f"{info[key]:.3f}"
        self.bar.set_postfix(post, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def hms(seconds: float) -> str:
    """A duration as H:MM:SS (an ETA)."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def write_termination_message(text: str) -> None:
    """`text` (at most TERMINATION_LOG_LIMIT bytes) to $VSGD_TERMINATION_LOG, if set; a
    failure to write it is only reported, never in the way of the run's own error."""
    path = os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    data = text.strip().encode("utf-8")[:TERMINATION_LOG_LIMIT]
    try:
        with open(path, "wb") as f:
            f.write(data.decode("utf-8", "ignore").encode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - the message is a courtesy
        print(f"could not write the termination message to {path}: {exc}", file=sys.stderr)


class _Tee:
    """A text stream that writes to `stream` and to `log`; a failing log is dropped (with
    one line saying so), the stream is never held up by it."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        n = self.stream.write(text)
        if self.log is not None:
            try:
                self.log.write(text)
                self.log.flush()
            except (OSError, ValueError) as exc:
                self.log = None
                self.stream.write(f"{LOG_NAME}: no longer written ({exc})\n")
        return n

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self.stream, name)


class TeeLog:
    """With TEE_LOG_ENV=1, stdout and stderr (and the log handlers on them) also go to
    `<output_dir>/train.log`, appended, after a header line per start. What C code writes to
    the file descriptors directly (rare: a crash dump) is only in the pod's log."""

    def __init__(self, output_dir):
        path = Path(output_dir) / LOG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8", errors="replace")
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.file.write(
            f"==== {now} {socket.gethostname()}: python -m pipeline.train "
            f"(pid {os.getpid()}) ====\n"
        )
        self.file.flush()
        self.streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)
        self._swap(self.streams[1], sys.stderr)

    @classmethod
    def start(cls, output_dir) -> "TeeLog | None":
        """The tee if TEE_LOG_ENV asks for it; a log that cannot be opened costs the copy of
        the log, not the run."""
        if os.environ.get(TEE_LOG_ENV) != "1":
            return None
        try:
            return cls(output_dir)
        except OSError as exc:
            print(f"{LOG_NAME}: not kept in {output_dir} ({exc})", file=sys.stderr)
            return None

    def _swap(self, old, new):
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)

    def close(self):
        self._swap(sys.stderr, self.streams[1])
        sys.stdout, sys.stderr = self.streams
        self.file.close()
