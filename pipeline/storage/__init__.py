"""Where a run's bytes live when it shares no disk with its launcher.

One small object-store interface (`S3Store` over boto3 for any S3-compatible service,
`LocalStore` over a directory) and three uses of it (docs/ARCHITECTURE.md, "Remote storage"):

* data staging: prepared datasets are content-addressed in DVC's remote layout, so `dvc push`
  and `push_dataset` write the same objects and `stage_dataset` fetches them by hash into local
  scratch once, verified (md5 per file as DVC does, then the manifest's sha256s);
* checkpoints: `S3CheckpointStore` uploads a checkpoint completely, verifies it, then publishes
  it by writing a small pointer object last, so a reader never sees a partial checkpoint;
* results: `publish_result` copies a finished run's files to `<remote>/results/<run_hash>/`,
  `find_result` / `fetch_result` look a run up by hash (the store, then MLflow).

Credentials come only from boto3's standard chain (AWS_* variables, profiles, pod identity);
the endpoint from the caller (params.yaml `storage.endpoint_url`), else AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL / the profile. Every object we upload carries its sha256 as metadata, checked
after every download; a mismatch deletes the download and raises `IntegrityError`.
"""

from .checkpoints import S3CheckpointStore, open_checkpoint_store
from .datasets import (
    DVC_FILES,
    DVC_PREFIX,
    dataset_uri,
    dvc_dir_hash,
    dvc_remote,
    dvc_tree,
    push_dataset,
    scratch_root,
    split_dataset_uri,
    stage_data,
    stage_dataset,
)
from .objects import (
    IntegrityError,
    LocalStore,
    MiB,
    S3Store,
    endpoint_from_env,
    open_store,
    s3_client,
    split_s3,
)
from .results import (
    RESULT_FILES,
    RESULTS_PREFIX,
    Result,
    fetch_result,
    find_result,
    publish_result,
    results_uri,
    run_env,
)

__all__ = [
    "DVC_FILES",
    "DVC_PREFIX",
    "RESULTS_PREFIX",
    "RESULT_FILES",
    "IntegrityError",
    "LocalStore",
    "MiB",
    "Result",
    "S3CheckpointStore",
    "S3Store",
    "dataset_uri",
    "dvc_dir_hash",
    "dvc_remote",
    "dvc_tree",
    "endpoint_from_env",
    "fetch_result",
    "find_result",
    "open_checkpoint_store",
    "open_store",
    "publish_result",
    "push_dataset",
    "results_uri",
    "run_env",
    "s3_client",
    "scratch_root",
    "split_dataset_uri",
    "split_s3",
    "stage_data",
    "stage_dataset",
]
