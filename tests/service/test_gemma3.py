"""End to end on real weights of a second architecture: the service serves the packaged
``gemma3-270m`` (Gemma 3 270M base, int8) by name, as ``--model gemma3-270m`` does, and at
temperature 0 it completes plain factual sentences correctly, over the OpenAI completion route
(a raw prompt, no template) and over ``chat.v1`` (the base-model transcript).

Token-for-token agreement with transformers is tests/fidelity/test_gemma3_real.py's job (at
fp32: int8 greedy runs drift from fp32 after a few tokens)."""

from __future__ import annotations

import dataclasses

import pytest
from openai import AsyncOpenAI

from service.app import running_service
from service.config import EngineSettings, ServiceSettings
from service.engine.models.registry import PreparedModel
from tests.conftest import CACHE_DIR
from tests.service.client import TIMEOUT_S, Client
from tests.service.conftest import ws_url

pytestmark = pytest.mark.slow

MODEL = "gemma3-270m"
CONTEXT = 32768  # the model's own, served whole within the default KV budget
# The start of a sentence and a word the base model's greedy continuation must hold.
FACTS = {
    "The chemical symbol for gold is": "au",
    "Water is made of hydrogen and": "oxygen",
    "The capital of Japan is": "tokyo",
    "The opposite of hot is": "cold",
    "The Earth revolves around the": "sun",
}
# A question in the base model's 'User:/Assistant:' transcript, and a word the answer must hold.
QUESTION = ("What is the capital of Japan?", "tokyo")


@pytest.fixture
def gemma3_settings(service_settings: ServiceSettings, gemma3_model: PreparedModel) -> ServiceSettings:
    """The service on <repo>/.cache as its data directory, where ``gemma3_model`` prepared the
    model: it finds it there by name, as a user's ``--model gemma3-270m`` does. The engine runs
    with the default settings (32 slots at the full context: a KV mapping larger than most
    machines' RAM, reserved and committed lazily)."""
    assert gemma3_model.directory.parent == CACHE_DIR / "models"
    return dataclasses.replace(
        service_settings,
        data_dir=CACHE_DIR,
        models=(MODEL,),
        engine=EngineSettings(threads=2),
    )


async def test_gemma3_is_served_and_completes_facts(gemma3_settings: ServiceSettings) -> None:
    async with running_service(gemma3_settings) as server:
        c = await Client.connect(ws_url(server))
        await c.hello()
        listed = await c.request({"type": "models"})
        assert [(m["id"], m["chat"], m["context_length"]) for m in listed["models"]] == [
            (MODEL, False, CONTEXT)
        ]

        api = AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S
        )
        try:
            for prompt, word in FACTS.items():
                answer = await api.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
                text = answer.choices[0].text
                assert word in text.lower().replace(",", " ").replace(".", " ").split(), (prompt, text)
        finally:
            await api.close()

        await c.open("s", model=MODEL)
        question, word = QUESTION
        reply = await c.chat("s", question, temperature=0, max_tokens=16)
        assert word in reply.text.lower().replace(".", " ").split(), reply.text
        await c.close()
