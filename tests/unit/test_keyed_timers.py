"""The per-pod table of delayed calls: replace, cancel, cleanup on every path, guard order."""

from __future__ import annotations

import threading

from node_agent.keyed_timers import KeyedTimers


def _wait(cond: threading.Event, what: str) -> None:
    assert cond.wait(5), f"timed out waiting for {what}"


def test_a_replaced_or_cancelled_call_never_runs_and_its_cleanup_runs_at_once() -> None:
    timers = KeyedTimers()
    ran: list[str] = []
    cleaned: list[str] = []
    timers.schedule("u", 30, lambda: ran.append("first"), lambda: cleaned.append("first"))
    timers.schedule("u", 30, lambda: ran.append("second"), lambda: cleaned.append("second"))
    assert cleaned == ["first"]  # the replaced call's handle is released now, not never
    timers.cancel("u")
    assert cleaned == ["first", "second"] and ran == [] and timers.pending() == 0
    timers.cancel("u")  # cancelling what is absent is fine
    assert cleaned == ["first", "second"]


def test_a_call_that_fires_runs_once_then_its_cleanup_even_when_it_raises() -> None:
    timers = KeyedTimers()
    done = threading.Event()
    order: list[str] = []

    def boom() -> None:
        order.append("call")
        raise RuntimeError("kernel said no")

    def cleanup() -> None:
        order.append("cleanup")
        done.set()

    timers.schedule("u", 0.01, boom, cleanup)
    _wait(done, "the cleanup")
    assert order == ["call", "cleanup"] and timers.pending() == 0


def test_with_a_guard_cancel_waits_for_a_call_already_firing() -> None:
    guard = threading.Lock()
    timers = KeyedTimers(guard=guard)
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_del() -> None:
        started.set()
        release.wait(5)
        order.append("del sent")

    timers.schedule("u", 0.01, slow_del)
    _wait(started, "the deferred call to start")

    def cancel() -> None:
        timers.cancel("u")
        order.append("cancelled")

    canceller = threading.Thread(target=cancel)
    canceller.start()
    canceller.join(0.2)
    assert canceller.is_alive(), "cancel returned while the call was still running"
    release.set()
    canceller.join(5)
    assert order == ["del sent", "cancelled"]
