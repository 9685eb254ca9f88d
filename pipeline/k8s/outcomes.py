"""What the Kubernetes executor does when a run's Job ends: Failed (the Job's reason and the
pod's termination message, a stale image named as such), Complete, or gone before it was seen
to finish (deleted by hand or by its TTL: done if its result is in the store).

A finished run's result is fetched from the store and kept in its output_dir only if it is
whole (`pipeline.results.fetch_checked`). A damaged one is set aside and its Job replaced,
once: the new pod finds the damage in the store, trains again (resuming from its
checkpoints) and publishes a whole result over it; damaged again, the run fails, saying what
was wrong.

A part of `pipeline.executors.kubernetes.KubernetesExecutor` (mixed in): it uses the
executor's `params`, `api`, `pods`, `namespace`, `_fetch`, `_queue`, `_finish` and `_say`.
"""

from .. import results
from ..contract import STALE_IMAGE  # how a pod whose code is not the launcher's says so
from .render import results_uri
from .status import failure


class RunOutcomes:
    def _failed(self, run, failed):
        error = failure(run.name, failed)
        message = self.pods.termination_message(run.uid)
        if message and STALE_IMAGE in message:
            error = (
                f"image is stale: rebuild and push (`make image push`), then run again - {message}"
            )
        elif message:
            error += f": {message}"
        self._finish(run, False, error, self.pods.log_tail(run.uid))

    def _vanished(self, run):
        """The Job is gone before we saw it finish (deleted by hand, or by its TTL)."""
        try:
            kept, damage = self._collect(run)
        except Exception:  # noqa: BLE001 - any failure to find the result means: not done
            kept, damage = False, None
        if kept or damage:
            self._settle(run, damage)
            return
        tail = self.pods.log_tail(run.uid)
        self._finish(run, False, f"Job {run.name} was deleted before it finished", tail)

    def _succeeded(self, run):
        try:
            _, damage = self._collect(run)
        except Exception as exc:  # noqa: BLE001 - reported as this run's failure
            self._finish(
                run,
                False,
                f"Job {run.name} completed but its results could not be "
                f"fetched from {results_uri(self.params, run.spec)}: "
                f"{type(exc).__name__}: {exc}",
            )
            return
        self._settle(run, damage)

    def _collect(self, run) -> tuple[bool, tuple | None]:
        """Fetch the run's result, kept in its output_dir only if whole (a damaged one is set
        aside): `results.fetch_checked`."""

        def fetch(spec, directory):
            self._fetch(self.params, spec, directory)
            return results_uri(self.params, spec)

        return results.fetch_checked(run.spec, fetch)

    def _settle(self, run, damage):
        """Done, unless the result was damaged: then the Job is replaced, once."""
        if not damage:
            self._finish(run, True)
            return
        source, aside, wrong = damage
        what = f"result at {source} is damaged ({'; '.join(wrong)}), set aside in {aside}"
        if run.retrained:
            self._finish(run, False, f"trained again, its {what}", self.pods.log_tail(run.uid))
            return
        self._say(f"[{run.name}] {what}: replacing Job {run.name} to train it again")
        self.api.delete_job(run.name, self.namespace, run.uid)
        run.retrained, run.uid, run.counts, run.started = True, None, (), False
        self._queue.append(run)
