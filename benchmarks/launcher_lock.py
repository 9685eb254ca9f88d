"""What keeping one launcher per run costs a run: the run lock on this machine and the lease in
a remote store (docs/performance.md, "One launcher per run").

    python benchmarks/launcher_lock.py [--runs 200] [--lease-runs 50] [--no-lease]

Rows, each the median over `--runs` (or `--lease-runs`) runs:
- lock: what a launcher does per run (`pipeline.runlock.RunLock`: open, flock, the holder
  line, release), and the run's own check of the lock its executor passed on (`inherited`);
- lease: take and give up the run's lease (`pipeline.lease.Lease`: one conditional PUT, one
  conditional DELETE) against an S3 server on 127.0.0.1 (moto's, started here: the
  round trips of a real store add their own latency), and one renewal (one conditional PUT,
  every LEASE_SECONDS / 4 while the run trains).
A run's own time is seconds to days; these are milliseconds per run at most.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import lease as leases  # noqa: E402 - after the path, as a script
from pipeline import runlock  # noqa: E402


def median_ms(fn, n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def lock_rows(runs: int, root: Path) -> dict:
    def take_and_release(i):
        lock = runlock.RunLock(runlock.lock_path(root / "store" / f"{i:016x}", f"{i:016x}"))
        assert lock.try_acquire()
        lock.release()

    held = runlock.RunLock(runlock.lock_path(root / "store" / "run", "run"))
    assert held.try_acquire()
    os.environ[runlock.LOCK_FD_ENV] = str(held.fd)
    spec = {"output_dir": str(root / "store" / "run"), "run_hash": "run"}

    def check_inherited(i):
        assert runlock.inherited(spec)

    try:
        return {
            "lock_ms": median_ms(take_and_release, runs),
            "inherited_check_ms": median_ms(check_inherited, runs),
        }
    finally:
        os.environ.pop(runlock.LOCK_FD_ENV)
        held.release()


def lease_rows(runs: int) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        renew = leases.Lease("s3://bench/results/renewed", endpoint)
        assert renew.try_acquire() is None

        def take_and_release(i):
            lease = leases.Lease(f"s3://bench/results/{i:016x}", endpoint)
            assert lease.try_acquire() is None
            lease.release()

        def renewal(i):
            renew.etag = renew._put(IfMatch=renew.etag)

        return {
            "lease_ms": median_ms(take_and_release, runs),
            "renewal_ms": median_ms(renewal, runs),
        }
    finally:
        server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200, help="runs timed for the lock rows")
    parser.add_argument("--lease-runs", type=int, default=50, help="runs timed for the lease rows")
    parser.add_argument("--no-lease", action="store_true", help="skip the lease rows")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.lease_runs < 1:
        parser.error("--runs and --lease-runs must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        rows = lock_rows(args.runs, Path(tmp))
    if not args.no_lease:
        rows.update(lease_rows(args.lease_runs))
    for key, value in rows.items():
        print(f"{key:>20}: {value:8.3f} ms per run (median)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
