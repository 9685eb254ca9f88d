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
from .contract import EX_TEMPFAIL
from .executors import Detached

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
        from .config import tuned_cells
        from .grid import expand, tuning_specs
        from .tune import load_selection
        params = load_params(args.params, args.set)
        tuning = tuning_specs(params)
        selection = load_selection(params)
        unknown = [cell for cell in tuned_cells(params) if cell not in selection]
        specs = expand(params, {**selection, **{cell: {} for cell in unknown}})
        print(f"params OK (preset: {params.get('preset') or 'none'}): {len(tuning)} tuning "
              f"runs, {len(specs)} runs in the grid")
        for spec in tuning + specs:
            print(f"  {spec['name']}")
        if unknown:
            print(f"({len(unknown)} tuned cells are listed with their pinned values until "
                  "the tune stage has chosen theirs)")
        return 0


class Prepare:
    """Download, verify and convert one dataset (or generate its synthetic stand-in)."""

    @staticmethod
    def add_arguments(parser):
        parser.add_argument("dataset", help="a dataset of params.yaml's `datasets`")
        add_params_arguments(parser)

    @staticmethod
    def run(args):
        params = load_params(args.params, args.set, build_imported=False)
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
        from .execute import check_prepared, run_stage
        from .grid import expand
        from .tune import load_selection
        params = load_params(args.params, args.set)
        check_prepared(params, "train")
        specs = expand(params, load_selection(params))
        report = run_stage(params, specs, "train", view=True)
        _write_summary(Path(cls.SUMMARY), specs)
        return 1 if report.failed else 0


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
    "tune": ("pipeline.tune", "choose hyperparameters on validation accuracy (DVC tune stage)"),
    "train": (Train, "train every run of the grid without a result (DVC train stage)"),
    "timing": ("pipeline.timing", "time every configuration's training step in one process "
                                  "(DVC timing stage)"),
    "aggregate": ("pipeline.aggregate", "tables, figures and MLflow export (DVC aggregate "
                                        "stage)"),
    "gc": ("pipeline.gc", "remove results and checkpoints no run of the grid uses"),
    "render-jobs": ("pipeline.executors.kubernetes", "write the grid's Kubernetes Jobs as "
                                                     "YAML files"),
    "jobs": ("pipeline.jobs", "list this pipeline's Kubernetes Jobs, or cancel them (those of "
                              "an earlier grid with --stale)"),
    "image": ("pipeline.image", "the training image's reference: tagged with the code version "
                                "(`make image` builds it)"),
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
    except Detached:
        return EX_TEMPFAIL   # said by the stage; the runs go on, the next start adopts them
    except KeyboardInterrupt:
        # Finished runs are kept and interrupted ones resume: the next call continues.
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
