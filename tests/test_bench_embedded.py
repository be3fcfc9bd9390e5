"""``layerkv bench`` on its own embedded system: real Redis, scheduler and worker processes."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from layerkv.cli import app


def test_bench_starts_a_fresh_embedded_system_per_policy(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # 48 + 16 tokens need 4 blocks per layer: 16 GPU blocks hold one whole request, so fcfs-full
    # runs them one at a time while layerkv places layers on the host.
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--policies",
            "fcfs-full,layerkv",
            "--rate",
            "50",
            "--prompt-len",
            "48",
            "--output-len",
            "16",
            "--num-requests",
            "4",
            "--warmup",
            "0",
            "--gpu-blocks",
            "16",
            "--host-blocks",
            "256",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    (point,) = data["points"]
    assert [s["policy"] for s in point["summaries"]] == ["fcfs-full", "layerkv"]
    for summary in point["summaries"]:
        assert summary["completed"] == 4 and summary["failed"] == 0, summary["errors"]
    for results in point["results"].values():
        assert [r["output_tokens"] for r in results] == [16] * 4  # EOS ignored: exactly max_tokens
        assert all(r["ttft_s"] is not None and r["queue_s"] is not None for r in results)
