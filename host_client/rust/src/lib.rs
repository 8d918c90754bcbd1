//! Sentence embeddings for AkiDB from one long-lived `akidb-embed` worker process (ONNX
//! Runtime in Python), spawned, supervised and called over length-prefixed msgpack on its
//! stdin and stdout. The wire contract is `protocol.md` at the root of the akidb-embed
//! repository; this crate implements version 1 of it.
//!
//! ```text
//!  caller tasks ── embed_batch(request) ──▶ texts sorted shortest first, split by the
//!    │  hello's limits into wire requests (a text over them: InvalidInput "inputs[i] ...")
//!    │  wait for in-flight text permits (backpressure: max_in_flight_texts)
//!    ▼
//!  pending: id ─▶ {frame, oneshot, attempts} ──▶ writer task ──frames──▶ worker stdin
//!    ▲                                                              │ batcher ─▶ ONNX Runtime
//!    │ oneshot(reply payload)                                       ▼
//!  reader task (routes by id) ◀──────────frames, any order──── worker stdout
//!    caller decodes its reply: bin ─▶ Vec<Vec<f32>> in one bulk little-endian conversion,
//!    rows moved to the caller's positions; an error about one text has its index mapped back
//!                                                              worker stderr ─▶ drain task
//!                                                                 ─▶ stderr_sink + tail
//!  supervisor task: stdout EOF, failed write, or no reply for request_timeout
//!    ─▶ SIGKILL + reap ─▶ backoff ─▶ new worker, hello checked ─▶ every unanswered request
//!       written again (embedding is idempotent) ─▶ callers see nothing
//!    attempts or restart budget spent, or a worker that cannot start ─▶ ServiceUnavailable
//! ```
//!
//! ```no_run
//! use akidb_embed_client::{BatchEmbeddingRequest, WorkerClient, WorkerConfig};
//!
//! # async fn demo() -> Result<(), akidb_embed_client::EmbeddingError> {
//! let client = WorkerClient::spawn(WorkerConfig {
//!     model_dir: Some("/srv/models/all-MiniLM-L6-v2".into()),
//!     ..WorkerConfig::with_command(["/srv/akidb-embed/.venv/bin/python", "-m", "akidb_embed.worker"])
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
    StderrSink, WorkerConfig, DEFAULT_CLOSE_TIMEOUT, DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT_TEXTS, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RESTART_LIMIT,
    DEFAULT_STABLE_START_TIME, DEFAULT_START_TIMEOUT, DEFAULT_WORKER_COMMAND,
};
pub use types::{
    BatchEmbeddingRequest, BatchEmbeddingResponse, EmbeddingError, EmbeddingProvider,
    EmbeddingResult, ModelInfo, Usage,
};
pub use wire::{Limits, ReadyHello};
