"""The engine against HuggingFace transformers on tiny random models (float32, CPU): greedy token
ids identical and per-token log-probs within 1e-4, single prompts and mixed batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_engine_reference import (
    Job,
    assert_matches,
    build_hf_model,
    hf_generate,
    make_engine,
    prompt_of,
    run_engine,
    save_model,
)


@pytest.mark.parametrize(
    ("arch", "layers", "heads", "kv_heads", "tie", "block_size", "prompt_len"),
    [
        ("llama", 2, 4, 2, False, 16, 37),  # GQA, prompt crosses two block boundaries
        ("llama", 3, 4, 4, True, 1, 9),  # MHA, tied embeddings, one token per block
        ("qwen2", 4, 4, 1, False, 5, 13),  # q/k/v biases, block size that does not divide the prompt
        ("qwen2", 2, 4, 2, True, 16, 16),  # prompt fills exactly one block
        ("mistral", 2, 4, 2, False, 8, 20),
    ],
)
def test_single_prompt_matches(tmp_path: Path, arch: str, layers: int, heads: int, kv_heads: int,
                               tie: bool, block_size: int, prompt_len: int) -> None:
    model = build_hf_model(arch, layers, heads, kv_heads, tie)
    engine = make_engine(save_model(model, tmp_path), block_size=block_size, gpu_blocks=64 * layers)
    prompt = prompt_of(prompt_len, 3)
    got = run_engine(engine, {"a": Job(prompt, 8)})
    assert_matches(got["a"], hf_generate(model, prompt, 8))


def test_llama3_rope_scaling_matches(tmp_path: Path) -> None:
    model = build_hf_model("llama", layers=2, rope_llama3=True)
    engine = make_engine(save_model(model, tmp_path), block_size=4)
    prompt = prompt_of(40, 4)
    got = run_engine(engine, {"a": Job(prompt, 6)})
    assert_matches(got["a"], hf_generate(model, prompt, 6))


@pytest.mark.parametrize(("arch", "block_size"), [("llama", 16), ("qwen2", 3), ("llama", 1)])
def test_mixed_batch_together_and_staggered(tmp_path: Path, arch: str, block_size: int) -> None:
    model = build_hf_model(arch, layers=2, heads=4, kv_heads=2)
    engine = make_engine(save_model(model, tmp_path), block_size=block_size, gpu_blocks=512)
    lengths = [5, 23, 11, 34, 2]
    prompts = [prompt_of(n, 10 + i) for i, n in enumerate(lengths)]
    max_new = [6, 3, 9, 5, 7]
    refs = [hf_generate(model, p, n) for p, n in zip(prompts, max_new, strict=True)]
    # The first three together; the other two arrive while the first ones decode.
    arrivals = [0, 0, 0, 2, 5]
    jobs = {f"r{i}": Job(p, n, arrive_step=a)
            for i, (p, n, a) in enumerate(zip(prompts, max_new, arrivals, strict=True))}
    got = run_engine(engine, jobs)
    for i, ref in enumerate(refs):
        assert_matches(got[f"r{i}"], ref)
    usage = engine.usage()
    assert usage.gpu.free_blocks == usage.gpu.total_blocks
    assert usage.gpu.used_per_layer == (0, 0)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_saved_folders_load_and_match(tmp_path: Path, shard: str | None) -> None:
    model = build_hf_model("llama", layers=2)
    folder = save_model(model, tmp_path, shard=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    engine = make_engine(folder)
    prompt = prompt_of(12, 7)
    got = run_engine(engine, {"a": Job(prompt, 5)})
    assert_matches(got["a"], hf_generate(model, prompt, 5))


def test_prefill_with_mlp_row_chunks_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU prefill longer than the MLP's row chunk (made small here) still matches HF."""
    from worker_svc.model import llama

    monkeypatch.setattr(llama, "MLP_CHUNK_ROWS", 16)
    model = build_hf_model("llama", layers=2, heads=4, kv_heads=2)
    engine = make_engine(save_model(model, tmp_path), block_size=16, gpu_blocks=256)
    prompt = prompt_of(53, 5)  # three full chunks and a partial one
    got = run_engine(engine, {"a": Job(prompt, 6)})
    assert_matches(got["a"], hf_generate(model, prompt, 6))
