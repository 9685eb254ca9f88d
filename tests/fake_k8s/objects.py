"""Shapes of API objects the fake serves: timestamps, the Status of an error answer, object
conditions, and the kinds it serves read only."""

from datetime import datetime, timezone

READ_ONLY_KINDS = {
    "serviceaccounts": ("ServiceAccount", "ServiceAccountList"),
    "secrets": ("Secret", "SecretList"),
    "configmaps": ("ConfigMap", "ConfigMapList"),
    "events": ("Event", "EventList"),
    "resourcequotas": ("ResourceQuota", "ResourceQuotaList"),
}
NODE = "node-1"


def timestamp():
    """Now, as the API writes times (RFC 3339, seconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def error_status(code, reason, message, details=None):
    # The Status object of every error answer:
    # https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/status/
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def condition(obj, type_):
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_),
        None,
    )


def set_condition(obj, type_, status, reason, message=""):
    """Add a condition or update the one of that type; lastTransitionTime moves only when
    the status changes."""
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    now = timestamp()
    for cond in conditions:
        if cond["type"] == type_:
            if cond["status"] != status:
                cond["lastTransitionTime"] = now
            cond.update(status=status, reason=reason, message=message, lastProbeTime=now)
            return
    conditions.append(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastProbeTime": now,
            "lastTransitionTime": now,
        }
    )
