"""One training run: `python -m pipeline.train`.

    python -m pipeline.train --spec run.json          # what the executors run
    python -m pipeline.train --spec-json '{...}'      # Kubernetes Jobs (no shared disk)
    python -m pipeline.train --dataset cifar100 --arch vgg --optimizer vsgd [--seed 0]
                             [--set key=value ...] [--params params.yaml]

Exit codes: 0 done, 78 invalid configuration (every problem listed, no traceback), 1 any
other failure, 130 interrupted. Progress is a tqdm bar when stderr is a terminal and one plain
line per log point otherwise (Kubernetes and executor logs).
"""

import argparse
import json
import logging
import signal
import sys
import time

from vsgd.spec import ARCHS, EX_CONFIG, OPTIMIZERS, ConfigError


def open_checkpoint_store(uri: str | None):
    """The checkpoint store of a spec's `checkpoint`: a local directory, `s3://bucket/prefix`
    (`pipeline.storage.S3CheckpointStore`), or None for no checkpoints."""
    if not uri:
        return None
    if uri.startswith("s3://"):
        from pipeline.storage import open_checkpoint_store as open_remote
        return open_remote(uri)
    if "://" in uri:
        raise ConfigError([f"checkpoint: {uri!r}; allowed: a local directory or "
                           "s3://bucket/prefix"])
    from vsgd.checkpoint import LocalCheckpointStore
    return LocalCheckpointStore(uri)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", metavar="FILE", help="resolved run spec file (JSON)")
    src.add_argument("--spec-json", metavar="JSON", help="resolved run spec as a JSON string")
    src.add_argument("--dataset", help="build the spec from params.yaml (with --arch, "
                     "--optimizer)")
    p.add_argument("--arch", help=f"architecture key of params.yaml: {', '.join(ARCHS)}")
    p.add_argument("--optimizer", help=f"optimizer key of params.yaml: {', '.join(OPTIMIZERS)}")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a params.yaml key (repeatable)")
    p.add_argument("--params", default="params.yaml", metavar="FILE",
                   help="the params file (default: params.yaml)")
    try:
        args = p.parse_args(argv)
        if args.dataset and not (args.arch and args.optimizer):
            p.error("--dataset needs --arch and --optimizer")
        if not args.dataset and (args.arch or args.optimizer or args.overrides):
            p.error("--arch/--optimizer/--set build a spec from params.yaml: use them with "
                    "--dataset, not with --spec/--spec-json")
    except SystemExit as exc:  # bad flags are a configuration error: not worth a retry
        raise SystemExit(EX_CONFIG if exc.code else 0) from None
    return args


def load_spec(args) -> dict:
    """The run spec; raises ConfigError for anything the user has to fix."""
    if args.spec or args.spec_json:
        try:
            text = open(args.spec).read() if args.spec else args.spec_json
            return json.loads(text)
        except OSError as exc:
            raise ConfigError([f"--spec: cannot read {args.spec}: {exc.strerror}"]) from exc
        except json.JSONDecodeError as exc:
            raise ConfigError([f"spec is not valid JSON: {exc}"]) from exc
    # Imported here: the --spec forms must work without the params.yaml tooling.
    from pipeline.config import load_params
    from pipeline.grid import build_spec
    params = load_params(args.params, args.overrides)
    problems = []
    for flag, value, allowed in (("--dataset", args.dataset, params["protocol"]),
                                 ("--arch", args.arch, ARCHS),
                                 ("--optimizer", args.optimizer, params["optimizer"])):
        if value not in allowed:
            problems.append(f"{flag}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
    if problems:
        raise ConfigError(problems)
    # The tune stage's choice for this cell where it made one, else the pinned values.
    from pipeline.tune import load_selection
    values = load_selection(params).get((args.dataset, args.arch, args.optimizer)) or {}
    return build_spec(params, args.dataset, args.arch, args.optimizer, args.seed, values)


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
        eta = _hms((total - step) / rate) if step > self.step0 else "?"
        line = (f"step {step}/{total} loss {info['loss']:.4f} acc {info['acc']:.4f} "
                f"lr {info['lr']:.4g} {info['images_per_sec']:.0f} img/s eta {eta}")
        if "test_acc" in info:
            line += f" | test_acc {info['test_acc']:.4f} test_loss {info['test_loss']:.4f}"
        if info.get("val_acc") is not None:  # also the tune stage's runs, which skip test
            line += f"{'' if 'test_acc' in info else ' |'} val_acc {info['val_acc']:.4f}"
        print(line, file=sys.stderr, flush=True)

    def _bar(self, step, total, info):
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=step, desc=self.name, unit="it",
                            dynamic_ncols=True)
        self.bar.update(step - self.bar.n)
        post = {"loss": f"{info['loss']:.3f}", "acc": f"{info['acc']:.3f}"}
        for key in ("test_acc", "val_acc"):
            if info.get(key) is not None:
                post[key] = f"{info[key]:.3f}"
        self.bar.set_postfix(post, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _terminate(signum, frame):
    # SIGTERM (executor stop, pod deletion) unwinds like Ctrl-C: the MLflow run is marked
    # KILLED; the last checkpoint is what the next start resumes from.
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipeline import redact, storage
    redact.install()  # no credential value in this run's log
    from vsgd.spec import check_spec
    from vsgd.trainer import train
    try:
        spec = load_spec(args)
        problems = check_spec(spec)
        if problems:
            raise ConfigError(problems)
        store = open_checkpoint_store(spec.get("checkpoint"))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    signal.signal(signal.SIGTERM, _terminate)
    progress = Progress(spec["name"], sys.stderr.isatty())
    try:
        # A remote dataset (spec data.uri) is staged into local scratch once, verified.
        spec["data"]["dir"] = storage.stage_data(spec)
        metrics = train(spec, checkpoint_store=store, progress=progress)
    except ConfigError as exc:
        progress.close()
        print(exc, file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        progress.close()
        print("interrupted; the last checkpoint is kept, run again to resume", file=sys.stderr)
        return 130
    progress.close()
    storage.publish_result(spec["output_dir"])  # to $VSGD_RESULTS_URI when set (pods)
    shown = " ".join(f"{key} {metrics[key]:.4f}" for key in ("test_acc", "test_loss", "val_acc")
                     if metrics.get(key) is not None) or "no finite evaluation"
    diverged = (f"diverged at step {metrics['diverged']['step']}; "
                if metrics.get("diverged") else "")
    print(f"done {spec['name']}: {diverged}{shown} ({metrics['images_per_sec']:.0f} img/s) -> "
          f"{spec['output_dir']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
