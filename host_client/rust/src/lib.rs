//! Sentence embeddings for AkiDB from one long-lived `akidb-embed` worker process (ONNX
//! Runtime in Python), spawned, supervised and called over length-prefixed msgpack on its
//! stdin and stdout. The wire contract is `protocol.md` at the root of the akidb-embed
//! repository; this crate implements version 1 of it.
//!
//! ```text
//!  caller tasks, any runtime ── embed_batch(request) ──▶  client.rs: empty? InvalidInput;
//!    │  texts sorted shortest first, split by the hello's limits into wire requests
//!    │  (a text over them: InvalidInput "inputs[i] ...")
//!    ▼
//!  supervisor.rs  Service::submit: wait for in-flight text permits (max_in_flight_texts)
//!    pending: id ─▶ {frame, oneshot, attempts} ──▶ writer task ──frames──▶ worker stdin
//!    ▲                                                              │ batcher ─▶ ONNX Runtime
//!    │ oneshot(reply payload)                                       ▼
//!  reader task (routes by id) ◀──────────frames, any order──── worker stdout
//!    the caller decodes its reply (wire.rs): bin ─▶ Vec<Vec<f32>> in one bulk little-endian
//!    conversion, rows moved to the caller's positions, an error's text index mapped back
//!                                                   worker stderr ─▶ drain task (process.rs)
//!                                                     ─▶ tracing (akidb_embed_client::worker)
//!  supervisor task: stdout EOF, failed write, or no reply for request_timeout
//!    ─▶ SIGKILL + reap ─▶ backoff ─▶ new worker (process.rs), hello checked ─▶ every
//!       unanswered request written again (embedding is idempotent) ─▶ callers see nothing
//!    attempts or restart budget spent, or a worker that cannot start ─▶ ServiceUnavailable
//!  supervisor task dropped (its runtime shut down) ─▶ every waiting and later call fails at
//!    once with ServiceUnavailable; model_info too
//! ```
//!
//! The modules depend one way: `client` ─▶ `supervisor` ─▶ `process` ─▶ `wire`, all of them on
//! `types` and `config`.
//!
//! ```no_run
//! use akidb_embed_client::{BatchEmbeddingRequest, WorkerClient, WorkerConfig};
//!
//! # async fn demo() -> Result<(), akidb_embed_client::EmbeddingError> {
//! let client = WorkerClient::spawn(WorkerConfig {
//!     model_dirs: vec!["/srv/models/all-MiniLM-L6-v2".into()],
//!     expected_model: Some("sentence-transformers/all-MiniLM-L6-v2".into()),
//!     ..WorkerConfig::from_python("/srv/akidb-embed/.venv/bin/python")
//! })
//! .await?;
//! let model = client.model_info().await?.model;
//! let response = client
//!     .embed_batch(BatchEmbeddingRequest::new(model, vec!["hello world".into()]))
//!     .await?;
//! assert_eq!(response.embeddings.len(), 1);
//! client.close().await;
//! # Ok(())
//! # }
//! ```

mod client;
mod config;
mod process;
mod supervisor;
mod types;
pub mod wire;

pub use client::WorkerClient;
pub use config::{
    env, WorkerConfig, DEFAULT_CLOSE_TIMEOUT, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_IN_FLIGHT_TEXTS,
    DEFAULT_PYTHON, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RESTART_LIMIT, DEFAULT_STABLE_START_TIME,
    DEFAULT_START_TIMEOUT, WORKER_MODULE,
};
pub use types::{
    BatchEmbeddingRequest, BatchEmbeddingResponse, EmbedOptions, EmbeddingError, EmbeddingProvider,
    EmbeddingResult, ModelDescription, ModelInfo, Usage, EMPTY_BATCH_MESSAGE,
};
pub use wire::{Limits, ReadyHello};
