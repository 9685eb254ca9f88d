"""What one run's pod counts against a ResourceQuota, as the quota admission counts it
(https://kubernetes.io/docs/concepts/policy/resource-quotas/), and which quotas count it at all
(scopes). The preflight's use of it against the test API server: tests/test_k8s_refusals.py."""

import pytest

from pipeline.k8s.pod_quota import applies, check, pod_usage

GPU = "nvidia.com/gpu"


def pod(**extra):
    """One container as the Job template has it: requests, and a memory and GPU limit."""
    return {
        "containers": [
            {
                "name": "train",
                "resources": {
                    "requests": {"cpu": "4", "memory": "16Gi"},
                    "limits": {"memory": "16Gi", GPU: "1"},
                },
            }
        ],
        **extra,
    }


def quota(name, hard, used=None, scopes=None, selector=None):
    spec = {"hard": hard}
    if scopes:
        spec["scopes"] = scopes
    if selector:
        spec["scopeSelector"] = {"matchExpressions": selector}
    return {"metadata": {"name": name}, "spec": spec, "status": {"used": used or {}}}


def test_usage_counts_requests_limits_and_bare_names_with_a_limit_as_the_request():
    usage = pod_usage(pod())
    assert usage["pods"] == usage["count/pods"] == 1
    assert usage["requests.cpu"] == usage["cpu"] == 4
    assert usage["requests.memory"] == usage["memory"] == usage["limits.memory"] == 16 * 2**30
    assert usage[f"requests.{GPU}"] == 1  # a limit without a request is also the request
    assert "limits.cpu" not in usage and GPU not in usage  # no bare name for a GPU


def test_usage_takes_the_largest_init_container_and_sums_sidecars_and_overhead():
    spec = pod(
        initContainers=[
            {"name": "fetch", "resources": {"requests": {"cpu": "6"}}},
            {"name": "proxy", "restartPolicy": "Always", "resources": {"requests": {"cpu": 1}}},
        ],
        overhead={"cpu": "250m"},
    )
    # Containers and the sidecar run together: 4 + 1; the init container alone before: 6.
    assert pod_usage(spec)["requests.cpu"] == pytest.approx(6.25)


@pytest.mark.parametrize(
    "scopes, selector, extra, counted",
    [
        (None, None, {}, True),
        (["Terminating"], None, {}, False),  # the Job's deadline is not the pod's
        (["NotTerminating", "NotBestEffort"], None, {}, True),
        (["BestEffort"], None, {}, False),
        (None, [{"scopeName": "PriorityClass", "operator": "In", "values": ["high"]}], {}, False),
        (
            None,
            [{"scopeName": "PriorityClass", "operator": "In", "values": ["high"]}],
            {"priorityClassName": "high"},
            True,
        ),
        (None, [{"scopeName": "PriorityClass", "operator": "DoesNotExist"}], {}, True),
        (["CrossNamespacePodAffinity"], None, {}, False),
        (["Terminating"], None, {"activeDeadlineSeconds": 60}, True),
    ],
)
def test_a_scoped_quota_counts_only_the_pods_it_matches(scopes, selector, extra, counted):
    assert applies(quota("q", {}, scopes=scopes, selector=selector), pod(**extra)) is counted


def test_check_tells_a_pod_beyond_a_hard_limit_from_a_quota_full_now():
    quotas = [
        quota("memory", {"requests.memory": "8Gi"}),
        quota("gpus", {f"requests.{GPU}": "2", "pods": "10"}, used={f"requests.{GPU}": "2"}),
        quota("cpu", {"cpu": "64"}, used={"cpu": "60"}),  # room for this pod: 60 + 4
        quota("other", {f"requests.{GPU}": "0"}, scopes=["BestEffort"]),  # not this pod's
    ]
    beyond, full = check(quotas, pod())
    assert beyond == ["memory: requests.memory 16Gi asked, hard limit 8Gi"]
    assert full == [f"gpus: requests.{GPU} 1 asked, 2 of 2 in use"]
