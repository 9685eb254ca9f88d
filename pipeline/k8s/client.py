"""Talking to the Kubernetes API: the official client configured from a kubeconfig (a laptop)
or the pod's service account (in the cluster), what an API error says, and calls retried
through an outage for up to a budget of seconds.

Nothing is lost to an API outage: a call that meets a refused or reset connection, a 5xx or a
429 is retried with backoff (honouring Retry-After, as API Priority and Fairness sends it),
and only after `outage_budget` seconds without one successful call does the launcher leave
(`Detached`): the Jobs keep running and the next start adopts them. The retries are ours, not
urllib3's, which would multiply them. Time is a `Clock`'s: real time unless the caller gives
another (the tests run theirs faster).
"""

import json
import os
import re
import time
from dataclasses import dataclass

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ..contract import Detached
from .names import parse_quantity

REQUEST_TIMEOUT = (10, 60)  # connect, read seconds for ordinary API calls
TRANSIENT = (429, 500, 502, 503, 504)
MAX_BACKOFF = 30  # seconds between retries during an outage
# The ResourceQuota admission plugin's refusal (a 403 Forbidden), in its words.
# https://kubernetes.io/docs/concepts/policy/resource-quotas/
QUOTA_REFUSAL = re.compile(
    r"exceeded quota: (?P<quota>[^,]+), "
    r"requested: (?P<requested>\S*), used: (?P<used>\S*), "
    r"limited: (?P<limited>\S*)"
)


class Clock:
    """What the launcher measures and waits with: grace periods, the outage budget, backoff."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = Clock()


class KubernetesError(Exception):
    """The cluster cannot be used at all (no config, no rights to watch, ...)."""


def connect(context=None) -> client.ApiClient:
    """API client from the kubeconfig (laptop) or, failing that, the pod's service account."""
    configuration = client.Configuration()
    try:
        # KUBECONFIG read now: the client's default is read once, when it is imported.
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None,
            context=context,
            client_configuration=configuration,
        )
    except config.ConfigException as kube_error:
        if context:
            raise KubernetesError(f"kubeconfig context {context!r}: {kube_error}") from None
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise KubernetesError(
                f"no Kubernetes configuration: {kube_error}; set KUBECONFIG (or "
                f"~/.kube/config), or run inside the cluster"
            ) from None
    # Retries are ours (with the outage budget); urllib3's own would multiply them.
    configuration.retries = False
    return client.ApiClient(configuration)


class Outage:
    """How long the API has been unreachable without a single successful call."""

    def __init__(self, budget, say, clock=SYSTEM_CLOCK):
        self.budget, self._say, self._clock = float(budget), say, clock
        self.since = None

    def ok(self):
        if self.since is not None:
            self._say(
                f"Kubernetes API reachable again after {self._clock.monotonic() - self.since:.0f} s"
            )
        self.since = None

    def failed(self, what) -> float:
        """Note a failed call; the seconds left of the budget (Detached when none)."""
        now = self._clock.monotonic()
        if self.since is None:
            self.since = now
            self._say(
                f"Kubernetes API unreachable ({what}); retrying for up to "
                f"{self.budget:.0f} s (executor.kubernetes.outage_budget)"
            )
        left = self.budget - (now - self.since)
        if left <= 0:
            raise Detached(
                f"the Kubernetes API has been unreachable for {now - self.since:.0f} "
                f"s (last: {what})"
            )
        return left


