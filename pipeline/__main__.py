"""`python -m pipeline <command>`: the commands behind the DVC stages, and a few tools.

Each command is a module with `add_arguments(parser)` and
`run(args) -> int`, and a one-line description in COMMANDS. Only the chosen one is imported,
so a command whose dependencies are missing breaks only itself; adding a command is one line
in COMMANDS. Invalid input (params.yaml, flags, a missing prerequisite the user must
provide) exits 78 with every problem listed and no traceback.
"""

import argparse
import importlib
import sys

from vsgd.spec import ConfigError

from .contract import EX_CONFIG, EX_TEMPFAIL, Detached

EXAMPLES = """\
examples:
  python -m pipeline validate                      check params.yaml, list the grid's runs
  python -m pipeline validate --set preset=tiny    the same for the scaled-down grid
  python -m pipeline train --set optimizer.vsgd.lr=0.05
  python -m pipeline gc --dry-run                  what gc would remove
  dvc repro                                        every stage, as dvc.yaml declares them
"""


# name -> (module with add_arguments(parser) and run(args) -> int, summary)
COMMANDS = {
    "validate": ("pipeline.validate", "check params.yaml and list the runs of its grid"),
    "prepare": ("pipeline.prepare", "download, verify and convert a dataset (DVC prepare stage)"),
    "tune": ("pipeline.tune", "choose hyperparameters on validation accuracy (DVC tune stage)"),
    "train": (
        "pipeline.train_stage",
        "train every run of the grid without a result (DVC train stage)",
    ),
    "timing": (
        "pipeline.timing",
        "time every configuration's training step in one process (DVC timing stage)",
    ),
    "aggregate": ("pipeline.aggregate", "tables, figures and MLflow export (DVC aggregate stage)"),
    "gc": ("pipeline.gc", "remove results and checkpoints no run of the grid uses"),
    "render-jobs": ("pipeline.k8s.render", "write the grid's Kubernetes Jobs as YAML files"),
    "jobs": (
        "pipeline.k8s.jobs",
        "list this pipeline's Kubernetes Jobs, or cancel them (those "
        "of an earlier grid with --stale)",
    ),
    "image": (
        "pipeline.image",
        "the training image's reference: tagged with the code version (`make image` builds it)",
    ),
    "services": ("pipeline.services", "start/stop a local MLflow server and S3 store"),
    "doctor": (
        "pipeline.doctor.command",
        "whether this machine can run the protocol; --gpu-check: a bounded GPU node acceptance",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The reproduction pipeline: the commands behind dvc.yaml's stages, and "
        "tools around them.",
        epilog=EXAMPLES,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="<command>", required=True, title="commands"
    )
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(
                f"python -m pipeline: unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}",
                file=sys.stderr,
            )
            return EX_CONFIG
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    command, summary = COMMANDS[name]
    if isinstance(command, str):
        command = importlib.import_module(command)
    sub = argparse.ArgumentParser(
        prog=f"python -m pipeline {name}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(command.__doc__ or summary).strip(),
    )
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
        return EX_TEMPFAIL  # said by the stage; the runs go on, the next start adopts them
    except KeyboardInterrupt:
        # Finished runs are kept and interrupted ones resume: the next call continues.
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
