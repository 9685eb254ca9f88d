"""What a run was trained on, in MLflow's own terms (so its UI shows it): the prepared
dataset as the run's dataset input (`dataset_input`), the code's commit (`git_commit`) and the
entry point that ran it (`entry_point`); and URLs without their `user:password@` part
(`without_userinfo`), the one rule for what of a location may be recorded."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from .spec import TRAINING_DEFAULTS

URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# The commit the training image was built from (the image sets it; a checkout has git).
GIT_COMMIT_ENV = "VSGD_GIT_COMMIT"
# MLflow keeps a dataset digest in a 36-character column (MAX_DATASET_DIGEST_SIZE); the
# manifest checksum is a 64-hex sha256, so its prefix is the digest and the whole checksum
# goes into the dataset's profile and the run's `data_checksum` tag.
DIGEST_CHARS = 36


def without_userinfo(text: str) -> str:
    return URL_USERINFO.sub("", text)


def git_commit() -> str:
    """The commit of the code being run (the MLflow tag `mlflow.source.git.commit`):
    $VSGD_GIT_COMMIT (an image has no .git), else the checkout around this package, else
    "unknown"."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def entry_point() -> str:
    """What was run, as MLflow's `mlflow.source.name`: the module of `python -m`
    (`pipeline.train`), else the script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "unknown"


def dataset_input(spec: dict):
    """The run's dataset input (an `mlflow.entities.DatasetInput`): the prepared dataset as
    the run trains on it; None when the spec has no checksum or no location for it.

    name: the dataset; digest: the manifest checksum's first DIGEST_CHARS; source: where the
    run got it, `data.uri` (a pod staged it from the DVC remote) or the prepared directory,
    with the manifest's origin (official or synthetic) and its archive's URL; profile: the
    whole checksum and the split sizes. MLflow keeps one source and profile per name and
    digest in an experiment (the first run's); the input's tags are the run's own: the
    context and how many training images it holds out for validation.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    data = spec.get("data") or {}
    checksum, uri = data.get("checksum"), data.get("uri")
    if not checksum or not (uri or data.get("dir")):
        return None
    scheme = urlparse(uri).scheme if uri else ""
    if scheme and scheme != "file":
        location, source_type = uri, scheme  # s3://: the DVC remote's listing
    else:
        # A path is shown absolute: a relative one means nothing away from its directory.
        location = uri if scheme else os.path.abspath(uri or data["dir"])
        source_type = "local"
    manifest = _manifest(data.get("dir"))
    source = {
        "uri": without_userinfo(location),
        "origin": data.get("source") or manifest.get("source"),
    }
    if (manifest.get("archive") or {}).get("url"):
        source["archive"] = without_userinfo(manifest["archive"]["url"])
    profile = {
        "checksum": checksum,
        "counts": manifest.get("counts"),
        "image_shape": manifest.get("image_shape"),
        "classes": len(manifest["classes"]) if manifest.get("classes") else None,
    }
    training = {**TRAINING_DEFAULTS, **(spec.get("training") or {})}
    dataset = Dataset(
        name=spec["dataset"],
        digest=checksum[:DIGEST_CHARS],
        source_type=source_type,
        source=json.dumps(source),
        profile=json.dumps({k: v for k, v in profile.items() if v is not None}),
    )
    return DatasetInput(
        dataset,
        tags=[
            InputTag(MLFLOW_DATASET_CONTEXT, "training"),
            InputTag("validation_size", str(training["validation_size"])),
        ],
    )


def _manifest(directory) -> dict:
    """The prepared directory's manifest; {} where there is none to read (the trainer has
    already checked it against the spec's checksum)."""
    try:
        return json.loads((Path(directory) / "manifest.json").read_text())
    except (TypeError, OSError, ValueError):
        return {}
