//! Sentence embeddings for AkiDB from long-lived `akidb-embed` worker processes (ONNX Runtime
//! in Python): a pool of `WorkerConfig::workers` (one by default), each spawned, supervised and
//! called over length-prefixed msgpack on its stdin and stdout. The wire contract is
//! `protocol.md` at the root of the akidb-embed repository; this crate implements version 1 of
//! it.
//!
//! ```text
//!  caller tasks, any runtime ── embed_batch(request) ──▶  client.rs: empty? InvalidInput;
//!    │  texts sorted shortest first, split by the hello's limits into wire requests, each
//!    │  with its estimated tokens (chunking.rs, protocol.md section 10; a text over the
//!    │  limits: InvalidInput "inputs[i] ...")
//!    ▼
//!  dispatch.rs  Dispatcher::submit: wait for in-flight text permits (max_in_flight_texts)
//!    pending: id ─▶ {frame, oneshot, attempts, tokens} ─▶ routed to the ready worker with
//!    the fewest estimated tokens outstanding (a bulk request does not hold up queries)
//!          │                         │                          │
//!          ▼ supervisor.rs, one per worker: stdin_lane.rs ──frames──▶ worker stdin (the
//!    │       caller writes its own frame when the stdin is idle, else the lane's writer task)
//!    ▲                                                              │ batcher ─▶ ONNX Runtime
//!    │ oneshot(reply payload)                                       ▼
//!  reader task ─▶ Dispatcher: by id ◀──────frames, any order──── worker stdout
//!    the caller decodes its reply (wire.rs): bin ─▶ Vec<Vec<f32>> in one bulk little-endian
//!    conversion, rows moved to the caller's positions, an error's text index mapped back
//!                                                   worker stderr ─▶ drain task (process.rs)
//!                                                     ─▶ tracing (akidb_embed_client::worker)
//!  a worker's supervisor: stdout EOF, failed write, or no reply for request_timeout
//!    ─▶ SIGKILL + reap ─▶ its unanswered requests back to the dispatcher, one attempt spent,
//!       routed at once to another ready worker (or held for the replacement) ─▶ backoff ─▶
//!       new worker (process.rs, through the Spawner), hello checked ─▶ routed to again ─▶
//!       callers see nothing
//!    attempts spent ─▶ that call fails (ServiceUnavailable); a worker's restart budget spent
//!       or a replacement that cannot start ─▶ that worker gives up, the others serve on;
//!       every worker given up ─▶ every call fails (ServiceUnavailable)
//!  a supervisor task dropped (its runtime shut down) ─▶ every waiting and later call fails at
//!    once with ServiceUnavailable; model_info too
//! ```
//!
//! The modules depend one way: `client` ─▶ `chunking`, and `client` ─▶ `dispatch` ─▶
//! `supervisor` ─▶ `stdin_lane`, `process` ─▶ `wire`, all of them on `types` and `config` (the
//! supervisor reaches the dispatcher only through its own `Pool` trait, which the dispatcher
//! implements). Workers are started through `process::Spawner`, the seam `supervision_tests`
//! fills with fake workers.
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

mod chunking;
mod client;
mod config;
mod dispatch;
mod process;
mod stdin_lane;
#[cfg(test)]
mod supervision_tests;
mod supervisor;
mod types;
pub mod wire;

pub use client::WorkerClient;
pub use config::{
    auto_workers, env, WorkerConfig, CPUS_PER_WORKER, DEFAULT_CLOSE_TIMEOUT, DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT_TEXTS, DEFAULT_PYTHON, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RESTART_LIMIT,
    DEFAULT_STABLE_START_TIME, DEFAULT_START_TIMEOUT, WORKER_MODULE,
};
pub use dispatch::{ClientStats, WorkerStats};
pub use types::{
    f16_bits_to_f32, BatchEmbeddingRequest, BatchEmbeddingResponse, EmbedOptions, EmbeddingError,
    EmbeddingProvider, EmbeddingResult, EncodedEmbeddings, EncodedValues, Encoding,
    ModelDescription, ModelInfo, RequestTrace, TracedEmbedding, TruncationSide, Usage, WorkerTrace,
    EMPTY_BATCH_MESSAGE,
};
pub use wire::{Limits, ReadyHello};
