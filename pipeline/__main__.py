"""`python -m pipeline <command>`: the commands behind the DVC stages, and a few tools.

Each command is a module (or a class here) with `add_arguments(parser)` and
`run(args) -> int`. Only the chosen one is imported, so a command whose dependencies are
missing breaks only itself; adding a command is one line in COMMANDS.
"""

import argparse
import importlib
import json
import logging
import shutil
import sys
from pathlib import Path

from .config import EX_CONFIG, ConfigError, load_params


def _params_arguments(parser):
    parser.add_argument("--params", default="params.yaml", help="params file (params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. optimizer.vsgd.lr=0.05 (repeatable)")


class Validate:
    """Check params.yaml and print the grid it describes."""

    @staticmethod
    def add_arguments(parser):
        _params_arguments(parser)

    @staticmethod
    def run(args):
        from .grid import expand
        params = load_params(args.params, args.set)
        specs = expand(params)
        print(f"params OK (preset: {params.get('preset') or 'none'}): {len(specs)} runs")
        for spec in specs:
            print(f"  {spec['name']}")
        return 0


class Prepare:
    """Download, verify and convert one dataset (or generate its synthetic stand-in)."""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("dataset")
        _params_arguments(parser)

    @staticmethod
    def run(args):
        params = load_params(args.params, args.set)
        if args.dataset not in params["datasets"]:
            raise ConfigError([f"prepare: dataset {args.dataset!r} is not in datasets "
                               f"({', '.join(params['datasets'])})"])
        from vsgd.data import DataError, prepare
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        data = params["data"]
        # Each source takes only its own settings (prepare refuses the other's).
        options = ({"synthetic_sizes": data["synthetic_sizes"]} if data["source"] == "synthetic"
                   else {"mirror": data["mirror"]})
        try:
            manifest = prepare(args.dataset, data["source"], data["root"], **options)
        except DataError as exc:  # download, checksum, archive: the message says what to do
            print(f"prepare {args.dataset}: {exc}", file=sys.stderr)
            return 1
        print(f"{args.dataset}: {manifest['counts']} ({manifest['source']}), "
              f"checksum {manifest['checksum'][:12]}")
        return 0


class Train:
    """The DVC train stage: run every run of the grid whose result is missing or stale."""

    SUMMARY = "results/runs.json"

    @staticmethod
    def add_arguments(parser):
        _params_arguments(parser)

    @classmethod
    def run(cls, args):
        from .executors import get_executor, write_spec
        from .grid import RESULTS_DIR, expand
        params = load_params(args.params, args.set)
        specs = expand(params)
        unprepared = sorted({s["dataset"] for s in specs if s["data"]["checksum"] is None})
        if unprepared:
            print(f"error: no prepared data for {', '.join(unprepared)}; run `dvc repro "
                  f"prepare` or `python -m pipeline prepare <dataset>` first", file=sys.stderr)
            return 1
        removed = _prune(Path(RESULTS_DIR), {s["name"] for s in specs})
        pending = [s for s in specs if not (_done(s) or _fetch_remote_result(params, s))]
        print(f"train: {len(specs)} runs in the grid, {len(specs) - len(pending)} done, "
              f"{len(pending)} to run" + (f", {len(removed)} stale removed" if removed else ""))
        for spec in pending:
            write_spec(spec)
        _push_datasets(params, pending)
        if pending:
            _init_tracking(params)
        try:
            outcomes = get_executor(params).run(pending)
        except (KeyboardInterrupt, SystemExit):
            # Say what is kept: results on disk count as done, whatever the run's exit.
            kept = sum(_done(s) for s in pending)
            print(f"train: interrupted; {kept} of {len(pending)} runs finished and kept, "
                  f"{len(pending) - kept} to run; run again to continue (interrupted runs "
                  f"resume from their last checkpoint)", file=sys.stderr, flush=True)
            raise
        _write_summary(Path(cls.SUMMARY), specs)
        # A run killed while exiting, after its result was written, is done (its
        # metrics.json is what counts, here and at the next `dvc repro`).
        by_name = {s["name"]: s for s in pending}
        failed = [o for o in outcomes if not o.ok and not _done(by_name[o.name])]
        for o in failed:
            print(f"\nFAILED {o.name}: {o.error}\n--- last lines of its log ---\n"
                  f"{o.log_tail}\n---", file=sys.stderr)
        if failed:
            print(f"train: {len(failed)} of {len(pending)} runs failed: "
                  f"{', '.join(o.name for o in failed)}; finished runs are kept, run again "
                  f"to retry the rest", file=sys.stderr)
            return 1
        return 0


def _done(spec) -> bool:
    try:
        metrics = json.loads((Path(spec["output_dir"]) / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return metrics.get("run_hash") == spec["run_hash"]


def _fetch_remote_result(params, spec) -> bool:
    """With a remote store, a run finished on any machine (a pod, another laptop) is done:
    its result is copied into `output_dir` instead of training again."""
    if not params["storage"]["remote"]:
        return False
    from .storage import fetch_result
    try:
        fetch_result(params, spec)  # looks the result up once, then copies it
    except FileNotFoundError:  # no finished result anywhere
        return False
    return _done(spec)


def _push_datasets(params, specs) -> None:
    """Runs that share no disk with us stage their data from the DVC remote: upload what
    is missing there (as `dvc push` would) before any run starts."""
    remote = params["storage"]["remote"]
    if not remote:
        return
    from .storage import push_dataset
    for data_dir in sorted({s["data"]["dir"] for s in specs}):
        push_dataset(data_dir, remote, params["storage"]["endpoint_url"])


def _prune(results: Path, keep: set) -> list[str]:
    """Remove result directories of runs no longer in the grid (changed or dropped)."""
    if not results.is_dir():
        return []
    stale = sorted(p for p in results.iterdir() if p.is_dir() and p.name not in keep)
    for path in stale:
        shutil.rmtree(path)
    return [p.name for p in stale]


def _init_tracking(params):
    """Create the SQLite tracking store and experiment once, before parallel runs would all
    race to run its schema migrations."""
    import os
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params["tracking"]["uri"]
    if not uri.startswith("sqlite:"):
        return
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    name = params["tracking"]["experiment"]
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name)


def _write_summary(path: Path, specs):
    """Final metrics of every finished run of the grid: the train stage's DVC metrics."""
    runs = {}
    for spec in specs:
        try:
            m = json.loads((Path(spec["output_dir"]) / "metrics.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        # Few keys on purpose: `dvc metrics show` / `dvc exp show` print one column each.
        runs[spec["name"]] = {k: m[k] for k in ("test_acc", "val_acc", "seconds_per_iter")
                              if m.get(k) is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=2, sort_keys=True) + "\n")


# name -> class above or "module" with add_arguments(parser) and run(args) -> int
COMMANDS = {
    "validate": Validate,
    "prepare": Prepare,
    "train": Train,
    "aggregate": "pipeline.aggregate",
    "render-jobs": "pipeline.executors.kubernetes",
    "services": "pipeline.services",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}; commands: {names}", file=sys.stderr)
            return 2
        print(f"usage: python -m pipeline <command> [options]\ncommands: {names}\n"
              f"`python -m pipeline <command> -h` for a command's options")
        return 0
    name, rest = argv[0], argv[1:]
    command = COMMANDS[name]
    if isinstance(command, str):
        command = importlib.import_module(command)
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {name}",
                                     description=(command.__doc__ or "").strip())
    command.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return command.run(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        # Finished runs are kept and interrupted ones resume: the next call continues.
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
