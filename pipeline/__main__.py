"""`python -m pipeline <command>`: the commands behind the DVC stages, and a few tools.

Each command is a module (or a class here) with `add_arguments(parser)` and
`run(args) -> int`, and a one-line description in COMMANDS. Only the chosen one is imported,
so a command whose dependencies are missing breaks only itself; adding a command is one line
in COMMANDS. Invalid input (params.yaml, flags, a missing prerequisite the user must
provide) exits 78 with every problem listed and no traceback.
"""

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from .config import EX_CONFIG, ConfigError, add_params_arguments, load_params

EXAMPLES = """\
examples:
  python -m pipeline validate                      check params.yaml, list the grid's runs
  python -m pipeline validate --set preset=tiny    the same for the scaled-down grid
  python -m pipeline train --set optimizer.vsgd.lr=0.05
  python -m pipeline gc --dry-run                  what gc would remove
  dvc repro                                        every stage, as dvc.yaml declares them
"""


class Validate:
    """Check params.yaml (every problem at once) and list the runs of its grid."""

    @staticmethod
    def add_arguments(parser):
        add_params_arguments(parser)

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
        parser.add_argument("dataset", help="a dataset of params.yaml's `datasets`")
        add_params_arguments(parser)

    @staticmethod
    def run(args):
        params = load_params(args.params, args.set)
        if args.dataset not in params["datasets"]:
            raise ConfigError([f"prepare: dataset {args.dataset!r} is not in datasets; "
                               f"allowed: {', '.join(params['datasets'])}"])
        from vsgd.data import DataError, DownloadError, prepare
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        data = params["data"]
        # Each source takes only its own settings (prepare refuses the other's).
        options = ({"synthetic_sizes": data["synthetic_sizes"]} if data["source"] == "synthetic"
                   else {"mirror": data["mirror"]})
        try:
            manifest = prepare(args.dataset, data["source"], data["root"], **options)
        except DownloadError as exc:
            print(f"prepare {args.dataset}: {exc}\n  without network access: set data.mirror "
                  "to a server or file:// directory holding the archive, place the archive "
                  f"in {data['root']}/downloads/ yourself, or try the pipeline on synthetic "
                  "data: dvc exp run -S preset=tiny", file=sys.stderr)
            return 1
        except DataError as exc:  # checksum, archive: the message says what to do
            print(f"prepare {args.dataset}: {exc}", file=sys.stderr)
            return 1
        print(f"{args.dataset}: {manifest['counts']} ({manifest['source']}), "
              f"checksum {manifest['checksum'][:12]}")
        return 0


class Train:
    """Run every run of the grid that has no finished result (the DVC train stage)."""

    SUMMARY = "results/runs.json"

    @staticmethod
    def add_arguments(parser):
        add_params_arguments(parser)

    @classmethod
    def run(cls, args):
        from . import results
        from .executors import get_executor, write_spec
        from .grid import expand
        params = load_params(args.params, args.set)
        specs = expand(params)
        unprepared = sorted({s["dataset"] for s in specs if s["data"]["checksum"] is None})
        if unprepared:
            raise ConfigError([f"train: no prepared data for {', '.join(unprepared)}; run "
                               "`dvc repro` (its prepare stage) or `python -m pipeline "
                               f"prepare {unprepared[0]}` first"])
        shown = {s["name"] for s in specs if results.is_shown(s)}
        pending = [s for s in specs if not (results.is_done(s)
                                            or _fetch_remote_result(params, s))]
        done = sum(s["name"] in shown for s in specs)
        reused = len(specs) - len(pending) - done
        hidden = results.show(specs).hidden
        print(f"train: {len(specs)} runs in the grid, {done} done, {reused} reused, "
              f"{len(pending)} to run" + (f"; {len(hidden)} left the grid (results kept "
                                          "in results/store, `python -m pipeline gc` "
                                          "removes them)" if hidden else ""))
        for spec in pending:
            write_spec(spec)
        _push_datasets(params, pending)
        if pending:
            _init_tracking(params)
        try:
            outcomes = get_executor(params).run(pending)
        except (KeyboardInterrupt, SystemExit):
            # Say what is kept: results in the store count as done, whatever the run's exit.
            kept = sum(results.is_done(s) for s in pending)
            results.show(specs)
            print(f"train: interrupted; {kept} of {len(pending)} runs finished and kept, "
                  f"{len(pending) - kept} to run; run again to continue (interrupted runs "
                  f"resume from their last checkpoint)", file=sys.stderr, flush=True)
            raise
        results.show(specs)
        _write_summary(Path(cls.SUMMARY), specs)
        # A run killed while exiting, after its result was written, is done (its
        # metrics.json is what counts, here and at the next `dvc repro`).
        by_name = {s["name"]: s for s in pending}
        failed = [o for o in outcomes if not o.ok and not results.is_done(by_name[o.name])]
        for o in failed:
            print(f"\nFAILED {o.name}: {o.error}\n--- last lines of its log ---\n"
                  f"{o.log_tail}\n---", file=sys.stderr)
        if failed:
            print(f"train: {len(failed)} of {len(pending)} runs failed: "
                  f"{', '.join(o.name for o in failed)}; finished runs are kept, run again "
                  f"to retry the rest", file=sys.stderr)
            return 1
        return 0


