"""The gateway's fast tokenization path gives exactly the ids of the ``transformers`` path (which is
what vLLM itself would compute from the same text and messages)."""

from __future__ import annotations

import pytest

from models.tiny import build_tiny_model
from serving.api.protocol import ChatMessage
from serving.gateway.tokenization import PromptTokenizer

TEXTS = [
    "",
    "hello",
    "Hello, world! How are you today?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n",
    "unicode é ü 漢字 🙂 falls back to <|unk|>",
    "numbers 1234567890 and punctuation ;:'\\\"[]{}",
    "a" * 500,
]


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer(str(build_tiny_model()))


def test_completion_prompts_match_transformers(tok: PromptTokenizer) -> None:
    assert tok._fast is not None
    for text in TEXTS:
        assert tok.text(text) == list(tok._tok(text, add_special_tokens=True)["input_ids"]), text


def test_chat_prompts_match_apply_chat_template(tok: PromptTokenizer) -> None:
    convs = [[ChatMessage(role="user", content=t)] for t in TEXTS] + [
        [
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content="hello!"),
            ChatMessage(role="user", content="and again\nwith a newline"),
        ]
    ]
    for conv in convs:
        plain = [{"role": m.role, "content": m.text()} for m in conv]
        ref = tok._tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert tok.chat(conv) == list(ref), plain


def test_a_messages_name_reaches_the_chat_template() -> None:
    # As vLLM's server does: the template gets each message's name; one that uses it renders it.
    tok = PromptTokenizer(str(build_tiny_model()))
    tok._tok.chat_template = (
        "{% for m in messages %}{{ m.get('name', '-') }}: {{ m['content'] }}\n{% endfor %}"
    )
    ids = tok.chat(
        [ChatMessage(role="user", content="hi", name="ann"), ChatMessage(role="user", content="yo")]
    )
    assert tok._tok.decode(ids) == "ann: hi\n-: yo\n"
