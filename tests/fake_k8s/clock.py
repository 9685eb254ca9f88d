"""The tests' clock: real time run `speed` times faster, kept by the test API server, the
executor under test and the tests' own waits alike, so that grace periods, outages and watch
windows take a fraction of their time and still happen in the same order.

Socket timeouts stay real (the client's `_request_timeout`): they only bound waits that the
server, on this clock, ends sooner.
"""

import threading
import time


class ScaledClock:
    """`monotonic()` and `sleep()` are what the executor takes (`pipeline.k8s.client.Clock`);
    `wait(condition, seconds)` and `timer(seconds, fn, *args)` are the test API server's."""

    def __init__(self, speed=1.0):
        self.speed = float(speed)
        self._origin = time.monotonic()

    def monotonic(self) -> float:
        return self._origin + (time.monotonic() - self._origin) * self.speed

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds) / self.speed)

    def wait(self, condition: threading.Condition, seconds: float) -> bool:
        """`condition.wait` for `seconds` of this clock (the caller holds the condition)."""
        return condition.wait(max(0.0, seconds) / self.speed)

    def timer(self, seconds: float, fn, *args) -> threading.Timer:
        """`fn(*args)` in a daemon thread after `seconds` of this clock; cancel() stops it."""
        timer = threading.Timer(max(0.0, seconds) / self.speed, fn, args)
        timer.daemon = True
        timer.start()
        return timer


REAL_TIME = ScaledClock(1)
