"""Label and field selectors, merge and JSON patches: how the API server picks and changes
objects, as far as the tests use it."""

import copy
import re

# Fields each list accepts in a fieldSelector; anything else is a 400, as on a real server.
# https://kubernetes.io/docs/concepts/overview/working-with-objects/field-selectors/
FIELDS = {
    "jobs": {"metadata.name", "metadata.namespace", "status.successful"},
    "pods": {
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.nominatedNodeName",
    },
    "events": {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    },
    "secrets": {"metadata.name", "metadata.namespace", "type"},
    "serviceaccounts": {"metadata.name", "metadata.namespace"},
    "configmaps": {"metadata.name", "metadata.namespace"},
    "resourcequotas": {"metadata.name", "metadata.namespace"},
}


def split_terms(selector):
    """Split a selector on the commas that are not inside `in (a,b)` parentheses."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [t.strip() for t in terms if t.strip()]


def matches(labels, selector):
    """Label selectors: equality-based `a=b,a==b,c!=d`, existence `e` and `!e`, and
    set-based `k in (a,b)`, `k notin (a)`.
    https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors
    """
    for term in split_terms(selector or ""):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", term):
            key, op = m[1], m[2]
            values = {v.strip() for v in m[3].split(",") if v.strip()}
            if op == "in" and labels.get(key, None) not in values:
                return False
            if op == "notin" and key in labels and labels[key] in values:
                return False
        elif term.startswith("!") and "=" not in term:
            if term[1:].strip() in labels:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term not in labels:
            return False
    return True


def field_value(obj, path):
    if path == "source":  # events: the reporting component
        return (obj.get("source") or {}).get("component") or ""
    if path == "status.successful":  # jobs
        return str((obj.get("status") or {}).get("succeeded") or 0)
    value = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def field_terms(kind, selector, check=True):
    """Parse a fieldSelector: equality terms only (`=`, `==`, `!=`). Raises ValueError with
    the server's message for a field the resource does not support."""
    terms = []
    for term in split_terms(selector or ""):
        negate = "!=" in term
        key, value = (
            term.split("!=", 1)
            if negate
            else term.split("==", 1)
            if "==" in term
            else term.split("=", 1)
        )
        key = key.strip()
        if check and key not in FIELDS.get(kind, ()):
            raise ValueError(f"field label not supported: {key}")
        terms.append((key, value.strip(), negate))
    return terms


def merge_patch(target, patch):
    """A JSON merge patch (RFC 7386): maps merge recursively, null deletes, anything else
    (lists included) replaces. Strategic-merge directives (`$patch`, `$setElementOrder/...`)
    are dropped: list merging by key is not modelled.
    https://kubernetes.io/docs/tasks/manage-kubernetes-objects/update-api-object-kubectl-patch/
    """
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            base = target.get(key)
            target[key] = merge_patch(base if isinstance(base, dict) else {}, value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def json_patch(target, ops):
    """A JSON patch (RFC 6902): add, replace and remove only."""
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = target
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "replace":
                parent[index] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                parent.pop(index)
        elif op["op"] in ("add", "replace"):
            parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            parent.pop(last)
    return target
