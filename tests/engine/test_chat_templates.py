"""Chat templates: our rendering equals transformers' ``apply_chat_template``; a template that
refuses a system message gets it folded; no template means ChatML (ChatML tokens) or a plain
transcript (a base model); ``next_turn_ids`` keeps the cached ids a prefix for each of them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from service.engine.models.gguf_tokenizer import read_gguf_tokenizer, write_tokenizer_dir
from service.engine.tokenizer import ChatMessage, ChatTokenizer
from tests.engine.gguf_files import llama_vocab

TEMPLATES = Path(__file__).parent / "chat_templates"

# (template file, bos, eos): the special tokens each family's tokenizer_config.json names.
FAMILIES = {
    "llama-2": ("<s>", "</s>"),
    "llama-3.2": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-7b-v0.2": ("<s>", "</s>"),
    "qwen2.5": ("", "<|im_end|>"),
    "qwen3": ("", "<|im_end|>"),
    "gemma-3": ("<bos>", "<eos>"),
}

SYSTEM = ChatMessage(role="system", content="You are terse. Answer in one line.")
CONVERSATIONS: dict[str, list[ChatMessage]] = {
    "one user turn": [ChatMessage(role="user", content="What is the capital of France?")],
    "system and user": [SYSTEM, ChatMessage(role="user", content="Hi there!")],
    "three turns": [
        SYSTEM,
        ChatMessage(role="user", content="  Name a prime.  "),
        ChatMessage(role="assistant", content=" 7."),
        ChatMessage(role="user", content="Another one, ¿por favor? 日本語で 😀"),
        ChatMessage(role="assistant", content="11\n\nIt is prime.\n"),
        ChatMessage(role="user", content='Code: `print("<|im_end|> [INST] <s>")`'),
    ],
}


def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def backend(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A real tokenizer to hang the templates on (rendering does not depend on the vocabulary)."""
    out = tmp_path_factory.mktemp("smollm2-tok")
    write_tokenizer_dir(read_gguf_tokenizer(smollm2_gguf), out)
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def _reference(backend: Tokenizer, template: str, bos: str, eos: str) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos or None, eos_token=eos, chat_template=template
    )


def _ours(backend: Tokenizer, template: str | None, bos: str, eos: str) -> ChatTokenizer:
    return ChatTokenizer(
        backend, chat_template=template, eos_token_ids=frozenset({2}), bos_token=bos, eos_token=eos
    )


@pytest.mark.fidelity
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers(
    backend: Tokenizer, family: str, conversation: str, add_generation_prompt: bool
) -> None:
    """Each family's template renders each conversation to exactly transformers' string."""
    bos, eos = FAMILIES[family]
    template = _template(family)
    messages = CONVERSATIONS[conversation]
    want = _reference(backend, template, bos, eos).apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert _ours(backend, template, bos, eos).render(messages, add_generation_prompt) == want


@pytest.mark.fidelity
def test_template_helpers_behave_as_transformers_gives_them(backend: Tokenizer) -> None:
    """tojson keeps non-ASCII and takes sort_keys; raise_exception raises TemplateError; loop
    controls, strftime_now, {% generation %} and trim/lstrip blocks render as in transformers."""
    template = (
        "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
        "{{ m | tojson }}|{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=true) }}\n"
        "{% generation %}{{ m.role }}{% endgeneration %}\n"
        "  {% if false %}x{% endif %}\n"
        "{% endfor %}{{ strftime_now('%Y') | length }}"
        "{% if messages | length > 2 %}{{ raise_exception('too long') }}{% endif %}"
    )
    tok = _ours(backend, template, "", "")
    two = [ChatMessage(role="user", content="ü <b>"), ChatMessage(role="assistant", content="x")]
    want = _reference(backend, template, "", "").apply_chat_template([dict(m) for m in two], tokenize=False)
    assert tok.render(two, add_generation_prompt=False) == want
    assert want.startswith('{"role": "user", "content": "ü <b>"}|{"a": "é", "b": 1}\nuser')
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="too long"):
        tok.render([*two, two[0]], add_generation_prompt=False)


