"""Whether this machine can run the configured protocol, and what it is.

    python -m pipeline doctor [--json]
    python -m pipeline doctor --gpu-check [--limit SECONDS] [--out DIR]
    python -m pipeline doctor --append-table docs/performance.md [--report FILE]

`doctor`: Python, torch and the CUDA it was built with, whether CUDA works (a small matmul on
every GPU, in a child process with a time limit), the driver, each GPU, cuDNN, what
`training.precision` sets here, the versions of dvc, mlflow, kubernetes and boto3, the
executor (for the local one: the GPUs its runs get), whether the tracking server and the
remote store answer (a few seconds each), which datasets are prepared. Exit 0 when the
configured protocol can run here (on a CPU it can, slowly: the report says so), else 78 with
every problem listed.

`--gpu-check`: a bounded acceptance of the node (default 8 minutes; each item gets a share
of what is left and is skipped with a note once the time is spent): the CUDA tests, VSGD's
three paths against a float64 reference, every configuration of the protocol (images/s of the
training step against the bare forward + backward + step, fp32 and bf16, peak memory, no
host sync), 1, 2 and 4 runs sharing a GPU, a compiled run stopped by SIGTERM and resumed in
a new process against an uninterrupted one, and the whole protocol's estimated wall time.
Without CUDA it runs the same items at CPU size and says which it skipped. Writes
`gpu-check.json` and `gpu-check.md` (default results/doctor/); exit 1 when an item failed.

`--append-table FILE`: adds the node of a GPU report (this `--gpu-check`'s, else `--report`)
to the node tables of FILE (docs/performance.md).
"""

import sys
from pathlib import Path

from vsgd.spec import EX_CONFIG, ConfigError

from ..config import add_params_arguments
from . import gpu_check, node_table, report

OUT = Path("results/doctor")


def add_arguments(parser):
    add_params_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--gpu-check",
        action="store_true",
        help="the bounded acceptance of this node (writes gpu-check.json and gpu-check.md)",
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=gpu_check.DEFAULT_LIMIT,
        metavar="SECONDS",
        help=f"--gpu-check's time budget (default {gpu_check.DEFAULT_LIMIT:g})",
    )
    parser.add_argument(
        "--out", default=str(OUT), metavar="DIR", help=f"--gpu-check's directory (default {OUT})"
    )
    parser.add_argument(
        "--append-table",
        metavar="FILE",
        help="add the GPU node of the report to FILE's node tables (docs/performance.md)",
    )
    parser.add_argument(
        "--report",
        metavar="FILE",
        help="with --append-table and without --gpu-check: the gpu-check.json to take "
        f"(default {OUT / gpu_check.JSON_NAME})",
    )


def run(args) -> int:
    problems = []
    if args.limit <= 0:
        problems.append(f"--limit: {args.limit:g}; allowed: a number of seconds > 0")
    if args.report and (args.gpu_check or not args.append_table):
        problems.append("--report: only with --append-table, without --gpu-check")
    if problems:
        raise ConfigError(problems)
    if args.gpu_check:
        found = gpu_check.run_check(args.params, args.set, args.limit, Path(args.out))
        code = 0 if found["passed"] else 1
        if args.append_table:
            node_table.append(Path(args.append_table), found)
            print(f"doctor: the node's figures added to {args.append_table}")
        return code
    if args.append_table:
        source = Path(args.report or Path(args.out) / gpu_check.JSON_NAME)
        node_table.append(Path(args.append_table), node_table.read_report(source))
        print(f"doctor: the node of {source} added to {args.append_table}")
        return 0
    found = report.build(args.params, args.set)
    if args.json:
        print(report.render_json(found))
    else:
        print(report.render_text(found))
    if found["problems"]:
        if args.json:  # the listing for a person, on stderr; stdout stays one JSON object
            print(f"doctor: {len(found['problems'])} problem(s):", file=sys.stderr)
            for problem in found["problems"]:
                print(f"  - {problem}", file=sys.stderr)
        return EX_CONFIG
    return 0
