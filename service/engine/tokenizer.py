r"""Chat-level tokenizer: encode/decode, the model's chat template, and streaming detokenization.

Loads a Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``,
optionally ``generation_config.json`` / ``config.json``), as written by
:mod:`service.engine.models.gguf_tokenizer` or by an optimum export.

How a conversation becomes a prompt (``PromptFormat``):

- ``template``: the model's own chat template (``chat_template`` in tokenizer_config.json,
  ``chat_template.jinja`` or ``chat_template.json``), rendered in the Jinja environment
  transformers gives templates. A template that refuses a system message (it raises, as
  Gemma 2's does) gets the system text folded into the first user turn instead, and the log
  says so once.
- ``chatml``: no template, but the vocabulary has ``<|im_start|>`` and ``<|im_end|>``: ChatML,
  the format those tokens exist for. The log says so.
- ``transcript``: no template and no ChatML tokens: a base (completion) model. A chat is then
  a plain transcript, which such a model continues naturally::

      {system}\n\n            (only when there is a system message)
      User: {text}\n
      Assistant: {text}\n
      ...
      Assistant:

  and a reply ends at ``\nUser:`` (``turn_stops``) or at an end token. The model is
  reported as not a chat model (``chat`` is false).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypedDict

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from service.engine.prompt_encoder import PromptEncoder

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from jinja2 import Template
    from jinja2.parser import Parser


log = logging.getLogger(__name__)

PromptFormat = Literal["template", "chatml", "transcript"]

# ChatML, for a vocabulary that has its tokens but no template (as transformers' old default).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The plain transcript of a base model (see the module docstring). An assistant text follows
# "Assistant:" directly: the model's own continuation starts with the space (``_prepared`` gives
# one to a text without), so the ids of a finished reply stay a prefix of the next turn's prompt.
TRANSCRIPT_TEMPLATE = (
    "{{ bos_token if add_bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant:' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
TRANSCRIPT_STOPS = ("\nUser:",)


class ChatMessage(TypedDict):
    role: str
    content: str


def _without_prefix(pieces: Sequence[tuple[str, bool]], chars: int) -> list[tuple[str, bool]]:
    """``pieces`` less their first ``chars`` characters."""
    out = []
    for text, is_content in pieces:
        if chars >= len(text):
            chars -= len(text)
            continue
        out.append((text[chars:], is_content))
        chars = 0
    return out


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: object,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII, which chat templates do not expect.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """``{% generation %}…{% endgeneration %}``, which transformers' templates may use to mark the
    assistant's text (for training masks): rendered as its body."""

    tags = {"generation"}  # noqa: RUF012  (jinja's Extension API declares it this way)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def compile_chat_template(source: str) -> Template:
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks, loop
    controls, its ``tojson``, ``raise_exception`` and ``strftime_now``)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    helpers: dict[str, Callable[..., object]] = {
        "raise_exception": _raise_exception,
        "strftime_now": _strftime_now,
    }
    env.globals.update(helpers)
    return env.from_string(source)


def _token_text(value: object) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _ids(value: object) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _chat_template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _has_chatml_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(t) is not None for t in ("<|im_start|>", "<|im_end|>"))


def prompt_format_of(chat_template: str | None, tokenizer: Tokenizer) -> PromptFormat:
    """How conversations become prompts for a model with this template and vocabulary."""
    if chat_template is not None:
        return "template"
    return "chatml" if _has_chatml_tokens(tokenizer) else "transcript"


def is_chat_model(model_dir: Path) -> bool:
    """Whether the model in ``model_dir`` is a chat model (it has a chat template, or ChatML
    tokens) rather than a base model that chats through a plain transcript."""
    config = _read_json(model_dir / "tokenizer_config.json")
    if _chat_template_source(model_dir, config) is not None:
        return True
    added = config.get("added_tokens_decoder")
    if isinstance(added, dict):  # cheaper than loading a 262k-token tokenizer.json
        contents = {token.get("content") for token in added.values() if isinstance(token, dict)}
        return {"<|im_start|>", "<|im_end|>"} <= contents
    return _has_chatml_tokens(Tokenizer.from_file(str(model_dir / "tokenizer.json")))


