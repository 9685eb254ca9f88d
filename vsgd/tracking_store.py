"""The tracking store a run logs to, made ready once: a SQLite store is created (MLflow's
schema migrations) and its experiment found or created under a file lock next to the
database (`ensure_tracking_store`): parallel runs, or two stages started at once, would
otherwise run the migrations together and fail."""

import contextlib

from filelock import FileLock

DEFAULT_EXPERIMENT = "vsgd-repro"
# How long a process waits for another one creating the same SQLite store; past it the
# attempt fails like any other tracking outage and is retried.
STORE_LOCK_TIMEOUT = 120.0


def ensure_tracking_store(uri: str, experiment: str = DEFAULT_EXPERIMENT, *, client=None) -> str:
    """Open the tracking store at `uri` and get or create `experiment`; its id.

    Safe when several processes start at once: for a SQLite URI the store is opened (which
    creates and migrates a fresh database) and the experiment created while holding a file
    lock, `<database>.lock`; without it two processes run MLflow's schema migrations
    together and fail ("duplicate column name"). An experiment another process creates
    meanwhile (a server, or a lock that timed out) is found instead. `client`: an
    MlflowClient already open on `uri` (the tracker's).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with _store_lock(uri):
        client = client or MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(experiment)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return client.get_experiment_by_name(experiment).experiment_id


def _store_lock(uri: str):
    """The file lock guarding the creation of the SQLite database of `uri`; no lock for
    other stores (a server serialises its own) or an in-memory database."""
    if not uri.startswith("sqlite:"):
        return contextlib.nullcontext()
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return contextlib.nullcontext()
    return FileLock(f"{database}.lock", timeout=STORE_LOCK_TIMEOUT)
