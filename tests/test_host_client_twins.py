"""The two client twins over their one set of calls (``host_client/_base.py``): each call of
``EmbeddingClient`` has its ``AsyncEmbeddingClient`` twin with the same signature, and both
look to ``help()`` and ``inspect`` like methods written out in their own class.

The calls themselves run against stand-in workers (``fake_workers/stand_in.py``: the protocol
without a model, its row ``i`` is ``[len(inputs[i]), 1, 0, 0]``); the real worker runs them in
``test_host_client.py`` and ``test_request_options.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import pydoc
import sys
from pathlib import Path

import numpy as np
from supervision_helpers import GUARD_TIMEOUT

from akidb_embed import wire
from akidb_embed.host_client import AsyncEmbeddingClient, EmbeddingClient

STAND_IN = Path(__file__).parent / "fake_workers" / "stand_in.py"
STAND_IN_COMMAND = [sys.executable, str(STAND_IN), "--protocol", str(wire.PROTOCOL_VERSION)]

CALLS = (
    "count_tokens",
    "embed",
    "embed_batch",
    "embed_encoded",
    "health_check",
    "model_info",
    "models",
    "ping",
    "quantization_ranges",
    "tokenize",
)
"""The calls both twins make, each written once in ``ClientBase``."""


def test_each_call_has_one_signature_in_both_twins() -> None:
    for name in CALLS:
        sync, asynchronous = getattr(EmbeddingClient, name), getattr(AsyncEmbeddingClient, name)
        assert inspect.signature(sync) == inspect.signature(asynchronous), name
        assert "Pending" not in str(inspect.signature(sync)), name
        assert not inspect.iscoroutinefunction(sync), name
        assert inspect.iscoroutinefunction(asynchronous), name
        assert inspect.getdoc(sync) and inspect.getdoc(asynchronous), name


def test_twins_methods_are_named_as_their_own() -> None:
    for twin in (EmbeddingClient, AsyncEmbeddingClient):
        for name in CALLS:
            method = getattr(twin, name)
            assert (method.__name__, method.__qualname__) == (name, f"{twin.__name__}.{name}")
            assert method.__module__ == twin.__module__
        page = pydoc.render_doc(twin, renderer=pydoc.plaintext)
        own = page.split("Methods defined here:")[1].split("inherited from")[0]
        assert "embed(self, texts: 'Sequence[str]', normalize: 'bool | None' = None" in own
        for name in CALLS:
            assert f" |  {name}(self" in own or f" |  async {name}(self" in own, name


def test_count_tokens_is_tokenize_counted() -> None:
    tokenize = inspect.signature(EmbeddingClient.tokenize)
    count_tokens = inspect.signature(EmbeddingClient.count_tokens)
    assert count_tokens.parameters == tokenize.parameters
    assert (tokenize.return_annotation, count_tokens.return_annotation) == (
        "list[list[int]]",
        "list[int]",
    )


def test_sync_twin_answers_each_call() -> None:
    with EmbeddingClient(worker_command=STAND_IN_COMMAND) as client:
        vectors = client.embed(["abc", "d"])
        assert vectors.dtype == np.float32
        assert vectors[:, 0].tolist() == [3.0, 1.0]
        assert client.model_info().model == client.models()[0].model == "stand-in/model"
        assert client.health_check() is True
        assert client.ping() > 0


def test_async_twin_starts_on_its_first_call() -> None:
    async def scenario() -> None:
        client = AsyncEmbeddingClient(worker_command=STAND_IN_COMMAND)
        try:
            assert client.stats().spawns == 0
            assert (await client.model_info()).model == "stand-in/model"
            assert client.stats().spawns == 1
            vectors = await client.embed(["abc", "d"])
            assert vectors[:, 0].tolist() == [3.0, 1.0]
            assert [info.model for info in await client.models()] == ["stand-in/model"]
            assert await client.health_check() is True
            assert await client.ping() > 0
        finally:
            await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), GUARD_TIMEOUT))