class Api:
    """The client and the API groups the launcher uses. With an `outage_budget`, every `call`
    is retried through an outage (connection refused or reset, 5xx, 429 with its
    Retry-After) for up to that many seconds, then `Detached`; without one, once. Other
    ApiExceptions (404, 403, 409, ...) propagate."""

    def __init__(
        self,
        context=None,
        *,
        outage_budget=None,
        say=print,
        clock=SYSTEM_CLOCK,
        request_timeout=REQUEST_TIMEOUT,
    ):
        self.client = connect(context)
        self.batch = client.BatchV1Api(self.client)
        self.core = client.CoreV1Api(self.client)
        self.auth = client.AuthorizationV1Api(self.client)
        self.clock = clock
        self.request_timeout = request_timeout
        self.outage = None if outage_budget is None else Outage(outage_budget, say, clock)

    def call(self, fn, *args, **kwargs):
        if self.request_timeout is not None:
            kwargs.setdefault("_request_timeout", self.request_timeout)
        if self.outage is None:
            return fn(*args, **kwargs)
        delay = 1
        while True:
            try:
                result = fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status not in TRANSIENT:
                    self.outage.ok()
                    raise
                wait, what = retry_after(exc) or delay, f"{exc.status} {exc.reason}"
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                wait, what = delay, f"{type(exc).__name__}: {short(exc)}"
            else:
                self.outage.ok()
                return result
            self.wait_out(what, wait)
            delay = min(delay * 2, MAX_BACKOFF)

    def wait_out(self, what: str, wait: float) -> None:
        """A failed call (`what`), counted against the outage budget (Detached when it is
        spent), then a wait of `wait` seconds, within what is left and MAX_BACKOFF."""
        left = self.outage.failed(what)
        self.clock.sleep(min(wait, left, MAX_BACKOFF))

    def to_dict(self, obj) -> dict:
        """A client model as the plain dict the API sent (camelCase keys)."""
        return self.client.sanitize_for_serialization(obj)

    def read_job(self, name: str, namespace: str) -> dict | None:
        """The Job of that name, whoever's it is; None if there is none."""
        try:
            return self.to_dict(self.call(self.batch.read_namespaced_job, name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_job(self, name: str, namespace: str, uid: str) -> bool:
        """Delete Job `name` with its pods (Background: the API's default for Jobs would
        leave them running) if it is still the Job with `uid`: one created anew meanwhile
        under the name is not the one meant. False when it was gone or replaced."""
        try:
            self.call(
                self.batch.delete_namespaced_job,
                name,
                namespace,
                body=client.V1DeleteOptions(
                    propagation_policy="Background", preconditions=client.V1Preconditions(uid=uid)
                ),
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True


# -- what an API error says -----------------------------------------------------------------


def retry_after(exc: ApiException) -> float | None:
    """Seconds from a 429's (or 503's) Retry-After header, as API Priority and Fairness
    sends it."""
    value = (exc.headers or {}).get("Retry-After") if exc.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def short(exc) -> str:
    """The first line of an exception's text, at most 200 characters."""
    text = str(exc).splitlines()[0] if str(exc) else repr(exc)
    return text[:200]


def error_status(exc: ApiException) -> dict:
    """The Status object of an error answer ({} for a body that is none, e.g. a 429's)."""
    try:
        status = json.loads(exc.body or "{}")
    except (ValueError, TypeError):
        return {}
    return status if isinstance(status, dict) else {}


def status_message(exc: ApiException) -> str:
    """What the API server said: the Status message, else the body, else the reason."""
    return error_status(exc).get("message") or (exc.body or "").strip() or exc.reason or ""


def api_error(exc: ApiException, doing: str) -> str:
    """One line from an API error: the Status message the server sent, plus a hint."""
    message = status_message(exc)
    reason = error_status(exc).get("reason") or exc.reason
    text = f"API error {doing}: {exc.status} {reason}: {message}"
    if exc.status == 403 and "quota" in str(message):
        text += " (a ResourceQuota of the namespace is full: wait for running Jobs or raise it)"
    elif exc.status == 403:
        text += " (the launcher lacks rights: see the Role in k8s/base/launcher-rbac.yaml)"
    elif exc.status == 401:
        text += " (credentials of the kubeconfig rejected or expired)"
    return text


@dataclass
class QuotaRefusal:
    """A create refused by a ResourceQuota: its name and the amounts of the resources it
    would have exceeded (resource name -> quantity text)."""

    quota: str
    requested: dict
    used: dict
    limited: dict

    @property
    def beyond(self) -> list[str]:
        """The resources one such object alone asks more of than the quota ever allows: no
        amount of waiting admits it."""
        return [
            k
            for k, v in self.requested.items()
            if k in self.limited and parse_quantity(v) > parse_quantity(self.limited[k])
        ]

    def amounts(self, what) -> str:
        return ",".join(f"{k}={v}" for k, v in getattr(self, what).items())


def quota_refusal(exc: ApiException) -> QuotaRefusal | None:
    """The ResourceQuota behind a 403, None for any other refusal (RBAC, a webhook)."""
    match = QUOTA_REFUSAL.search(status_message(exc)) if exc.status == 403 else None
    if match is None:
        return None
    amounts = [
        dict(part.split("=", 1) for part in match[what].split(",") if "=" in part)
        for what in ("requested", "used", "limited")
    ]
    return QuotaRefusal(match["quota"].strip(), *amounts)
