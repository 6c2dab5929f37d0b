"""How long tests wait on a slow machine: every "wait up to" deadline of the netns suite goes
through :func:`scaled`.

``ICNI_TEST_TIME_SCALE`` (default 1) multiplies them. The VM runner sets it (qemu TCG runs
test bodies 12-100x slower, docs/kernels.md), so a stand-in or agent process that takes
20 s to import its modules there is waited for instead of failing the test. Only waits
scale: a timeout that is itself under test (the ZDS ack timeout, the installer's 5 s repair
goal) does not.
"""

from __future__ import annotations

import os


def _scale() -> float:
    raw = os.environ.get("ICNI_TEST_TIME_SCALE", "1")
    try:
        return max(float(raw), 1.0)
    except ValueError:
        raise SystemExit(f"ICNI_TEST_TIME_SCALE={raw!r} is not a number (e.g. 12)") from None


SCALE = _scale()


def scaled(seconds: float) -> float:
    return seconds * SCALE
