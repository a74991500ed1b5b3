"""A model without a chat template, served beside a chat model: listed as ``chat: false``, and a
chat session on it runs on the plain transcript."""

from __future__ import annotations

import dataclasses

from service.app import running_service
from service.config import ServiceSettings
from service.engine.models.registry import PreparedModel
from service.engine.tokenizer import ChatMessage, ChatTokenizer
from tests.service.client import Client
from tests.service.conftest import ws_url

GREEDY = {"temperature": 0, "max_tokens": 6}


async def test_base_model_is_listed_and_chats_through_the_transcript(
    service_settings: ServiceSettings, tiny_model: PreparedModel, tiny_base_model: PreparedModel
) -> None:
    """``models`` says which model is a chat model; a session on the base model prefills the
    'User:/Assistant:' transcript (its prompt has exactly the transcript's tokens) and its second
    turn extends the first turn's ids."""
    models = (str(tiny_model.directory), str(tiny_base_model.directory))
    async with running_service(dataclasses.replace(service_settings, models=models)) as server:
        c = await Client.connect(ws_url(server))
        welcome = await c.hello()
        assert {m["id"]: m.get("chat") for m in welcome["models"]} == {
            tiny_model.directory.name: True,
            "tiny-base": False,
        }
        await c.open("s", model="tiny-base")
        tok = ChatTokenizer.from_dir(tiny_base_model.directory)
        first = await c.chat("s", "Hi", **GREEDY)
        history = [ChatMessage(role="user", content="Hi")]
        assert tok.render(history, add_generation_prompt=True) == "<s>User: Hi\nAssistant:"
        assert first.started["prompt_tokens"] == len(tok.prompt_ids(history))
        second = await c.chat("s", "And?", **GREEDY)
        assert second.started["cached_tokens"] >= first.started["prompt_tokens"], (
            first.started,
            second.started,
        )
        await c.close()
