"""The tokenizer and chat template of a GGUF file, rebuilt from its ``tokenizer.*`` metadata.

llama.cpp stores the vocabulary (``tokenizer.ggml.tokens``, ``token_type``, ``merges``), the special
token ids and the Jinja chat template in the file itself; this module turns them into a HuggingFace
``tokenizers`` Tokenizer (serialised to tokenizer.json for the wire) so that neither ``transformers``
nor a tokenizer.json file is needed. Torch-free. Byte-level BPE (``tokenizer.ggml.model == "gpt2"``:
SmolLM, Llama 3, Qwen2) is supported; sentencepiece vocabularies are refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument, NotFound, Unsupported
from common.tokenizer import HFTokenizer

# llama.cpp token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED are added tokens.
_CONTROL, _USER_DEFINED = 3, 4

# How text is split before BPE, by ``tokenizer.ggml.pre``; the others use GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` (memory-mapped: tensors are read only when used)."""
    import gguf

    if not path.is_file():
        raise NotFound(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise InvalidArgument(f"{str(path)!r} is not a readable GGUF file: {exc}") from exc


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value of the file as Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def read_vocab(path: Path) -> GGUFVocab:
    """The tokenizer metadata of a GGUF file, without touching its tensors."""
    return GGUFVocab.from_metadata(read_metadata(open_gguf(path)))


@dataclass(frozen=True)
class GGUFVocab:
    """The ``tokenizer.*`` metadata of a GGUF file, as plain values."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (sentencepiece), ...
    pre: str  # tokenizer.ggml.pre: the pre-tokenizer family
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    stop_token_ids: tuple[int, ...]  # eos first, then end-of-turn/-message ids when the file names them
    add_bos: bool
    add_prefix_space: bool
    chat_template: str

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> GGUFVocab:
        def opt_int(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return None if value is None else int(value)

        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise Unsupported("the GGUF file has no tokenizer.ggml.tokens: no tokenizer to serve text with")
        eos = opt_int("eos_token_id")
        stops = [i for i in (eos, opt_int("eot_token_id"), opt_int("eom_token_id")) if i is not None]
        return cls(
            model=str(meta.get("tokenizer.ggml.model", "")),
            pre=str(meta.get("tokenizer.ggml.pre", "default")),
            tokens=tokens,
            token_types=[int(t) for t in meta.get("tokenizer.ggml.token_type") or []],
            merges=list(meta.get("tokenizer.ggml.merges") or []),
            bos_token_id=opt_int("bos_token_id"),
            eos_token_id=eos,
            stop_token_ids=tuple(dict.fromkeys(stops)),
            # llama.cpp's default: sentencepiece vocabularies add BOS unless the file says otherwise.
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token",
                                  meta.get("tokenizer.ggml.model") == "llama")),
            add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
            chat_template=str(meta.get("tokenizer.chat_template", "")),
        )

    def token(self, token_id: int | None) -> str:
        return self.tokens[token_id] if token_id is not None and 0 <= token_id < len(self.tokens) else ""


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tokenizer(vocab: GGUFVocab) -> HFTokenizer:
    """An ``HFTokenizer`` equivalent to the file's vocabulary, with its chat template and special tokens."""
    if vocab.model != "gpt2":
        raise Unsupported(f"GGUF tokenizer model {vocab.model!r} is not supported (supported: 'gpt2', "
                          f"byte-level BPE as in SmolLM, Llama 3 and Qwen2)")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # Tokens are stored as their byte-alphabet spelling; a few files store special tokens as raw text.
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8"))
               for t in vocab.tokens]
    ids = {token: i for i, token in enumerate(spelled)}
    merges = [(a, b) for a, _, b in (m.partition(" ") for m in vocab.merges)]
    tok = Tokenizer(BPE(vocab=ids, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    split = _PRE_SPLITS.get(vocab.pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=vocab.add_prefix_space)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = (vocab.token_types + [1] * len(vocab.tokens))[:len(vocab.tokens)]  # 1: NORMAL
    # Special and user-defined tokens must stay whole in the text (a chat template writes them),
    # which only added tokens do. A CONTROL token spelled outside the byte alphabet is a mislabel.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(vocab.tokens, types, strict=True)
                            if kind == _CONTROL and set(t) <= letters])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(vocab.tokens, types, strict=True)
                    if kind == _USER_DEFINED and t in ids])
    bos = vocab.token(vocab.bos_token_id)
    if vocab.add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_token_id)])
    return HFTokenizer(tok.to_str(), vocab.bos_token_id, vocab.eos_token_id,
                       chat_template=vocab.chat_template, bos_token=bos,
                       eos_token=vocab.token(vocab.eos_token_id))
