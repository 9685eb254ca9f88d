"""Local services for trying remote storage and tracking without a cluster.

    python -m pipeline services up [--s3-port P] [--mlflow-port P] [--bucket vsgd]
    python -m pipeline services status
    python -m pipeline services down

`up` starts on 127.0.0.1 an S3-compatible server (moto, in memory: its objects are gone after
`down`) and an MLflow tracking server (SQLite backend in `.services/mlflow.db`, artifacts
proxied by the server to `s3://<bucket>/mlartifacts`), creates the bucket, records the
processes in `.services/state.json` and prints the environment to export (also written to
`.services/env.sh`). The AWS keys it prints are dummies that only moto accepts.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
# moto accepts any keys; these never authorise anything anywhere else.
MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "moto-local-key",
    "AWS_SECRET_ACCESS_KEY": "moto-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_TIMEOUT = 90.0


@dataclass
class Service:
    name: str
    pid: int
    url: str
    log: str
    marker: str  # a word of its command line, to never signal a recycled pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_s3(state_dir, port: int = 0) -> tuple[Service, subprocess.Popen]:
    """A moto S3 server on 127.0.0.1:port (a free port if 0)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    return _start(
        "s3", cmd, f"http://{HOST}:{port}", state_dir, "moto", os.environ.copy(), ready="/moto-api/"
    )


def start_mlflow(
    state_dir,
    port: int = 0,
    *,
    backend: str | None = None,
    artifacts: str | None = None,
    s3_endpoint: str | None = None,
    env: dict | None = None,
) -> tuple[Service, subprocess.Popen]:
    """`mlflow server` on 127.0.0.1:port with a SQLite backend in `state_dir` (or `backend`)
    and `--serve-artifacts` to `artifacts` (an s3:// URI or a directory)."""
    state_dir = Path(state_dir)
    port = port or free_port()
    backend = backend or f"sqlite:///{(state_dir / 'mlflow.db').resolve()}"
    artifacts = artifacts or str((state_dir / "mlartifacts").resolve())
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint  # where the server stores artifacts
    return _start("mlflow", cmd, f"http://{HOST}:{port}", state_dir, "mlflow", env, ready="/health")


def _start(name, cmd, url, state_dir, marker, env, ready) -> tuple[Service, subprocess.Popen]:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        # Its own session: `stop` signals the group (mlflow's workers are children).
        proc = subprocess.Popen(
            cmd,
            cwd=state_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    service = Service(name, proc.pid, url, str(log_path), marker)
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(url + ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(service, proc)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} server did not start at {url}; {log_path}:\n{tail}")
        time.sleep(0.25)
    return service, proc


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _alive(service: Service) -> bool:
    """The recorded process still runs the recorded program (not a zombie, not a new pid)."""
    try:
        stat = Path(f"/proc/{service.pid}/stat").read_text()
        cmdline = Path(f"/proc/{service.pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and service.marker in cmdline


def stop(service: Service, proc: subprocess.Popen | None = None, timeout: float = 10) -> None:
    """SIGTERM the service's process group, SIGKILL after `timeout` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _alive(service):
            break
        try:
            os.killpg(service.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while _alive(service) and time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.1)
    if proc is not None:
        proc.wait(timeout)


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.session.Session(
        aws_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=MOTO_CREDENTIALS["AWS_DEFAULT_REGION"],
    ).client("s3", endpoint_url=endpoint)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def client_env(s3: Service, mlflow: Service) -> dict:
    """What a shell (or a run) needs to use the services."""
    return {"MLFLOW_TRACKING_URI": mlflow.url, "AWS_ENDPOINT_URL": s3.url, **MOTO_CREDENTIALS}


# -- the command -----------------------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument(
        "action",
        choices=("up", "down", "status"),
        help="up: start both and print the environment to use them; down: "
        "stop them; status: say whether they answer",
    )
    parser.add_argument(
        "--dir",
        default=".services",
        help="state, logs and the MLflow database (default: .services)",
    )
    parser.add_argument(
        "--s3-port", type=int, default=0, help="port of the S3 server (default: a free port)"
    )
    parser.add_argument(
        "--mlflow-port",
        type=int,
        default=0,
        help="port of the MLflow server (default: a free port)",
    )
    parser.add_argument(
        "--bucket", default="vsgd", help="bucket created in the S3 server (default: vsgd)"
    )


def run(args) -> int:
    state_dir = Path(args.dir)
    return {"up": _up, "down": _down, "status": _status}[args.action](state_dir, args)


def _load(state_dir: Path) -> dict | None:
    try:
        state = json.loads((state_dir / "state.json").read_text())
    except FileNotFoundError:
        return None
    state["services"] = [Service(**s) for s in state["services"]]
    return state


def _up(state_dir: Path, args) -> int:
    state = _load(state_dir)
    if state and any(_alive(s) for s in state["services"]):
        print(
            f"services already up (see `python -m pipeline services status --dir {state_dir}`)",
            file=sys.stderr,
        )
        return 1
    s3, _ = start_s3(state_dir, args.s3_port)
    try:
        create_bucket(s3.url, args.bucket)
        mlflow, _ = start_mlflow(
            state_dir,
            args.mlflow_port,
            artifacts=f"s3://{args.bucket}/mlartifacts",
            s3_endpoint=s3.url,
            env=MOTO_CREDENTIALS,
        )
    except BaseException:
        stop(s3)
        raise
    env = client_env(s3, mlflow)
    (state_dir / "state.json").write_text(
        json.dumps(
            {"bucket": args.bucket, "env": env, "services": [asdict(s3), asdict(mlflow)]}, indent=2
        )
        + "\n"
    )
    exports = "".join(f"export {k}={v}\n" for k, v in env.items())
    (state_dir / "env.sh").write_text(exports)
    remote = f"s3://{args.bucket}/repro"
    print(
        f"S3 (moto, in memory) {s3.url}, bucket {args.bucket}; MLflow {mlflow.url} "
        f"(artifacts in s3://{args.bucket}/mlartifacts)\n\n"
        f"# in your shell (or `source {state_dir}/env.sh`):\n{exports}\n"
        f"# params.yaml:  storage: {{remote: {remote}, endpoint_url: {s3.url}}}\n"
        f"# DVC remote:   dvc remote add -d vsgd {remote}/dvc && "
        f"dvc remote modify vsgd endpointurl {s3.url}\n"
        f"# stop with:    python -m pipeline services down --dir {state_dir}"
    )
    return 0


def _recorded(state_dir: Path) -> dict | None:
    """The services `up` recorded in `state_dir`; None (said) when there are none."""
    state = _load(state_dir)
    if state is None:
        print(f"no services recorded in {state_dir}")
    return state


def _down(state_dir: Path, args) -> int:
    state = _recorded(state_dir)
    if state is None:
        return 0
    for service in reversed(state["services"]):
        stop(service)
        print(f"{service.name}: stopped (pid {service.pid})")
    (state_dir / "state.json").unlink()
    (state_dir / "env.sh").unlink(missing_ok=True)
    return 0


def _status(state_dir: Path, args) -> int:
    state = _recorded(state_dir)
    if state is None:
        return 3
    up = True
    for s in state["services"]:
        alive = _alive(s)
        up &= alive
        print(f"{s.name}: {'up' if alive else 'DOWN'} pid {s.pid} {s.url} (log {s.log})")
    return 0 if up else 1


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.services", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
