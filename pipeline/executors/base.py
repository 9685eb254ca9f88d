"""What every executor is: the interface (`Executor`), how a run ended (`RunOutcome`), and
where a run's spec file lives. Executors run a list of resolved run specs somewhere and
report how each one ended.

The stage (`pipeline.execute`) has already dropped finished runs and written every spec file
(`spec_path(spec)`); an executor only runs what it is given, all at once, as parallel as it
is configured to. What differs between executors is theirs, behind one interface
(`Executor`): what to check before any work (`before_stage`: the Kubernetes executor's
preflight and its report of stale Jobs), and running. The stage never asks which kind it has.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunOutcome:
    name: str
    run_hash: str
    ok: bool
    error: str | None = None  # one line: exit code / Job reason
    log_tail: str = ""  # last lines of the run's log


class RunEvents:
    """What a stage hears of its runs while they run (the stage's grid-level progress,
    `pipeline.execute`); the executor calls these from any thread. The defaults ignore them."""

    def run_started(self, name: str, where: str | None = None) -> None:
        """A run's process started; `where`: on what, e.g. "GPU 3" (None: nothing to say)."""

    def run_output(self, name: str, line: str) -> None:
        """A line of a run's own output (its log), as the executor receives it."""

    def run_ended(self, outcome: "RunOutcome") -> None:
        """A run ended, finished or not."""


class Executor:
    """What every executor does; the defaults do nothing."""

    # Set by the stage before `run`.
    events: RunEvents = RunEvents()
    # How many runs it runs at once; None: no limit of its own (every run when a Kueue queue
    # admits them). The stage's ETA counts on it.
    max_parallel: int | None = 1
    # The stream its lines about runs go to; None: stdout. The stage puts one of its own
    # there while it shows its progress (`pipeline.stage_progress`): it keeps each line whole
    # next to the stage's progress line.
    out = None

    def before_stage(self, stage: str, unfinished: list[dict]) -> None:
        """Called by the stage before any lookup, upload or run, with the runs it has not
        found finished: say at once what would fail every run (raise ConfigError), and what
        the stage should know (e.g. runs of an earlier grid still running)."""

    def run(self, specs: list[dict]) -> list[RunOutcome]:
        raise NotImplementedError


def spec_path(spec: dict) -> Path:
    """Where a run's spec file lives: next to its results, so a failed run's directory
    still says what it was."""
    return Path(spec["output_dir"]) / "spec.json"


def write_spec(spec: dict) -> Path:
    path = spec_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    tmp.replace(path)
    return path
