"""The shared tokenizers: byte-level round trips, wire transport, incremental text deltas."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgument
from common.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, tokenizer_from_wire


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
