"""What the Kubernetes executor says about its runs while they run, and when it gives up on
one whose pod cannot start: every `progress_interval` a line per active run (queued, waiting
for a pod and why, or the pod's state and last log line), and a run whose pod keeps failing
to start the same way beyond its grace period (`start_grace`; `unschedulable_limit` for an
unschedulable pod) fails, its Job deleted.

A part of `pipeline.executors.kubernetes.KubernetesExecutor` (mixed in): it uses the
executor's `clock`, `cfg`, `pods`, `api`, `namespace`, `_runs`, `_finish`, `_say` and
`events`. For the stage's progress (`events`), a run starts when its pod is first seen
running, and the pod's last log line, read every `progress_interval`, is the run's output.
"""

from kubernetes.client.exceptions import ApiException

from .client import api_error
from .pods import pod_state


class RunProgress:
    def _progress(self):
        for run in self._runs.values():
            if not run.uid or run.outcome:
                continue
            try:
                self._progress_of(run)
            except ApiException as exc:
                self._say(f"[{run.name}] (no progress: {api_error(exc, 'reading pods')})")

    def _progress_of(self, run):
        minutes = (self.clock.monotonic() - run.submitted_at) / 60
        if run.suspended:
            self._say(f"[{run.name}] queued, {minutes:.0f} min")
            return
        pods = self.pods.of(run.uid)
        trouble = self.pods.start_failure(run.uid, run.created, pods)
        self._track(run, trouble)
        if run.outcome:
            return
        if not pods:
            self._say(
                f"[{run.name}] waiting for a pod, {minutes:.0f} min"
                + (f" | {trouble[1]}" if trouble else "")
            )
            return
        pod = pods[-1]
        line = ""
        if pod.get("status", {}).get("phase") == "Running":
            name = run.spec["name"]
            if not run.started:
                # Running (not submitted) is when a run's steps begin: a Job waiting for
                # admission or a pod is queued as far as the stage's progress goes.
                run.started = True
                node = (pod.get("spec") or {}).get("nodeName")
                where = f"pod {pod['metadata']['name']}" + (f" on {node}" if node else "")
                self.events.run_started(name, where)
            line = self.pods.read_log(pod, 1).strip()
            if line:
                self.events.run_output(name, line)
        self._say(
            f"[{run.name}] {pod_state(pod)}, {minutes:.0f} min" + (f" | {line}" if line else "")
        )

    def _track(self, run, trouble):
        """Fail the run when the same kind of trouble outlasts its grace period."""
        if trouble is None:
            run.trouble = None
            return
        kind, text = trouble
        now = self.clock.monotonic()
        grace = (
            self.cfg["unschedulable_limit"] if kind == "unschedulable" else self.cfg["start_grace"]
        )
        if run.trouble is None or run.trouble[0] != kind:
            run.trouble = (kind, now, text)
            self._say(
                f"[{run.name}] cannot start: {text}"
                + (f" (the run fails if this lasts {grace:.0f} s)" if grace else "")
            )
            return
        if grace is not None and now - run.trouble[1] >= grace:
            self._say(
                f"[{run.name}] giving up after {now - run.trouble[1]:.0f} s"
                + (f"; deleting Job {run.name}" if run.uid else "")
            )
            try:
                if run.uid:
                    self.api.delete_job(run.name, self.namespace, run.uid)
            except ApiException as exc:
                self._say(f"[{run.name}] (could not delete: {api_error(exc, 'deleting')})")
            self._finish(
                run,
                False,
                f"Job {run.name} could not start for {now - run.trouble[1]:.0f} s: {text}",
            )