def _fold_system(messages: list[ChatMessage]) -> list[ChatMessage]:
    """The system messages' text moved to the start of the first user message."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for i, message in enumerate(rest):
        if message["role"] == "user":
            rest[i] = ChatMessage(role="user", content=f"{system}\n\n{message['content']}")
            return rest
    return [ChatMessage(role="user", content=system), *rest]


class ChatTokenizer:
    """A tokenizer plus the model's prompt format (see the module docstring) and end ids."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None,
        eos_token_ids: frozenset[int],
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool = False,
        special_tokens: dict[str, str] | None = None,
        name: str = "model",
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self._special_tokens = special_tokens or {}
        self.prompt_format: PromptFormat = prompt_format_of(chat_template, tokenizer)
        if self.prompt_format == "chatml":
            log.info("%s has no chat template; its vocabulary has ChatML tokens, so ChatML it is", name)
        elif self.prompt_format == "transcript":
            log.info(
                "%s has no chat template: a base model; chats use a plain 'User:/Assistant:' transcript",
                name,
            )
        source = {"template": chat_template, "chatml": CHATML_TEMPLATE, "transcript": TRANSCRIPT_TEMPLATE}
        self._template = compile_chat_template(source[self.prompt_format] or "")
        self._folds_system = self._refuses_system(name)
        self._prompt_encoder = PromptEncoder(tokenizer)

    @classmethod
    def from_dir(cls, model_dir: Path) -> ChatTokenizer:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        bos = _token_text(config.get("bos_token"))
        eos = _token_text(config.get("eos_token"))
        eos_ids: set[int] = set()
        if eos is not None and (eos_id := tokenizer.token_to_id(eos)) is not None:
            eos_ids.add(eos_id)
        for name in ("generation_config.json", "config.json"):
            eos_ids |= _ids(_read_json(model_dir / name).get("eos_token_id"))
        if not eos_ids:
            raise ValueError(f"{model_dir}: no end-of-sequence token id found")
        specials = {key: text for key in ("unk_token", "pad_token") if (text := _token_text(config.get(key)))}
        return cls(
            tokenizer,
            chat_template=_chat_template_source(model_dir, config),
            eos_token_ids=frozenset(eos_ids),
            bos_token=bos,
            eos_token=eos,
            add_bos_token=bool(config.get("add_bos_token", False)),
            special_tokens=specials,
            name=model_dir.name,
        )

    @property
    def chat(self) -> bool:
        """False for a base model, whose chats are plain transcripts."""
        return self.prompt_format != "transcript"

    @property
    def turn_stops(self) -> tuple[str, ...]:
        """Stop strings that end an assistant turn beside the end tokens (transcripts only)."""
        return TRANSCRIPT_STOPS if self.prompt_format == "transcript" else ()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it are recognised, none are added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_document(self, text: str) -> list[int]:
        """Token ids of ``text`` as the start of a document: ``encode`` plus the special tokens
        the model's tokenizer adds (a BOS first where the model expects one), as transformers'
        ``tokenizer(text)`` and other servers' raw completion routes give. Without its BOS a
        model like Gemma 3 produces nonsense."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_prompt(self, ids: Sequence[int]) -> str:
        """The text ``ids`` stand for in a rendered prompt: like ``decode``, but each stretch
        between added tokens is decoded on its own. A SentencePiece vocabulary prepends a space
        to every such stretch when encoding, which a whole ``decode`` keeps after each added
        token (``<s> [INST]``) while the rendered text has none (``<s>[INST]``)."""
        if self._prompt_encoder.dummy_prefix == "none":
            return self.decode(ids)
        out: list[str] = []
        start = 0
        for i, token in enumerate(ids):
            if token in self._prompt_encoder.added_ids:
                out += [self.decode(ids[start:i]), self.decode(ids[i : i + 1])]
                start = i + 1
        out.append(self.decode(ids[start:]))
        return "".join(out)

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str:
        """The prompt text of ``messages``, as transformers' ``apply_chat_template`` renders it."""
        return self._render(self._prepared(messages), add_generation_prompt)

    def _render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            add_bos_token=self.add_bos_token,
            tools=None,
            documents=None,
            **self._special_tokens,
        )

    def _prepared(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """``messages`` as the template is given them: the system folded into the first user
        turn where the template refuses one; in a transcript, replies start with a space."""
        out = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        if self._folds_system:
            out = _fold_system(out)
        if self.prompt_format == "transcript":
            for m in out:
                if m["role"] == "assistant" and not m["content"].startswith(" "):
                    m["content"] = " " + m["content"]
        return out

    def _refuses_system(self, name: str) -> bool:
        """Whether the template raises on a system message but renders it folded (checked once,
        at load, on a probe conversation)."""
        probe = [ChatMessage(role="system", content="S"), ChatMessage(role="user", content="U")]
        try:
            self._render(probe, add_generation_prompt=True)
            return False
        except TemplateError as refusal:
            try:
                self._render(_fold_system(probe), add_generation_prompt=True)
            except TemplateError:
                log.warning("the chat template of %s fails on a plain conversation: %s", name, refusal)
                return False
            log.info(
                "the chat template of %s refuses a system message (%s): "
                "system text is folded into the first user turn",
                name,
                refusal,
            )
            return True

    def prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._prompt_encoder.encode(self._render_pieces(messages))

    def next_turn_ids(self, prior_ids: Sequence[int], messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt ids for the whole conversation, keeping ``prior_ids`` as their prefix if possible.

        ``prior_ids`` are the ids the model already holds in its KV cache (earlier prompt and
        generated ids); re-tokenizing the rendered text could split it differently, so only the
        text after what they decode to is encoded.
        """
        pieces = self._render_pieces(messages)
        consumed = self.decode_prompt(prior_ids)
        if prior_ids and "".join(text for text, _ in pieces).startswith(consumed):
            rest = _without_prefix(pieces, len(consumed))
            continues = prior_ids[-1] not in self._prompt_encoder.added_ids
            return [*prior_ids, *self._prompt_encoder.encode(rest, continues=continues)]
        return self._prompt_encoder.encode(pieces)

    def _render_pieces(self, messages: Sequence[ChatMessage]) -> list[tuple[str, bool]]:
        """The rendered prompt as (text, is_message_content) pieces.

        Message contents are what users (and the model) wrote: a ``<|im_start|>`` typed in
        them must stay text, never become a control token that forges a turn. So the template
        is rendered with a unique marker in place of each content, and ``PromptEncoder`` keeps
        special tokens off inside contents. A template that drops or repeats a content (the
        markers do not come back exactly once each) is rendered plainly instead.
        """
        prepared = self._prepared(messages)
        nonce = secrets.token_hex(8)
        markers = [f"\x00{nonce}:{i}\x00" for i in range(len(prepared))]
        marked = [
            ChatMessage(role=m["role"], content=marker) for m, marker in zip(prepared, markers, strict=True)
        ]
        rendered = self._render(marked, add_generation_prompt=True)
        pieces = re.split(f"\x00{nonce}:(\\d+)\x00", rendered)
        contents = [int(i) for i in pieces[1::2]]
        if sorted(contents) != list(range(len(prepared))):
            log.warning(
                "the chat template does not place each message once; special tokens in them stay live"
            )
            return [(self._render(prepared, add_generation_prompt=True), False)]
        out: list[tuple[str, bool]] = []
        for i, text in enumerate(pieces):
            out.append((prepared[int(text)]["content"], True) if i % 2 else (text, False))
        return out

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer)


class IncrementalDetokenizer:
    """Streams the text of one generation, never splitting a UTF-8 character.

    Special tokens are skipped. The texts returned by :meth:`push` and :meth:`flush`
    concatenate to ``decode(ids, skip_special_tokens=True)`` of all pushed ids.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted: list[str] = []
        self._held: list[int] = []

    @property
    def pending_tokens(self) -> int:
        """Pushed tokens whose text has not been returned yet."""
        return len(self._held)

    def push(self, token_id: int) -> str:
        """Text that ``token_id`` (with any held-back tokens) completes; may be empty."""
        self._ids.append(token_id)
        self._held.append(token_id)
        # None both while bytes are held back and for a skipped special token.
        text = self._stream.step(self._tokenizer, token_id)
        if not text:
            return ""
        self._emitted.append(text)
        self._held.clear()
        return text

    def flush(self) -> str:
        """The text still held back; call once, at the end.

        A generation cut off in the middle of a character (max_tokens, stop, cancel) ends
        with an unfinished byte sequence: that is dropped, since half a character is not
        text and U+FFFD would only put garbage into the stored reply.
        """
        if not self._held:
            return ""
        # DecodeStream has no flush of its own: take the tail of the full decode.
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        emitted = "".join(self._emitted)
        if full.startswith(emitted):
            tail = full[len(emitted) :]
        else:
            tail = self._tokenizer.decode(self._held, skip_special_tokens=True)
        self._held.clear()
        tail = tail.rstrip("\ufffd")
        self._emitted.append(tail)
        return tail
