#!/bin/sh
# The in-cluster launcher's command (components/launcher): prepare the workspace, then
# `dvc repro train` with the kubernetes executor. Every start, the pipeline (dvc.yaml) and the
# code its stages declare as dependencies come from the image, params.yaml from the
# vsgd-params ConfigMap: a new image or a changed ConfigMap counts from the next start on,
# while results, prepared data and DVC's state stay in the workspace. Exit 78 (the Job's
# podFailurePolicy fails the Job without retries): a setup problem a retry cannot fix.
set -eu

workspace=${VSGD_WORKSPACE:-/workspace}
project=${VSGD_PROJECT:-/app/project}       # the image's copy of the project (Dockerfile)
params=${VSGD_PARAMS:-/etc/vsgd-params/params.yaml}

fail() {
    echo "launcher: $*" >&2
    exit 78
}

[ -f "$params" ] || fail "no params.yaml: create it from yours with
  kubectl -n vsgd create configmap vsgd-params --from-file=params.yaml"
cd "$workspace"
cp "$project/dvc.yaml" dvc.yaml
# DVC hashes these as the stages' dependencies; the code that runs is the installed package
# (PYTHONSAFEPATH keeps these copies off sys.path).
rm -rf vsgd pipeline
cp -R "$project/vsgd" "$project/pipeline" .
cp "$params" params.yaml

python - <<'PY' || exit $?
import sys
from pipeline.config import ConfigError, load_params
try:
    params = load_params("params.yaml")
except ConfigError as exc:
    print(f"launcher: params.yaml (ConfigMap vsgd-params):\n{exc}", file=sys.stderr)
    sys.exit(78)
problems = []
if (params.get("executor") or {}).get("kind") != "kubernetes":
    problems.append("executor.kind must be kubernetes: the launcher submits the runs as Jobs "
                    "(this pod has no GPU)")
endpoint = (params.get("storage") or {}).get("endpoint_url") or ""
if "localhost" in endpoint or "127.0.0.1" in endpoint:
    problems.append(f"storage.endpoint_url {endpoint} is this pod itself: set it to null (the "
                    "store is AWS_ENDPOINT_URL of the vsgd-endpoints ConfigMap)")
for problem in problems:
    print(f"launcher: params.yaml (ConfigMap vsgd-params): {problem}", file=sys.stderr)
sys.exit(78 if problems else 0)
PY

[ -d .dvc ] || dvc init --no-scm
# exec: dvc gets the pod's SIGTERM itself; the runs' Jobs go on, and the next pod adopts them.
exec dvc repro train
