"""A fake clock for tests of waits and timeouts: time moves only when the code sleeps on it."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock that moves only when something sleeps on it (and the sleep takes no time).

    Put it where the module under test reads the time (``monkeypatch.setattr(module, "time",
    clock)``); ``slept`` lists every wait asked for, in order.
    """

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def fake_time_of(monkeypatch, module) -> FakeClock:
    """A :class:`FakeClock` in place of ``module``'s ``time`` for the rest of the test."""
    clock = FakeClock()
    monkeypatch.setattr(module, "time", clock)
    return clock
