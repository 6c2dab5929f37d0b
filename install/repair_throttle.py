"""How soon the installer may repair again after a change (Istio's ``installationThrottle``,
``cni/pkg/install/install.go``).

One repair is free every ``interval`` seconds (5 s). A change sooner than that waits at most
``MAX_REPAIR_WAIT_S`` (1 s): a component fighting us (rewriting the CNI config without our
entry, over and over) gets at most about one repair a second instead of a write per change,
and once it stops our entry is back within a second, not a whole interval later. More than
``FIGHT_HITS`` such quick repeats in a row are reported in one warning line, naming the file
and the usual cause.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("install")

MAX_REPAIR_WAIT_S = 1.0
FIGHT_HITS = 5


class RepairThrottle:
    """Call :meth:`before_repair` before each attempt; it returns once the attempt may go.
    ``sleep`` returns early when the installer is stopping (its stop event's ``wait``)."""

    def __init__(
        self, interval: float, clock: Callable[[], float], sleep: Callable[[float], object]
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._sleep = sleep
        self._last = -1e9
        self.quick_repeats = 0

    def before_repair(self, conf: str) -> None:
        wait = self._last + self.interval - self._clock()
        if wait <= 0:
            self.quick_repeats = 0
        else:
            self._sleep(min(wait, MAX_REPAIR_WAIT_S))
            self.quick_repeats += 1
            if self.quick_repeats == FIGHT_HITS + 1:
                log.warning(
                    "the CNI config keeps changing right after each repair (%d times in a "
                    "row): another component is probably rewriting %s without our entry; "
                    "configure it to keep other plugins (Cilium: cni.exclusive=false)",
                    self.quick_repeats,
                    conf,
                )
        self._last = self._clock()
