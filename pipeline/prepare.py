"""`python -m pipeline prepare <dataset>` (the DVC prepare stage): download, verify and
convert one dataset of params.yaml's `datasets`, or generate its synthetic stand-in
(`vsgd.data.prepare`)."""

import logging
import sys
from pathlib import Path

from vsgd.data.download import DownloadError
from vsgd.data.errors import DataError
from vsgd.data.prepared import prepare
from vsgd.data.registry import DATASETS
from vsgd.spec import ConfigError

from .config import add_params_arguments, load_params


def add_arguments(parser):
    parser.add_argument("dataset", help="a dataset of params.yaml's `datasets`")
    add_params_arguments(parser)


def run(args) -> int:
    params = load_params(args.params, args.set, build_imported=False)
    if args.dataset in DATASETS and args.dataset not in params["datasets"]:
        # DVC runs a prepare stage per dataset of params.yaml's own `datasets`; a preset that
        # leaves one out of its grid (demo) still runs that stage, whose output must exist.
        Path(params["data"]["root"], "prepared", args.dataset).mkdir(parents=True, exist_ok=True)
        print(f"{args.dataset}: not in this grid's datasets ({', '.join(params['datasets'])})")
        return 0
    if args.dataset not in params["datasets"]:
        raise ConfigError(
            [
                f"prepare: dataset {args.dataset!r} is not in datasets; "
                f"allowed: {', '.join(params['datasets'])}"
            ]
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data = params["data"]
    # Each source takes only its own settings (prepare refuses the other's).
    options = (
        {"synthetic_sizes": data["synthetic_sizes"]}
        if data["source"] == "synthetic"
        else {"mirror": data["mirror"]}
    )
    try:
        manifest = prepare(args.dataset, data["source"], data["root"], **options)
    except DownloadError as exc:
        print(
            f"prepare {args.dataset}: {exc}\n  without network access: set data.mirror "
            "to a server or file:// directory holding the archive, place the archive "
            f"in {data['root']}/downloads/ yourself, or try the pipeline on synthetic "
            "data: dvc exp run -S preset=demo (a first look in minutes)",
            file=sys.stderr,
        )
        return 1
    except DataError as exc:  # checksum, archive: the message says what to do
        print(f"prepare {args.dataset}: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.dataset}: {manifest['counts']} ({manifest['source']}), "
        f"checksum {manifest['checksum'][:12]}"
    )
    return 0