def _fetch_remote_result(params, spec) -> bool:
    """With a remote store, a run finished on any machine (a pod, another laptop) is done:
    its result is copied into the local store instead of training again."""
    if not params["storage"]["remote"]:
        return False
    from . import results
    from .storage import fetch_result
    try:
        fetch_result(params, spec)  # looks the result up once, then copies it
    except FileNotFoundError:  # no finished result anywhere
        return False
    return results.is_done(spec)


def _push_datasets(params, specs) -> None:
    """Runs that share no disk with us stage their data from the DVC remote: upload what
    is missing there (as `dvc push` would) before any run starts."""
    remote = params["storage"]["remote"]
    if not remote:
        return
    from .storage import push_dataset
    for data_dir in sorted({s["data"]["dir"] for s in specs}):
        push_dataset(data_dir, remote, params["storage"]["endpoint_url"])


def _init_tracking(params):
    """Create the SQLite tracking store and experiment once, before parallel runs would all
    race to run its schema migrations."""
    from vsgd.tracking import tracking_uri
    uri = tracking_uri(params["tracking"]["uri"])
    if uri is None or not uri.startswith("sqlite:"):
        return
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    name = params["tracking"]["experiment"]
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name)


def _write_summary(path: Path, specs):
    """Final metrics of every finished run of the grid: the train stage's DVC metrics."""
    from .results import RESULTS_DIR, read_metrics
    runs = {}
    for spec in specs:
        m = read_metrics(Path(RESULTS_DIR) / spec["name"])
        if m is None:
            continue
        # Few keys on purpose: `dvc metrics show` / `dvc exp show` print one column each.
        runs[spec["name"]] = {k: m[k] for k in ("test_acc", "val_acc", "seconds_per_iter")
                              if m.get(k) is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=2, sort_keys=True) + "\n")


# name -> (class above or module with add_arguments(parser) and run(args) -> int, summary)
COMMANDS = {
    "validate": (Validate, "check params.yaml and list the runs of its grid"),
    "prepare": (Prepare, "download, verify and convert a dataset (DVC prepare stage)"),
    "train": (Train, "train every run of the grid without a result (DVC train stage)"),
    "aggregate": ("pipeline.aggregate", "tables, figures and MLflow export (DVC aggregate "
                                        "stage)"),
    "gc": ("pipeline.results", "remove results and checkpoints no run of the grid uses"),
    "render-jobs": ("pipeline.executors.kubernetes", "write the grid's Kubernetes Jobs as "
                                                     "YAML files"),
    "services": ("pipeline.services", "start/stop a local MLflow server and S3 store"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The reproduction pipeline: the commands behind dvc.yaml's stages, and "
                    "tools around them.", epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True,
                                title="commands")
    for name, (command, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"python -m pipeline: unknown command {argv[0]!r}; allowed: "
                  f"{', '.join(COMMANDS)}", file=sys.stderr)
            return EX_CONFIG
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    command, summary = COMMANDS[name]
    if isinstance(command, str):
        command = importlib.import_module(command)
    sub = argparse.ArgumentParser(prog=f"python -m pipeline {name}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  description=(command.__doc__ or summary).strip())
    command.add_arguments(sub)
    try:
        args = sub.parse_args(rest)
    except SystemExit as exc:  # argparse: 0 after --help, 2 for bad flags
        return EX_CONFIG if exc.code else 0
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
