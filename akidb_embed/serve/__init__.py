"""``akidb-embed serve``: the supervised workers behind OpenAI's ``/v1/embeddings`` over HTTP.

::

    HTTP callers: curl, OpenAI SDKs, LangChain / LlamaIndex, AkiDB's HTTP embedder
      │ POST /v1/embeddings {"input", "model", "dimensions", "encoding_format", "user",
      │                      "normalize", "prompt_name", "truncate"}
      ▼
    uvicorn (uvloop + httptools): one event loop in this process          (_run.py)
      │ the body read chunk by chunk, refused (413) past max_body_bytes
      ▼
    EmbeddingsApp: bearer key -> route -> parse_query: 400 / 404 here      (_app.py, _schema.py)
      │ BatchEmbeddingRequest, awaited on the event loop
      ▼
    AsyncEmbeddingClient: split to the workers' limits, admit under max_in_flight_texts, route
      │ each wire request to the least-loaded worker ──► worker processes (protocol.md)
      │ ◄── vectors + token counts; a worker that dies or hangs is replaced and what it held
      │     is sent again (the HTTP caller sees only a later answer)
      ▼
    [dimensions: first N components, renormalised, unless the workers did it]
      ▼
    reply: float JSON (orjson) or base64 little-endian float32, usage = the real token counts;
      headers and body leave in one write (uvicorn alone writes them apart)     (_protocol.py)

    GET /v1/models   the served models (the workers' hello)
    GET /health      200 once every worker slot is ready, else 503 with the reason
    GET /metrics     Prometheus text: request series counted here, worker series read from
                     the client's stats at each scrape                             (_metrics.py)

Failures keep OpenAI's shape (``{"error": {message, type, param, code}}``): 400 bad input, 401
a missing or wrong API key, 404 an unknown model (or path), 413 a body over the limit, 503 when
no worker can serve (starting failed, every slot gave up, shutting down), 500 a bug.

Nothing from a request names a file or a path: models are the ones the workers loaded at
start, chosen by id. The server binds 127.0.0.1 unless told otherwise.

Why a plain ASGI app and no framework: four fixed routes need no router, and every Python step
between the socket and the workers adds to a lone query's latency on a busy CPU (the README's
"One query at a time"). Measured on the 2-core VM (loaded by other work), a POST of a
one-sentence body answered with a small JSON object through uvicorn + uvloop + httptools,
the same orjson handler either way, 1,500 keep-alive requests per round, rounds alternating:
the plain app's median round trip 166-168 us against 198-205 us through Starlette 1.x's
router and Request/Response objects.

Why uvicorn: granian 2.8.7 (a Rust HTTP stack running ASGI apps) served the same app (uvloop,
one worker, one runtime thread) beside this server, both with the real worker, taking turns on
the quiet VM (5 rounds of 100 lone one-sentence calls, then 320 calls from 16 callers): lone p50
4.06 ms against 3.93, 16 callers 490 against 520 requests/s.
"""

from akidb_embed.serve._app import EmbeddingsApp
from akidb_embed.serve._run import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PORT,
    ServeOptions,
    run_server,
)
from akidb_embed.serve._schema import truncate_dimensions

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PORT",
    "EmbeddingsApp",
    "ServeOptions",
    "run_server",
    "truncate_dimensions",
]
