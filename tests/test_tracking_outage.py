"""vsgd.tracking when the tracking server is unreachable as a resumed run starts: the values
queued meanwhile reach the run once it is back, none twice, none lost."""

from vsgd.tracking import Tracker


class Flaky:
    """An MlflowClient whose every call fails while `down` is set."""

    def __init__(self, client):
        self.client, self.down = client, False

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            if self.down:
                raise ConnectionError("tracking server unreachable")
            return method(*args, **kwargs)

        return call


def test_values_queued_before_a_resumed_run_is_reached_are_sent(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = {
        "name": "r",
        "run_hash": "0123456789abcdef",
        "dataset": "cifar100",
        "arch": "vgg16",
        "arch_key": "vgg",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "seed": 0,
        "data": {"checksum": "c"},
        "tracking": {"uri": uri},
    }
    first = Tracker(uri, "t")
    first.start(spec)
    for step in range(1, 6):
        first.log_metrics({"train_loss": float(step)}, step)
    assert first.flush()  # then the process is killed: the run stays RUNNING

    # The restarted process resumes from a checkpoint at step 3 while the server is down:
    # it replays steps 4-5 (already held by the run) and goes on to 8.
    client = Flaky(MlflowClient(tracking_uri=uri))
    client.down = True
    second = Tracker(uri, "t", client=client)
    second.start(spec, run_id=first.run_id)
    for step in range(4, 9):
        second.log_metrics({"train_loss": float(step)}, step)
        assert not second.flush()
        second._next_try = 0.0  # skip the backoff wait
    client.down = False
    assert second.flush()
    second.finish()
    history = MlflowClient(tracking_uri=uri).get_metric_history(first.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
