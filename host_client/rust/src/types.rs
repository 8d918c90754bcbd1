//! AkiDB's embedding interface: its request, response and model types, its error enum and the
//! shape of its `EmbeddingProvider` trait, as this crate implements them.
//!
//! What to match on:
//!
//! ```text
//! EmbeddingError
//! ├── ModelNotFound        the model named is not the loaded one, or no usable model directory
//! ├── InvalidInput         the request itself is wrong (empty, too many texts, too long);
//! │                        about one text: the message starts with `inputs[i]`, i its index
//! │                        in the caller's `inputs`
//! ├── ServiceUnavailable   no worker can answer now: it could not start, it died or hung more
//! │                        often than the budgets allow, or the client is closed
//! │                        (request timeouts are here; the message says "timed out")
//! └── Internal             a bug or broken invariant on either side, including a worker that
//!                          broke the wire contract (the message starts with "[protocol_error]")
//! ```

use std::future::Future;

use serde::{Deserialize, Serialize};

/// Everything that can go wrong in an embedding call. Each variant carries one line of English
/// for logs and people; match on the variant, not on the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbeddingError {
    /// The model named is not the loaded one, or the worker found no usable model directory.
    #[error("model not found: {0}")]
    ModelNotFound(String),
    /// The request is malformed or exceeds a limit the worker announced. Not retryable. When
    /// it is about one text, the message starts with `inputs[i]`, `i` that text's index in the
    /// caller's `inputs` (however the batch was split and ordered on the wire).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No worker can answer now (start failure, deaths or hangs beyond the budgets, timeouts,
    /// a closed client). Retrying later, or with a new client, may succeed.
    #[error("service unavailable: {0}")]
    ServiceUnavailable(String),
    /// A bug or broken invariant: an unexpected failure in the worker, or a frame that broke
    /// the wire contract.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EmbeddingError {
    /// The wire error code this error travels as (protocol.md section 5).
    pub fn code(&self) -> &'static str {
        match self {
            Self::ModelNotFound(_) => "model_not_found",
            Self::InvalidInput(_) => "invalid_input",
            Self::ServiceUnavailable(_) => "service_unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The error for an error reply's `code` and `message`. `protocol_error` and codes this
    /// client does not know become `Internal`, with the code kept at the front of the message.
    pub fn from_wire(code: &str, message: &str) -> Self {
        match code {
            "model_not_found" => Self::ModelNotFound(message.to_owned()),
            "invalid_input" => Self::InvalidInput(message.to_owned()),
            "service_unavailable" => Self::ServiceUnavailable(message.to_owned()),
            "internal" => Self::Internal(message.to_owned()),
            other => Self::Internal(format!("[{other}] {message}")),
        }
    }

    /// The same kind of error with `context` prepended to its message.
    pub(crate) fn with_context(self, context: &str) -> Self {
        match self {
            Self::ModelNotFound(m) => Self::ModelNotFound(format!("{context}: {m}")),
            Self::InvalidInput(m) => Self::InvalidInput(format!("{context}: {m}")),
            Self::ServiceUnavailable(m) => Self::ServiceUnavailable(format!("{context}: {m}")),
            Self::Internal(m) => Self::Internal(format!("{context}: {m}")),
        }
    }
}

/// AkiDB's result alias.
pub type EmbeddingResult<T> = Result<T, EmbeddingError>;

/// AkiDB's `BatchEmbeddingRequest`, plus the protocol's optional `truncate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEmbeddingRequest {
    /// The model id; it must equal the loaded model's (`ModelInfo::model`). An empty string
    /// means "whatever model the worker has loaded" (sent as no `model` at all).
    pub model: String,
    /// The texts, any number: batches over the worker's limits are split and reassembled.
    pub inputs: Vec<String>,
    /// L2-normalise each vector (what sentence-transformers does for all-MiniLM-L6-v2).
    pub normalize: bool,
    /// `Some(false)`: an input longer than the model's `max_tokens` fails the request with
    /// `InvalidInput` instead of being cut. `None` leaves it to the worker (which truncates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

impl BatchEmbeddingRequest {
    /// A request for normalised vectors of `inputs`, truncating over-long inputs.
    pub fn new(model: impl Into<String>, inputs: Vec<String>) -> Self {
        Self { model: model.into(), inputs, normalize: true, truncate: None }
    }
}

/// AkiDB's `BatchEmbeddingResponse`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchEmbeddingResponse {
    /// The model that produced the vectors.
    pub model: String,
    /// One vector of `ModelInfo::dimension` values per input, in the order of the inputs.
    pub embeddings: Vec<Vec<f32>>,
    /// What the worker spent on the request.
    pub usage: Usage,
}

/// AkiDB's `Usage`, with the types the wire carries.
///
/// `duration_ms` is an `f64` because the worker measures fractions of a millisecond (AkiDB's
/// own struct has `u64`: convert with `usage.duration_ms.round() as u64`). It runs from the
/// worker reading the request to the worker writing the reply. When a batch was split into
/// several wire requests, `total_tokens` is their sum and `duration_ms` the longest of them
/// (they are written together and run in the worker's shared batches).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens the model ran, special tokens included, after truncation, padding not counted.
    pub total_tokens: usize,
    /// Worker-side milliseconds, see the type's documentation.
    pub duration_ms: f64,
}

/// AkiDB's `ModelInfo`: what the worker announced in its hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model id, e.g. the Hugging Face name.
    pub model: String,
    /// Length of each embedding vector.
    pub dimension: u32,
    /// Most tokens per input (special tokens included); longer inputs are truncated or refused.
    pub max_tokens: usize,
}

/// The shape of AkiDB's `EmbeddingProvider` trait, written with `impl Future` so that no
/// `async-trait` dependency is needed and the futures are `Send` (spawnable on tokio).
///
/// AkiDB's own trait is object-safe through `#[async_trait]`; an adapter there is three
/// one-line methods that await these.
pub trait EmbeddingProvider: Send + Sync {
    /// Embeds every input of `request`, in order.
    fn embed_batch(
        &self,
        request: BatchEmbeddingRequest,
    ) -> impl Future<Output = EmbeddingResult<BatchEmbeddingResponse>> + Send;

    /// The loaded model's id, dimension and token limit.
    fn model_info(&self) -> impl Future<Output = EmbeddingResult<ModelInfo>> + Send;

    /// `Ok(())` when the worker embeds a fixed sentence correctly right now.
    fn health_check(&self) -> impl Future<Output = EmbeddingResult<()>> + Send;
}
