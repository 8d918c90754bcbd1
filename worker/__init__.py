"""The worker process: holds the ONNX Runtime session and serves frames on stdio (protocol.md).

Run it as ``python -m akidb_embed.worker`` or ``akidb-embed-worker`` (``__main__``). Modules, in
the order a request meets them: ``stdio`` (the fd guard), ``server`` (reader, writer,
lifecycle), ``validation`` (requests), ``batcher`` (dynamic batching), ``engine`` (tokenizer and
ONNX Runtime), with ``providers`` (execution provider choice) and ``config`` (settings and
defaults).

In-process use, without the bridge::

    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    engine = Engine.load(WorkerConfig())          # or WorkerConfig(model_dir=..., threads=...)
    vectors = engine.embed(["some text", ...])    # (n, dimension) float32, L2-normalised

This package imports nothing on purpose: the worker must guard its stdio before onnxruntime
and tokenizers are loaded.
"""
