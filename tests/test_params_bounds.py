"""Validation refuses every value that would later crash, hang or silently train the wrong
thing: non-finite numbers and integers beyond what torch and numpy take, tracking URIs
MLflow cannot track to, Kubernetes names and durations the API refuses, and params files
that cannot be read or expand without bound. Each refusal names its key path (or file) and
what is allowed, before any work."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.params_file import MAX_PARAMS_BYTES, MAX_YAML_NODES
from vsgd.spec import ConfigError, check_spec

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.fixture(autouse=True)
def no_tracking_uri_from_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def problems_of(overrides=(), path=PARAMS):
    # build_imported=False: an imported optimizer's values are checked without importing
    # torch, which is all these tests need.
    with pytest.raises(ConfigError) as info:
        load_params(path, overrides, build_imported=False)
    return info.value.problems


def params_file(tmp_path, **sections):
    """params.yaml with `sections` replacing its top-level keys."""
    raw = yaml.safe_load(PARAMS.read_text())
    raw.update(sections)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------------------------
# numbers


def test_a_nan_learning_rate_is_refused_before_training():
    assert "optimizer.vsgd.lr: nan is not a finite number; allowed: (0, inf)" in problems_of(
        ["optimizer.vsgd.lr=.nan"]
    )


def test_a_nan_step_lr_gamma_is_refused_before_training():
    assert (
        "protocol.cifar100.schedule.gamma: nan is not a finite number; allowed: (0, 1]"
        in problems_of(["protocol.cifar100.schedule.gamma=.nan"])
    )


def test_a_nan_tuning_budget_is_refused_before_it_crashes_the_grid():
    assert "tune.budget: nan is not a finite number; allowed: (0, 1]" in problems_of(
        ["tune.budget=.nan"]
    )


@pytest.mark.parametrize(
    "override, path",
    [
        ("optimizer.adam.betas=[.nan, 0.999]", "optimizer.adam.betas[0]"),
        ("optimizer.sgd.momentum=-.inf", "optimizer.sgd.momentum"),
        ("optimizer.adamw.weight_decay=.inf", "optimizer.adamw.weight_decay"),
        ("optimizer.vsgd.grid={lr: [0.1, .nan]}", "optimizer.vsgd.grid.lr[1]"),
        ("optimizer.adam.grid={betas: [[0.9, .inf]]}", "optimizer.adam.grid.betas[0][1]"),
        (
            "experiments=[{match: {optimizer: sgd}, optimizer: {lr: .inf}}]",
            "experiments[0].optimizer.lr",
        ),
        (
            "experiments=[{match: {dataset: cifar100}, schedule: {gamma: .nan}}]",
            "experiments[0].schedule.gamma",
        ),
        ("optimizer.vsgd.eps='nan'", "optimizer.vsgd.eps"),  # a string spelling NaN
    ],
)
def test_non_finite_hyperparameters_are_refused_wherever_a_number_is_checked(override, path):
    assert any(
        p.startswith(f"{path}: ") and "is not a finite number" in p for p in problems_of([override])
    ), problems_of([override])


def test_non_finite_values_of_an_imported_optimizer_are_refused():
    problems = problems_of(
        [
            "optimizers=[sgd, radam]",
            "optimizer.radam={class: 'torch.optim:RAdam', lr: .nan, betas: [0.9, .inf], "
            "grid: {lr: [0.001, -.inf]}}",
        ]
    )
    for path in ("optimizer.radam.lr", "optimizer.radam.betas[1]", "optimizer.radam.grid.lr[1]"):
        assert any(p.startswith(f"{path}: ") and "not a finite number" in p for p in problems), (
            path,
            problems,
        )


@pytest.mark.parametrize("seed", [2**32, 2**64])
def test_a_seed_beyond_numpy_range_is_refused(seed):
    problems = problems_of([f"seeds=[0, {seed}]", f"tune.seed={seed}"])
    assert f"seeds[1]: {seed} must be <= {2**32 - 1}" in problems
    assert f"tune.seed: {seed} must be <= {2**32 - 1}" in problems


@pytest.mark.parametrize(
    "override, path",
    [
        (f"protocol.cifar100.schedule.iterations={2**63}", "protocol.cifar100.schedule.iterations"),
        (f"training.eval_every={2**64}", "training.eval_every"),
        (f"data.synthetic_sizes.train={2**70}", "data.synthetic_sizes.train"),
        (f"timing.steps={2**63}", "timing.steps"),
    ],
)
def test_an_integer_beyond_int64_is_refused(override, path):
    assert any(
        p.startswith(f"{path}: ") and f"must be <= {2**63 - 1}" in p
        for p in problems_of([override])
    )


def test_a_run_spec_from_json_with_nan_infinity_or_a_huge_seed_is_refused():
    # What `python -m pipeline.train --spec-json` hands to check_spec: Python's json reads
    # NaN and Infinity.
    spec = json.loads(
        '{"optimizer": {"name": "adam", "lr": NaN, "betas": [0.9, Infinity]},'
        ' "schedule": {"iterations": 10, "step_size": 5, "gamma": -Infinity},'
        ' "seed": 18446744073709551616, "batch_size": 8}'
    )
    imported = json.loads(
        '{"optimizer": {"name": "radam", "class": "torch.optim:RAdam", '
        '"package": "torch==2.14.1", "lr": NaN}}'
    )
    problems = check_spec(spec) + check_spec(imported)
    for path in ("optimizer.lr", "optimizer.betas[1]", "schedule.gamma"):
        assert any(p.startswith(f"{path}: ") and "not a finite number" in p for p in problems), (
            path,
            problems,
        )
    assert f"seed: {2**64} must be <= {2**32 - 1}" in problems
    assert "optimizer.lr: nan is not a finite number" in problems


# ---------------------------------------------------------------------------------------------
# tracking


@pytest.mark.parametrize(
    "uri",
    [
        "not a uri",
        "localhost:5000",
        "mlflow.db",
        "htp://host:5000",
        "http://",
        "s3://bucket/mlflow",
    ],
)
def test_a_tracking_uri_without_a_supported_scheme_is_refused(uri):
    [problem] = [
        p for p in problems_of([f"tracking.uri={uri!r}"]) if p.startswith("tracking.uri: ")
    ]
    assert repr(uri) in problem and "sqlite" in problem and "http" in problem


@pytest.mark.skipif(
    not Path("/proc").is_dir(),
    reason="needs /proc, a directory no one can create files in (permission bits do not stop root)",
)
def test_an_unwritable_sqlite_directory_is_refused():
    [problem] = [
        p
        for p in problems_of(["tracking.uri=sqlite:////proc/mlflow.db"])
        if p.startswith("tracking.uri: ")
    ]
    assert "cannot create the database in '/proc'" in problem


def test_a_sqlite_database_in_a_missing_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are relative to here, as for MLflow
    [problem] = [
        p
        for p in problems_of(["tracking.uri=sqlite:///missing/mlflow.db"])
        if p.startswith("tracking.uri: ")
    ]
    assert "'missing' does not exist" in problem
    (tmp_path / "missing").mkdir()
    assert (
        load_params(PARAMS, ["tracking.uri=sqlite:///missing/mlflow.db"], build_imported=False)[
            "tracking"
        ]["uri"]
        == "sqlite:///missing/mlflow.db"
    )
    assert not list((tmp_path / "missing").iterdir())  # the check leaves nothing behind


def test_a_bad_mlflow_tracking_uri_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "localhost:5000")
    [problem] = problems_of()
    assert problem.startswith(
        "MLFLOW_TRACKING_URI (environment variable, overrides "
        "tracking.uri): 'localhost:5000' has scheme 'localhost'"
    )


def test_a_null_tracking_uri_means_untracked_and_is_allowed():
    assert (
        load_params(PARAMS, ["tracking.uri=null"], build_imported=False)["tracking"]["uri"] is None
    )


# ---------------------------------------------------------------------------------------------
# Kubernetes


def k8s_problems(section, **params):
    return problems_of(
        [f"executor.kubernetes={json.dumps(section)}"]
        + [f"{k}={json.dumps(v)}" for k, v in params.items()]
    )


@pytest.mark.parametrize(
    "section, path",
    [
        ({"namespace": "vsgd\n"}, "namespace"),
        ({"service_account": "runner\n"}, "service_account"),
        ({"credentials_secret": "creds\n"}, "credentials_secret"),
        ({"endpoints_config_map": "endpoints\n"}, "endpoints_config_map"),
        ({"priority_class": "low\n"}, "priority_class"),
        ({"image_pull_secrets": ["regcred", "regcred\n"]}, "image_pull_secrets[1]"),
        ({"owner": "me\n"}, "owner"),
        ({"labels": {"/team": "ml"}}, "labels./team"),  # an empty prefix
        ({"labels": {"team\n": "ml"}}, "labels.team\n"),
        ({"labels": {"team": "ml\n"}}, "labels.team"),
        ({"annotations": {"/note": "x"}}, "annotations./note"),
        ({"annotations": {"note\n": "x"}}, "annotations.note\n"),
        ({"node_selector": {"pool": "gpu\n"}}, "node_selector.pool"),
        ({"node_selector": {"/pool": "gpu"}}, "node_selector./pool"),
        ({"tolerations": [{"key": "gpu", "value": "B C"}]}, "tolerations[0].value"),
        ({"tolerations": [{"key": "gpu", "value": "v" * 64}]}, "tolerations[0].value"),
        ({"tolerations": [{"key": "gpu", "value": "-v"}]}, "tolerations[0].value"),
        ({"tolerations": [{"key": "gpu", "value": "v_"}]}, "tolerations[0].value"),
        ({"tolerations": [{"key": "/gpu", "operator": "Exists"}]}, "tolerations[0].key"),
        ({"gpu_resource": "-nvidia.com/gpu"}, "gpu_resource"),  # a leading dash
        ({"gpu_resource": "a" * 254 + "/gpu"}, "gpu_resource"),  # a 254-character prefix
        ({"gpu_resource": "nvidia.com/gpu\n"}, "gpu_resource"),
        ({"image_repository": "registry.example.com/vsgd\n"}, "image_repository"),
    ],
)
def test_kubernetes_names_the_api_refuses_are_refused(section, path):
    problems = k8s_problems(section)
    assert any(
        p.startswith(f"executor.kubernetes.{path}: ") and "allowed" in p for p in problems
    ), problems


@pytest.mark.parametrize(
    "key", ["progress_interval", "outage_budget", "start_grace", "unschedulable_limit"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, 2.0**40])
def test_a_nan_duration_is_refused(key, value):
    problems = k8s_problems({key: value})
    assert any(
        p.startswith(f"executor.kubernetes.{key}: ") and "2147483647" in p for p in problems
    ), problems


@pytest.mark.parametrize(
    "section, path, most",
    [
        ({"backoff_limit": 2**31}, "backoff_limit", 2**31 - 1),
        ({"ttl_seconds_after_finished": 2**31}, "ttl_seconds_after_finished", 2**31 - 1),
        ({"active_deadline_seconds": 2**63}, "active_deadline_seconds", 2**63 - 1),
        ({"log_tail_lines": 2**63}, "log_tail_lines", 2**63 - 1),
        (
            {"tolerations": [{"key": "gpu", "operator": "Exists", "tolerationSeconds": 2**63}]},
            "tolerations[0].tolerationSeconds",
            2**63 - 1,
        ),
    ],
)
def test_kubernetes_integers_beyond_their_api_field_are_refused(section, path, most):
    assert f"executor.kubernetes.{path}: {most + 1} must be <= {most}" in k8s_problems(section)


def test_a_nan_environment_value_is_refused():
    assert any(
        p.startswith("executor.kubernetes.env: ")
        for p in problems_of(["executor.kubernetes={env: {SCALE: .nan}}"])
    )


def test_annotations_beyond_the_apis_total_size_are_refused():
    # Within a --set value's own bound, but not with the pipeline's annotations added.
    problems = k8s_problems({"annotations": {"notes": "x" * (256 * 1024 - 200)}})
    assert any(
        p.startswith("executor.kubernetes.annotations: the Job's annotations would total")
        and "262144" in p
        for p in problems
    ), problems


# ---------------------------------------------------------------------------------------------
# reading the params file


def billion_laughs(levels=9, width=9):
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nseeds: *l{levels - 1}\n"


def test_exponential_yaml_aliases_are_refused_quickly(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text() + billion_laughs())  # 9**9 values once expanded
    start = time.monotonic()
    [problem] = problems_of(path=path)
    assert time.monotonic() - start < 5
    assert problem.startswith(
        f"{path}: more than {MAX_YAML_NODES} values with its aliases expanded"
    )


def test_exponential_yaml_aliases_in_a_set_value_are_refused_quickly():
    start = time.monotonic()
    [problem] = problems_of(["seeds=" + billion_laughs().replace("\n", ", ").join("{}")])
    assert time.monotonic() - start < 5 and "aliases expanded" in problem


def test_a_value_that_contains_itself_is_refused():
    # Validation of an imported optimizer by form alone would let it through; the run hash's
    # JSON would then fail on the circular reference.
    [problem] = problems_of(
        [
            "optimizers=[sgd, radam]",
            "optimizer.radam={class: 'torch.optim:RAdam', lr: 0.001, betas: &b [0.9, *b]}",
        ]
    )
    assert "refers to a node that contains it" in problem


def test_a_params_directory_is_a_config_error(tmp_path):
    assert problems_of(path=tmp_path) == [f"{tmp_path}: is a directory; expected a YAML file"]


def test_a_non_utf8_params_file_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(PARAMS.read_bytes() + "# r\xe9sum\xe9\n".encode("latin-1"))
    [problem] = problems_of(path=path)
    assert problem.startswith(f"{path}: not UTF-8 text") and "\\xe9" in problem


def test_an_oversized_params_file_is_refused_with_its_size_and_the_bound(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text() + "#" * MAX_PARAMS_BYTES + "\n")
    size = path.stat().st_size
    assert problems_of(path=path) == [
        f"{path}: {size} bytes; allowed: at most {MAX_PARAMS_BYTES} bytes (256 KiB)"
    ]


def test_deeply_nested_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text() + "deep: " + "[" * 1000 + "]" * 1000 + "\n")
    assert problems_of(path=path) == [f"{path}: nested too deeply to be params"]


def test_a_yaml_integer_python_cannot_build_is_a_config_error():
    [problem] = problems_of(["seeds=[" + "1" * 5000 + "]"])
    assert problem.startswith("override 'seeds=[111") and "4300 digits" in problem


def test_validate_lists_every_problem_with_its_key_path_and_exits_78(tmp_path):
    path = params_file(
        tmp_path,
        seeds=[0, 2**64],
        tune={"enabled": True, "budget": math.nan, "validation_size": 5000, "seed": 0},
        tracking={"uri": "localhost:5000", "experiment": "vsgd-repro"},
        executor={
            "kind": "local",
            "max_parallel": None,
            "kubernetes": {
                "outage_budget": math.inf,
                "namespace": "ML_Jobs",
                "labels": {"/team": "ml"},
            },
        },
    )
    raw = yaml.safe_load(path.read_text())
    raw["optimizer"]["vsgd"]["lr"] = math.nan
    path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", "--params", str(path)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 78, proc.stderr
    assert "Traceback" not in proc.stderr
    for path in (
        "seeds[1]",
        "tune.budget",
        "optimizer.vsgd.lr",
        "tracking.uri",
        "executor.kubernetes.outage_budget",
        "executor.kubernetes.namespace",
        "executor.kubernetes.labels./team",
    ):
        assert f"  - {path}: " in proc.stderr, (path, proc.stderr)
