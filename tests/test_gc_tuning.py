"""The scheduler command's collector tuning: start-up objects frozen, thresholds raised, and
``LAYERKV_GC_TUNING=0`` leaving Python's defaults (each case in a fresh interpreter, since the
collector's state is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = (
    "import gc, json; from scheduler_svc.gc_tuning import THRESHOLDS, tune_gc; before = gc.get_threshold(); "
    "tuned = tune_gc(); print(json.dumps([tuned, before, gc.get_threshold(), gc.get_freeze_count(), "
    "list(THRESHOLDS)]))"
)


def probe(**env: str) -> list:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_tune_gc_freezes_start_up_and_raises_the_thresholds() -> None:
    tuned, before, after, frozen, wanted = probe()
    assert tuned and list(after) == wanted and list(after) != list(before)
    assert after[0] == before[0], "young collections stay as frequent (and as short) as before"
    assert after[1] > before[1] and after[2] > before[2]
    assert frozen > 1000, "start-up's objects are out of the collector's generations"


def test_it_can_be_switched_off() -> None:
    tuned, before, after, frozen, _ = probe(LAYERKV_GC_TUNING="0")
    assert not tuned and after == before and frozen == 0