@pytest.mark.fidelity
def test_template_refusing_system_gets_it_folded(
    backend: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """Gemma 2's template raises on a system message: we render the system text folded into the
    first user turn, exactly as transformers renders that folded conversation, and log it once."""
    with caplog.at_level(logging.INFO, logger="service.engine.tokenizer"):
        gemma2 = _ours(backend, _template("gemma-2"), "<bos>", "<eos>")
    refusals = [r for r in caplog.records if "refuses a system message" in r.getMessage()]
    assert len(refusals) == 1
    reference = _reference(backend, _template("gemma-2"), "<bos>", "<eos>")
    messages = CONVERSATIONS["three turns"]
    folded = [{"role": "user", "content": f"{SYSTEM['content']}\n\n{messages[1]['content']}"}]
    folded += [dict(m) for m in messages[2:]]
    want = reference.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)
    assert gemma2.render(messages, add_generation_prompt=True) == want
    with pytest.raises(Exception, match="System role not supported"):
        reference.apply_chat_template([dict(m) for m in messages], tokenize=False)
    with caplog.at_level(logging.INFO, logger="service.engine.tokenizer"):
        gemma2.render(messages, add_generation_prompt=True)
    assert len([r for r in caplog.records if "refuses a system message" in r.getMessage()]) == 1


def _chat_turns(tok: ChatTokenizer, replies: list[tuple[list[int], str]]) -> None:
    """Play a conversation: after each reply (the ids generated, the text stored), the next
    prompt keeps every id the model holds as its prefix and stands for the rendered text."""
    messages = [SYSTEM, ChatMessage(role="user", content="Hello")]
    prior = tok.next_turn_ids([], messages)
    assert prior == tok.prompt_ids(messages)
    for turn, (generated, text) in enumerate(replies):
        prior = [*prior, *generated]
        messages = [
            *messages,
            ChatMessage(role="assistant", content=text),
            ChatMessage(role="user", content=f"question {turn} é"),
        ]
        ids = tok.next_turn_ids(prior, messages)
        assert ids[: len(prior)] == prior
        assert tok.decode_prompt(ids) == tok.render(messages, add_generation_prompt=True)
        prior = ids


# What each family's model generates after its generation prompt, and the reply text stored.
# Llama 2's template writes a space before </s> that no model generates, so there a new turn
# re-encodes the whole conversation (correct, just not cached); not listed.
GENERATED = {
    "llama-3.2": ("It is Paris.<|eot_id|>", "It is Paris."),
    "mistral-7b-v0.2": (" It is Paris.</s>", "It is Paris."),
    "qwen2.5": ("It is Paris.<|im_end|>", "It is Paris."),
    "qwen3": ("It is Paris.<|im_end|>", "It is Paris."),
    "gemma-3": ("It is Paris.<end_of_turn>", "It is Paris."),
}


@pytest.mark.parametrize("family", sorted(GENERATED))
def test_next_turn_ids_keep_the_cache_for_every_template(backend: Tokenizer, family: str) -> None:
    """For each family's template, a new turn's prompt extends the ids the model already holds
    (prompt + reply + end token), so only the new tokens are prefilled."""
    bos, eos = FAMILIES[family]
    tok = _ours(backend, _template(family), bos, eos)
    generated, text = GENERATED[family]
    _chat_turns(tok, [(tok.encode(generated), text)] * 2)


def test_llama2_turns_are_re_encoded_correctly(backend: Tokenizer) -> None:
    """Llama 2: the reply the model generated is not what the template writes back (a space
    before </s>), so the whole conversation is encoded afresh, and correctly."""
    tok = _ours(backend, _template("llama-2"), "<s>", "</s>")
    messages = [SYSTEM, ChatMessage(role="user", content="Hello")]
    prior = [*tok.next_turn_ids([], messages), *tok.encode(" It is Paris.</s>")]
    messages += [ChatMessage(role="assistant", content="It is Paris.")]
    messages += [ChatMessage(role="user", content="Why?")]
    assert tok.next_turn_ids(prior, messages) == tok.prompt_ids(messages)


