"""`python -m vsgd.data prepare --dataset cifar100 --source official|synthetic --root data`."""

import argparse
import json
import logging
import sys

from ..spec import EX_CONFIG, SOURCES
from .errors import DataError
from .prepared import prepare
from .registry import DATASETS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsgd.data")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="download/convert or generate a dataset once")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="which dataset")
    p.add_argument(
        "--source",
        required=True,
        choices=SOURCES,
        help="official archive, or synthetic data (never chosen implicitly)",
    )
    p.add_argument("--root", default="data", help="holds downloads/ and prepared/")
    p.add_argument("--mirror", help="base URL serving the official archive file")
    p.add_argument("--train-size", type=int, help="synthetic source only")
    p.add_argument("--test-size", type=int, help="synthetic source only")
    try:  # bad flags are a configuration error (EX_CONFIG), like every CLI of the project
        args = parser.parse_args(argv)
        sizes = None
        if args.train_size is not None or args.test_size is not None:
            if args.source != "synthetic" or args.train_size is None or args.test_size is None:
                parser.error("--train-size and --test-size go together, with --source synthetic")
            sizes = {"train": args.train_size, "test": args.test_size}
    except SystemExit as exc:
        return EX_CONFIG if exc.code else 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        manifest = prepare(
            args.dataset, args.source, args.root, mirror=args.mirror, synthetic_sizes=sizes
        )
    except ValueError as exc:  # options prepare refuses
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: manifest[k] for k in ("dataset", "source", "counts", "checksum")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
