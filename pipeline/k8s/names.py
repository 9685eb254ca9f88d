"""Kubernetes' own rules for what its API accepts, one definition each: names, label keys and
values, annotation sizes, resource quantities. `pipeline.k8s.schema` validates params.yaml's
`executor.kubernetes` with them, so that a value the API server would refuse is found
before any Job is built."""

import re
from decimal import Decimal, InvalidOperation

# Kubernetes' own rules for what it accepts; validation applies them so that a value the API
# server would refuse is found before any Job is built. Every pattern is matched whole
# (`fullmatch`: `$` would let a trailing newline through).
# Names (https://kubernetes.io/docs/concepts/overview/working-with-objects/names/): an RFC
# 1123 label (namespaces; a Job's name, which becomes its pods' `job-name` label value) is at
# most 63 lowercase alphanumerics or '-', alphanumeric at both ends; a DNS-1123 subdomain
# (ServiceAccount, Secret, ConfigMap and PriorityClass names) is such labels joined by '.',
# at most 253 characters in all.
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_LABEL_MAX = 63
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS_SUBDOMAIN_MAX = 253
# Label keys and values (https://kubernetes.io/docs/concepts/overview/working-with-objects/
# labels/#syntax-and-character-set): a key is an optional DNS-subdomain prefix and '/', then
# a name of at most 63 alphanumerics, '-', '_', '.', alphanumeric at both ends; a value is
# empty or such a name. Annotation keys follow the same rule; their values are any strings,
# all keys and values of an object together at most 256 KiB
# (https://kubernetes.io/docs/concepts/overview/working-with-objects/annotations/
# #syntax-and-character-set).
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LABEL_MAX = 63
ANNOTATIONS_MAX_BYTES = 256 * 1024
# The rules above as problem lines say what is allowed.
DNS_LABEL_RULE = (
    f"an RFC 1123 label (at most {DNS_LABEL_MAX} lowercase letters, digits, '-', "
    "alphanumeric at both ends)"
)
DNS_SUBDOMAIN_RULE = (
    f"a DNS-1123 subdomain (at most {DNS_SUBDOMAIN_MAX} lowercase letters, "
    "digits, '-', '.', alphanumeric at both ends of each '.'-separated part)"
)
LABEL_VALUE_RULE = (
    f"a label value (at most {LABEL_MAX} letters, digits, '-', '_', '.', "
    "alphanumeric at both ends, or empty)"
)
LABEL_KEY_RULE = (
    f"a label key: an optional DNS-1123 subdomain prefix (at most "
    f"{DNS_SUBDOMAIN_MAX}) and '/', then a name of at most {LABEL_MAX} letters, "
    "digits, '-', '_', '.', alphanumeric at both ends"
)
QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$"
)
_SUFFIX = {
    "": 1,
    "m": Decimal("0.001"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(text) -> Decimal:
    """A Kubernetes resource quantity ("16Gi", "500m", 4) as a number; ValueError if not one."""
    match = QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    try:
        return Decimal(match["num"]) * _SUFFIX[match["suffix"] or ""]
    except InvalidOperation as exc:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from exc


# One definition each of Kubernetes' name rules (see DNS_LABEL and LABEL_NAME above).
def matches(value, pattern, limit):
    return isinstance(value, str) and len(value) <= limit and bool(pattern.fullmatch(value))


def is_dns_label(value):
    return matches(value, DNS_LABEL, DNS_LABEL_MAX)


def is_dns_subdomain(value):
    return matches(value, DNS_SUBDOMAIN, DNS_SUBDOMAIN_MAX)


def is_label_value(value):
    return matches(value, LABEL_VALUE, LABEL_MAX)


def is_label_key(key):
    """`[prefix/]name`: the prefix, when there is a '/', must be a non-empty DNS subdomain."""
    if not isinstance(key, str):
        return False
    prefix, slash, name = key.rpartition("/")
    return (not slash or is_dns_subdomain(prefix)) and matches(name, LABEL_NAME, LABEL_MAX)
