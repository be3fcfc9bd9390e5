"""Python lists of ids to int64 tensors, fast: ``torch.tensor`` on a list costs about ten times
what going through numpy does (hundreds of microseconds for a few thousand block ids), and the
hot path turns block-id and token lists into tensors every step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def id_tensor(ids: Sequence[int]) -> torch.Tensor:
    """[len(ids)] int64 on the CPU."""
    return torch.from_numpy(np.array(ids, dtype=np.int64).reshape(-1))


def run_starts(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[int]:
    """Indices where a run of pairs with both sides consecutive begins (always 0 for a non-empty list)."""
    n = len(src_ids)
    if n <= 16:  # a decode's written block or so: a loop is cheaper than building arrays
        return [i for i in range(n)
                if i == 0 or src_ids[i] != src_ids[i - 1] + 1 or dst_ids[i] != dst_ids[i - 1] + 1]
    s, d = np.array(src_ids, dtype=np.int64), np.array(dst_ids, dtype=np.int64)  # [n]
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    return [0, *breaks.tolist()]
