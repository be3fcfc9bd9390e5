"""Chat templates rendered by ``common.chat_template`` match transformers' ``apply_chat_template``
on real template strings (SmolLM2's ChatML, a Llama-3-style one with BOS and ``raise_exception``)."""

from __future__ import annotations

import pytest

from common.chat_template import ChatMessage, ChatTemplate, ChatTemplateError, render_chat, template_of
from common.errors import InvalidArgument

# SmolLM2-Instruct's template (ChatML with a default system prompt).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: BOS in the text, whitespace control, roles checked with raise_exception.
LLAMA3ISH = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'
       + message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""

CONVERSATIONS = [
    [ChatMessage("user", "What is the capital of France?")],
    [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"),
     ChatMessage("user", "Ünïcödé and \"quotes\"  ")],
]


def _hf_tokenizer(template: str):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3ISH], ids=["smollm2-chatml", "llama3-style"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "multi-turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(
    template: str, conversation: list[ChatMessage], add_generation_prompt: bool
) -> None:
    hf = _hf_tokenizer(template)
    expected = hf.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    ours = render_chat(ChatTemplate(template, "<s>", "</s>"), conversation, add_generation_prompt)
    assert ours == expected
    prompt_end = "assistant\n" if template is SMOLLM2 else "<|end_header_id|>\n\n"
    assert ours.endswith(prompt_end) == add_generation_prompt


def test_raise_exception_is_a_clear_invalid_argument() -> None:
    with pytest.raises(ChatTemplateError, match="unknown role robot"):
        render_chat(ChatTemplate(LLAMA3ISH, "<s>", "</s>"), [ChatMessage("robot", "beep")])
    assert issubclass(ChatTemplateError, InvalidArgument)  # a 400 at the HTTP edge


def test_broken_and_sandbox_escaping_templates_are_refused() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat(ChatTemplate("{% for %}"), [ChatMessage("user", "x")])
    # The sandbox stops attribute walks to Python internals.
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(ChatTemplate(escape), [ChatMessage("user", "x")])
    with pytest.raises(InvalidArgument, match="at least one message"):
        render_chat(ChatTemplate(SMOLLM2), [])


def test_template_of_reads_the_tokenizer_attributes() -> None:
    class Tok:
        chat_template = SMOLLM2
        bos_token = "<s>"
        eos_token = "<|im_end|>"

    assert template_of(Tok()) == ChatTemplate(SMOLLM2, "<s>", "<|im_end|>")
    assert template_of(object()) is None  # a tokenizer without a template
