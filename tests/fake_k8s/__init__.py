"""A small in-memory Kubernetes API server speaking real HTTP, for the executor tests.

Implements what the kubernetes executor and `kubectl apply -f <job>` use: discovery (/api,
/apis, /version, OpenAPI v3 for batch/v1), Jobs (create, dry-run create, get, list, watch,
patch, delete with a propagationPolicy and preconditions), pods (list, get, pods/log),
events (list with a fieldSelector), namespaces, ServiceAccounts, Secrets, ConfigMaps and
ResourceQuotas (read only), and SelfSubjectAccessReviews. Watches stream chunked JSON events
from a resourceVersion, send BOOKMARKs, answer 410 Gone (an ERROR event, like the real watch
cache) once history is compacted or expired mid-stream, and can be cut off. Any request can
be made to fail (`outage`: 5xx, 429, a connection reset, or the port refusing connections).

As strict as a real API server where the executor depends on it: a Job create, dry run or
not, is validated and goes through admission (NamespaceLifecycle, Pod Security warnings,
webhooks, ResourceQuota) before the name is checked; RBAC (`bind_role`) honours a Role's
namespace and `resourceNames` (`denied` removes single rights); the log of a container that
has not started is a 400; lists come back ordered by namespace and name.

There is no controller: tests drive Jobs and pods with the helper methods (`start_pod`,
`complete`, `fail`, `finalize`, `admit`, `refuse_pods`, `unschedulable_pod`, `delete_job`,
...), or `on_create` hooks. Only API behaviour that tests rely on is modelled, and where it
is, a comment cites the Kubernetes documentation it follows. Time is a `ScaledClock`'s
(`clock.py`): real time by default, faster where the tests give one.

By concern: `store` (objects, history, faults, serving), `policy` (RBAC, Pod Security,
ResourceQuota), `scenario` (what the controllers and the kubelet would do), `handler` (HTTP:
routing, reads, lists, watches), `job_writes` (Job create, delete, patch), `selectors`
(label and field selectors, patches), `objects` (object shapes), `discovery`.
"""

from .clock import REAL_TIME, ScaledClock
from .policy import Policy
from .scenario import Scenario
from .store import Store


class FakeKube(Scenario, Policy, Store):
    """The test API server: `FakeKube(clock=REAL_TIME)`, then `start()` -> its URL,
    `kubeconfig(url)`, the scenario helpers, `stop()`."""


__all__ = ["REAL_TIME", "FakeKube", "ScaledClock"]
