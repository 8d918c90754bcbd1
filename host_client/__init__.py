"""Host client: spawns and supervises the worker process and presents AkiDB's embed_batch.

::

    from akidb_embed.host_client import BatchEmbeddingRequest, EmbeddingClient

    with EmbeddingClient() as client:              # spawns `python -m akidb_embed.worker`
        info = client.model_info()                 # ModelInfo(model, dimension, max_tokens)
        response = client.embed_batch(BatchEmbeddingRequest(info.model, ["hello", "world"]))
        response.embeddings                        # float32 array, shape (2, info.dimension)

``AsyncEmbeddingClient`` is the same for asyncio (``async with``, ``await client.embed_batch``).
``EmbeddingClient(workers=4, threads=2)`` runs a pool of four supervised workers of two ONNX
Runtime threads each and sends every request to the least-loaded one. Both twins are
thread/task-safe and pipelined, split requests of any size to fit the worker's limits,
restart a worker that dies or hangs and send its requests again, and raise only the errors of
``akidb_embed.errors`` (re-exported here). Importing this package loads neither onnxruntime nor
tokenizers: those live in the worker process only.
"""

from akidb_embed.errors import (
    EmbeddingError,
    Internal,
    InvalidInput,
    ModelNotFound,
    ProtocolError,
    RequestTimeout,
    ServiceUnavailable,
)
from akidb_embed.host_client._async import AsyncEmbeddingClient
from akidb_embed.host_client._config import ClientConfig
from akidb_embed.host_client._sync import EmbeddingClient
from akidb_embed.host_client._types import (
    BatchEmbeddingRequest,
    BatchEmbeddingResponse,
    ClientStats,
    ModelInfo,
    RequestTrace,
    Usage,
    WorkerStats,
)

__all__ = [
    "AsyncEmbeddingClient",
    "BatchEmbeddingRequest",
    "BatchEmbeddingResponse",
    "ClientConfig",
    "ClientStats",
    "EmbeddingClient",
    "EmbeddingError",
    "Internal",
    "InvalidInput",
    "ModelInfo",
    "ModelNotFound",
    "ProtocolError",
    "RequestTimeout",
    "RequestTrace",
    "ServiceUnavailable",
    "Usage",
    "WorkerStats",
]
