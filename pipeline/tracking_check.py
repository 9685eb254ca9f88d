"""The tracking URI's checks (params.yaml's `tracking.uri`, and MLFLOW_TRACKING_URI which
overrides it): a scheme MLflow's own registry of tracking stores knows, a host for http(s),
and for SQLite a directory that exists and takes a new file. Found now rather than by a run
that stalls, then trains untracked."""

import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from vsgd.tracking import tracking_uri

from .redact import redact

TRACKING_ENV = "MLFLOW_TRACKING_URI (environment variable, overrides tracking.uri)"


def check_tracking(c, configured):
    """`tracking.uri`: null (untracked, unless the environment names one) or a URI MLflow has
    a tracking store for; and the URI the runs will use (vsgd.tracking.tracking_uri: the
    environment's, else this one) must work here: an SQLite database needs a directory it
    can be created in. Found now, not after a run's first minutes of retries."""
    if configured is not None and not c.string(configured, "tracking.uri"):
        return
    overriding = tracking_uri(None)  # the environment's URI, when one is set
    if configured is None and overriding is None:
        return  # untracked: nothing to ask MLflow about
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        from mlflow.utils.uri import (
            _DATABRICKS_UNITY_CATALOG_SCHEME,
            _OSS_UNITY_CATALOG_SCHEME,
            get_uri_scheme,
        )
    except ImportError:
        return
    # MLflow's own registry of tracking stores (built-in and plugins), less its scheme-less
    # entry (a bare path becomes a file store directory; here it is nearly always a URI
    # mistyped, `mlflow.db` for `sqlite:///mlflow.db`) and Unity Catalog's (whose store this
    # client refuses to build).
    usable = [
        s
        for s in _tracking_store_registry._registry
        if s and s not in (_DATABRICKS_UNITY_CATALOG_SCHEME, _OSS_UNITY_CATALOG_SCHEME)
    ]

    def problem(uri, check_files):
        allowed = (
            f"allowed: null, or a URI with a scheme MLflow tracks to "
            f"({', '.join(usable)}), e.g. sqlite:///mlflow.db or http://host:5000"
        )
        try:
            # A bare "databricks" is the default profile's workspace (MLflow's special case).
            scheme = uri if uri == "databricks" else get_uri_scheme(uri)
        except MlflowException as exc:
            return f"{uri!r} is not a tracking URI ({exc.message}); {allowed}"
        if scheme not in usable:
            return f"{uri!r} has {f'scheme {scheme!r}' if scheme else 'no scheme'}; {allowed}"
        if scheme in ("http", "https") and not _url_host(uri):
            return f"{uri!r} names no host; {allowed}"
        if scheme == "sqlite" and check_files:
            return _sqlite_problem(uri)
        return None

    # The file's value is checked in form always; its files only when it is the one in use.
    # A URI may carry a password (http://user:password@host): masked in what is shown.
    if configured is not None and (found := problem(configured, overriding is None)):
        c.problem(redact(f"tracking.uri: {found}"))
    if overriding is not None and (found := problem(overriding, True)):
        c.problem(redact(f"{TRACKING_ENV}: {found}"))


def _url_host(uri: str) -> str | None:
    try:
        return urlsplit(uri).hostname
    except ValueError:  # a malformed port or IPv6 address
        return None


def _sqlite_problem(uri: str) -> str | None:
    """An SQLite tracking store's file: SQLAlchemy's reading of the URI (what MLflow hands
    it), relative to the current directory as SQLite opens it; the file need not exist, but
    its directory must, and must take a new file (SQLite creates the database and its
    journal there)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(uri).database
    except ArgumentError as exc:
        return f"{uri!r} is not an SQLite URI ({exc})"
    if database in (None, "", ":memory:"):
        return (
            f"{uri!r} is an in-memory database, gone with each run's process; allowed: "
            "sqlite:///PATH (relative to the current directory) or sqlite:////ABSOLUTE"
        )
    path = Path(database)
    directory = path.parent
    if not directory.is_dir():
        return (
            f"{uri!r}: the database's directory {str(directory)!r} does not exist "
            f"(relative paths are from the current directory, {Path.cwd()}); create it "
            "or name another"
        )
    if path.exists() and not path.is_file():
        return f"{uri!r}: {str(path)!r} exists and is not a file"
    try:
        # The real test: permission bits do not tell (root, read-only mounts, /proc).
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return (
            f"{uri!r}: cannot create the database in {str(directory)!r} "
            f"({exc.strerror or exc}); name a writable directory"
        )
    return None
