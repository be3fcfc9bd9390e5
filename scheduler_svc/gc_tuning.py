"""Keeping Python's cyclic garbage collector out of the scheduler's latency.

Measured in the scheduler under the overhead benchmark (docs/benchmarks.md, third pass): the
collector's middle-generation passes paused the event loop 2-13 ms and its full ones 33-80 ms,
walking objects that are alive (the requests kept in memory, gRPC's and the policies' state),
not garbage of ours. A pause of that size is a 2 ms p99 on its own. So the ``layerkv scheduler``
command, once started, moves everything start-up made into the permanent generation
(``gc.freeze``: never walked again) and raises the thresholds, so the passes that walk more than
the youngest objects come far less often (the young ones stay as frequent as before and short).
Cyclic garbage is still collected (grpcio leaves a few objects per call), only later.

``LAYERKV_GC_TUNING=0`` leaves the collector as Python sets it (for comparisons).
"""

from __future__ import annotations

import gc
import logging
import os

log = logging.getLogger(__name__)

# Young collections every 700 net allocations as by default (they walk only the youngest objects
# and stay well under a millisecond); a middle pass every 50 of them instead of 10, a full pass
# every 100 middle ones instead of 10 (and then only when a quarter of the old objects is new,
# Python's own rule).
THRESHOLDS = (700, 50, 100)


def tune_gc() -> bool:
    """Freeze what start-up made and raise the thresholds; False when switched off."""
    if os.environ.get("LAYERKV_GC_TUNING", "1") == "0":
        return False
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    log.info("gc: %d start-up objects frozen, thresholds %s", gc.get_freeze_count(), THRESHOLDS)
    return True