def test_chatml_fallback_without_template(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A GGUF without a chat template whose vocabulary has <|im_start|>/<|im_end|> (Qwen2's
    vocabulary file) chats in ChatML, says so in the log, and counts as a chat model."""
    spec = read_gguf_tokenizer(llama_vocab("qwen2"))
    spec = type(spec)(**{**{f: getattr(spec, f) for f in spec.__slots__}, "chat_template": None})
    write_tokenizer_dir(spec, tmp_path)
    with caplog.at_level(logging.INFO, logger="service.engine.tokenizer"):
        tok = ChatTokenizer.from_dir(tmp_path)
    assert any("ChatML" in r.getMessage() for r in caplog.records)
    assert (tok.prompt_format, tok.chat, tok.turn_stops) == ("chatml", True, ())
    messages = [SYSTEM, ChatMessage(role="user", content="Hi")]
    assert tok.render(messages, add_generation_prompt=True) == (
        f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    _chat_turns(tok, [(tok.encode("Paris.<|im_end|>"), "Paris.")] * 2)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> ChatTokenizer:
    """Llama 2's vocabulary without a template and without ChatML tokens: a base model."""
    out = tmp_path_factory.mktemp("base")
    write_tokenizer_dir(read_gguf_tokenizer(llama_vocab("llama-spm")), out)
    return ChatTokenizer.from_dir(out)


def test_base_model_chats_through_a_plain_transcript(base_model: ChatTokenizer) -> None:
    """No template, no ChatML tokens: not a chat model; the conversation is a 'User:/Assistant:'
    transcript after BOS (the file adds one), and a reply ends at the next 'User:'."""
    tok = base_model
    assert (tok.prompt_format, tok.chat, tok.turn_stops) == ("transcript", False, ("\nUser:",))
    messages = [
        SYSTEM,
        ChatMessage(role="user", content="Capital of France?"),
        ChatMessage(role="assistant", content="Paris."),
        ChatMessage(role="user", content="And of Italy?"),
    ]
    assert tok.render(messages, add_generation_prompt=True) == (
        f"<s>{SYSTEM['content']}\n\nUser: Capital of France?\nAssistant: Paris.\nUser: And of Italy?\n"
        "Assistant:"
    )
    ids = tok.prompt_ids(messages)
    assert ids[0] == tok.tokenizer.token_to_id("<s>")
    assert ids.count(ids[0]) == 1


def test_base_model_turns_keep_the_cache(base_model: ChatTokenizer) -> None:
    """A base model's reply that ran into '\\nUser:' (and stopped there): the next turn's prompt
    extends the ids it holds. (Generated ids are those the model would produce after
    'Assistant:': '▁Paris', no dummy prefix of their own.)"""
    tok = base_model
    generated = tok.encode("x Paris is the capital.\nUser:")[1:]
    assert tok.tokenizer.id_to_token(generated[0]) == "▁Paris"
    _chat_turns(tok, [(generated, "Paris is the capital.")] * 2)


def test_dummy_prefix_prompt_equals_whole_encoding(base_model: ChatTokenizer) -> None:
    """With a SentencePiece dummy prefix, a prompt's ids are those of encoding the rendered text
    whole (contents do not get a '▁' of their own, merges cross their edges)."""
    tok = base_model
    messages = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content=" Hello")]
    messages.append(ChatMessage(role="user", content="Où est-il? 日本"))
    whole = tok.tokenizer.encode(tok.render(messages, add_generation_prompt=True), add_special_tokens=False)
    assert tok.prompt_ids(messages) == whole.ids
