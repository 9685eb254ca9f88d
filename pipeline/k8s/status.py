"""What a Job's status says: its conditions, its state as `jobs list` shows it, and why it
failed, in words.

Only the terminal conditions end a run: since Kubernetes 1.31 a Job first gets
SuccessCriteriaMet or FailureTarget while its pods may still be terminating (and saving a
checkpoint), and Complete or Failed only once they are gone
(https://kubernetes.io/docs/concepts/workloads/controllers/job/#termination-of-job-pods).
"""

# What a Job's Failed reason means, for the one-line error.
FAILED_REASONS = {
    "BackoffLimitExceeded": "every retry failed (backoffLimit reached)",
    "DeadlineExceeded": "ran longer than activeDeadlineSeconds",
    "PodFailurePolicy": "a pod failure matched the podFailurePolicy (exit code 78: invalid "
    "configuration, not retried)",
}


def condition(job: dict, kind: str) -> dict | None:
    """The Job's condition of type `kind` when it is True (Complete, Failed, Suspended...)."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def state(job: dict) -> str:
    """queued, pending, running, done, failed, deleting."""
    status = job.get("status") or {}
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return "deleting"
    if condition(job, "Complete"):
        return "done"
    if condition(job, "Failed"):
        return "failed"
    if (job.get("spec") or {}).get("suspend"):
        return "queued"
    return "running" if status.get("active") else "pending"


def finished(job: dict) -> bool:
    return state(job) in ("done", "failed")


def failure(name: str, failed: dict) -> str:
    """`Job <name> failed: <reason> - <what it means> (<the controller's message>)`, from the
    Job's Failed condition."""
    reason = failed.get("reason") or "Failed"
    meaning = FAILED_REASONS.get(reason)
    text = f"Job {name} failed: {reason}" + (f" - {meaning}" if meaning else "")
    if failed.get("message"):
        text += f" ({failed['message']})"
    return text
