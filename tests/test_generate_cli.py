"""``layerkv generate`` in-process: JSON Lines output in input order, batch files, placement flags,
clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layerkv.cli import app
from tests.test_engine_reference import build_hf_model, hf_generate, prompt_of

runner = CliRunner()


def _lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_tiny_preset_text_prompt_json() -> None:
    args = ["generate", "--model", "tiny-llama", "--prompt", "Hello", "--max-tokens", "4", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    [record] = _lines(result.output)
    assert record["index"] == 0 and len(record["token_ids"]) <= 4
    assert record["finish_reason"] in ("length", "stop")
    assert record["latency_s"] >= record["ttft_s"] > 0
    assert record["placement"] == "GGGG"


@pytest.mark.parametrize("host_access", ["auto", "stream"])
def test_batch_file_matches_transformers_in_input_order(tmp_path: Path, host_access: str) -> None:
    model = build_hf_model("llama", layers=2)
    model.save_pretrained(tmp_path / "m")
    prompts = [prompt_of(n, i) for i, n in enumerate([9, 3, 20])]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps({"prompt_ids": p, "max_tokens": 3 + i})
                               for i, p in enumerate(prompts)) + "\n")
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "m"), "--batch", str(batch), "--json",
                                 "--block-size", "4", "--placement", "HG", "--host-access", host_access])
    assert result.exit_code == 0, result.output
    records = _lines(result.output)
    assert [r["index"] for r in records] == [0, 1, 2]
    for i, (r, p) in enumerate(zip(records, prompts, strict=True)):
        assert r["token_ids"] == hf_generate(model, p, 3 + i).token_ids
        assert r["placement"] == "HG"
        if host_access == "stream":  # the host layer goes through staging: offloaded, streamed back in
            assert r["bytes_offloaded"] > 0 and r["bytes_loaded"] > 0
        else:  # on CPU, auto reads the host layer in place: nothing is copied
            assert r["bytes_offloaded"] == r["bytes_loaded"] == 0


def test_prompt_ids_and_gpu_layers() -> None:
    result = runner.invoke(app, ["generate", "--prompt-ids", "256,72,105", "--max-tokens", "2", "--json",
                                 "--gpu-layers", "2"])
    assert result.exit_code == 0, result.output
    assert _lines(result.output)[0]["placement"] == "HGHG"


def test_bad_input_errors() -> None:
    result = runner.invoke(app, ["generate", "--prompt", "x", "--top-p", "0"])
    assert result.exit_code == 2 and "top_p must be in (0, 1]" in result.output
    result = runner.invoke(app, ["generate", "--model", "/no/such/model", "--prompt", "x"])
    assert result.exit_code == 2 and "neither a preset" in result.output
    result = runner.invoke(app, ["generate", "--prompt-ids", "1,2", "--placement", "GH"])
    assert result.exit_code != 0 and "4 letters" in result.output


def test_preemption_and_token_budget_flags(tmp_path: Path) -> None:
    model = build_hf_model("llama", layers=2)
    model.save_pretrained(tmp_path / "m")
    prompts = [prompt_of(n, 40 + i) for i, n in enumerate([9, 3, 20])]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps({"prompt_ids": p, "max_tokens": 12}) for p in prompts) + "\n")
    # 24 GPU blocks hold the prompts (9 blocks per layer) but not their growth (17): preemption.
    for mode in ("recompute", "swap-layers"):
        args = ["generate", "--model", str(tmp_path / "m"), "--batch", str(batch), "--json",
                "--block-size", "4", "--gpu-blocks", "24", "--host-blocks", "64", "--placement", "GG",
                "--preemption", mode, "--max-num-batched-tokens", "5"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        records = _lines(result.output)
        for r, p in zip(records, prompts, strict=True):
            assert r["token_ids"] == hf_generate(model, p, 12).token_ids
        if mode == "recompute":
            assert sum(r["preemptions"] for r in records) > 0
    result = runner.invoke(app, ["generate", "--prompt", "x", "--preemption", "drop"])
    assert result.exit_code == 2 and "preemption_mode 'drop' must be one of" in result.output
