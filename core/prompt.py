"""How a document and a conversation become token ids, through the model's own chat template.

The memory holds a system turn that ends with the document (its prefix ids + the document ids);
each question appends the rest of that system turn, the earlier turns and the new user turn.
Rendering both from one template call (split at a placeholder) keeps them consistent with what the
model was trained on. Only this module and `tokenize` know about strings; the engine sees ids.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SYSTEM = ("You are a careful assistant. Answer the user's questions using the document below. "
                  "If the document does not contain the answer, say so.\n\n")
_PLACEHOLDER = "\u2063COMBLLAMA-DOCUMENT\u2063"


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


def _render(tokenizer, system: str, turns: list[Turn], question: str | None, instructions: str = "") -> str:
    # Instructions added after ingest follow the document inside the same system turn (the memory is sealed).
    tail = f"\n\n{instructions}" if instructions else ""
    messages = [{"role": "system", "content": system + _PLACEHOLDER + tail}]
    for t in turns:
        messages += [{"role": "user", "content": t.question}, {"role": "assistant", "content": t.answer}]
    if question is not None:
        messages.append({"role": "user", "content": question})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=question is not None)
    # A base model without a template: plain labelled text.
    text = messages[0]["content"]
    for m in messages[1:]:
        text += f"\n\n{m['role'].capitalize()}: {m['content']}"
    return text + ("\n\nAssistant:" if question is not None else "")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def memory_prefix_ids(tokenizer, system: str = DEFAULT_SYSTEM) -> list[int]:
    """Ids that precede the document inside the memory (template start + system text)."""
    rendered = _render(tokenizer, system, [], None)
    return _encode(tokenizer, rendered.split(_PLACEHOLDER)[0])


def turn_ids(tokenizer, question: str, history: list[Turn] = (), system: str = DEFAULT_SYSTEM,
             instructions: str = "") -> list[int]:
    """Ids that follow the memory: end of the system turn (with extra `instructions`, e.g. chat
    --system, after the document), earlier turns, the question, the assistant header. `history` is
    oldest first."""
    rendered = _render(tokenizer, system, list(history), question, instructions)
    return _encode(tokenizer, rendered.split(_PLACEHOLDER, 1)[1])
