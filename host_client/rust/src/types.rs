//! AkiDB's embedding interface, field for field: its request, response and model types and its
//! error enum (`crates/akidb-embedding/src/types.rs`), and the shape of its `EmbeddingProvider`
//! trait. What the worker offers beyond them sits beside them: [`EmbedOptions`] (prompt name,
//! truncation) and [`ModelDescription`] (the facts of every loaded model).
//!
//! What to match on:
//!
//! ```text
//! EmbeddingError
//! ├── ModelNotFound        the model named is not loaded, no usable model directory, or the
//! │                        worker serves another model than `WorkerConfig::expected_model`
//! ├── InvalidInput         the request itself is wrong (empty, too many texts, too long, an
//! │                        unknown prompt name); about one text: the message starts with
//! │                        `inputs[i]`, i its index in the caller's `inputs`
//! ├── ServiceUnavailable   no worker can answer now: it could not start, it died or hung more
//! │                        often than the budgets allow, the client is closed, or the tokio
//! │                        runtime that ran its supervisor has shut down (request timeouts are
//! │                        here; the message says "timed out")
//! └── Internal             a bug or broken invariant on either side, including a worker that
//!                          broke the wire contract (the message starts with "[protocol_error]")
//! ```

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Declares an error enum of AkiDB's shape: its four variants, in AkiDB's order, each holding
/// one line of English and displayed with AkiDB's words. The attributes given (documentation,
/// derives, which must include `thiserror::Error`) go on the enum. [`EmbeddingError`] is one;
/// the `akidb/` crate declares its stand-in for AkiDB's own with it, so that the two display
/// alike.
#[doc(hidden)]
#[macro_export]
macro_rules! akidb_error_enum {
    ($(#[$attribute:meta])* $visibility:vis enum $name:ident) => {
        $(#[$attribute])*
        $visibility enum $name {
            /// The model named is not loaded, or the worker found no usable model directory.
            #[error("Model not found: {0}")]
            ModelNotFound(String),
            /// The request is malformed or exceeds a limit the worker announced. Not
            /// retryable. When it is about one text, the message starts with `inputs[i]`, `i`
            /// that text's index in the caller's `inputs` (however the batch was split and
            /// ordered on the wire).
            #[error("Invalid input: {0}")]
            InvalidInput(String),
            /// No worker can answer now (start failure, deaths or hangs beyond the budgets,
            /// timeouts, a closed client, a supervisor whose runtime is gone). Retrying later,
            /// or with a new client, may succeed.
            #[error("Service unavailable: {0}")]
            ServiceUnavailable(String),
            /// A bug or broken invariant: an unexpected failure in the worker, or a frame that
            /// broke the wire contract.
            #[error("Internal error: {0}")]
            Internal(String),
        }
    };
}

akidb_error_enum! {
    /// Everything that can go wrong in an embedding call: AkiDB's variants and messages. Each
    /// carries one line of English for logs and people; match on the variant, not on the text.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum EmbeddingError
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

    /// This error as another enum of AkiDB's shape, given that enum's variant constructors in
    /// AkiDB's order (`[ModelNotFound, InvalidInput, ServiceUnavailable, Internal]`): the
    /// conversion to AkiDB's own `EmbeddingError` in one line.
    pub fn into_variant_of<E>(self, variants: [fn(String) -> E; 4]) -> E {
        let [model_not_found, invalid_input, service_unavailable, internal] = variants;
        match self {
            Self::ModelNotFound(m) => model_not_found(m),
            Self::InvalidInput(m) => invalid_input(m),
            Self::ServiceUnavailable(m) => service_unavailable(m),
            Self::Internal(m) => internal(m),
        }
    }

    /// The same kind of error with its message rewritten by `edit`.
    pub(crate) fn map_message(self, edit: impl FnOnce(String) -> String) -> Self {
        match self {
            Self::ModelNotFound(m) => Self::ModelNotFound(edit(m)),
            Self::InvalidInput(m) => Self::InvalidInput(edit(m)),
            Self::ServiceUnavailable(m) => Self::ServiceUnavailable(edit(m)),
            Self::Internal(m) => Self::Internal(edit(m)),
        }
    }
}

/// AkiDB's result alias.
pub type EmbeddingResult<T> = Result<T, EmbeddingError>;

/// What AkiDB's providers answer to a request without inputs (the clients of every language
/// agree: `InvalidInput`, before anything is sent).
pub const EMPTY_BATCH_MESSAGE: &str = "empty input batch";

/// AkiDB's `BatchEmbeddingRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEmbeddingRequest {
    /// The model id: one of the loaded models (`WorkerClient::models`). An empty string means
    /// the default model (the first model directory), sent as no `model` at all.
    pub model: String,
    /// The texts, at least one: batches over the worker's limits are split and reassembled.
    pub inputs: Vec<String>,
    /// L2-normalise each vector. Sent as given (AkiDB's field is a plain bool, `false` when
    /// absent from serialized data); [`BatchEmbeddingRequest::new`] sets it to `true`.
    #[serde(default)]
    pub normalize: bool,
}

impl BatchEmbeddingRequest {
    /// A request for normalised vectors of `inputs` (what sentence-transformers' models with a
    /// Normalize module, such as all-MiniLM-L6-v2, give).
    pub fn new(model: impl Into<String>, inputs: Vec<String>) -> Self {
        Self { model: model.into(), inputs, normalize: true }
    }
}

/// What an embed request can ask beyond AkiDB's fields (protocol.md, `embed`); the default is
/// the worker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmbedOptions {
    /// One of the model's prompt names ([`ModelDescription::prompts`]): the worker puts that
    /// prompt's text before every input. `None`: the model's default prompt, if it has one.
    pub prompt_name: Option<String>,
    /// `Some(false)`: an input longer than the model's `max_tokens` fails the request with
    /// `InvalidInput` instead of being cut. `None` leaves it to the worker (which truncates).
    pub truncate: Option<bool>,
    /// Which end of an over-long input is cut; `None`: the worker's default, the right.
    pub truncation_side: Option<TruncationSide>,
    /// Keep each vector's first `dimensions` components (re-normalised when normalising:
    /// sentence-transformers' `truncate_dim`); from 1 to the model's dimension, a multiple of
    /// 8 for the packed encodings. `None`: all of them.
    pub dimensions: Option<u32>,
}

/// Which end of an input longer than `max_tokens` the worker cuts (protocol.md,
/// `truncation_side`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TruncationSide {
    /// Keep the start (the default).
    #[default]
    Right,
    /// Keep the end, as sentence-transformers with `tokenizer.truncation_side = "left"`.
    Left,
}

impl TruncationSide {
    /// The wire's name.
    pub fn as_str(self) -> &'static str {
        match self {
            TruncationSide::Right => "right",
            TruncationSide::Left => "left",
        }
    }
}

/// What an embed reply's values are (protocol.md, `encoding`): sentence-transformers'
/// `quantize_embeddings` precisions, and half floats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// f32 per component (the default).
    #[default]
    Float32,
    /// IEEE half per component.
    Float16,
    /// i8 per component over the model's calibrated per-dimension ranges.
    Int8,
    /// u8 per component over the same ranges.
    Uint8,
    /// Sign bits, 8 components per byte (first in the high bit), as i8 (byte - 128).
    Binary,
    /// The same bits as u8.
    Ubinary,
}

impl Encoding {
    /// The wire's name (the reply's `dtype`).
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Float32 => "float32",
            Encoding::Float16 => "float16",
            Encoding::Int8 => "int8",
            Encoding::Uint8 => "uint8",
            Encoding::Binary => "binary",
            Encoding::Ubinary => "ubinary",
        }
    }

    /// Bytes of one value on the wire.
    pub fn bytes_per_value(self) -> usize {
        match self {
            Encoding::Float32 => 4,
            Encoding::Float16 => 2,
            _ => 1,
        }
    }
}

/// The vectors of [`WorkerClient::embed_encoded`] as the encoding has them, row-major, one row
/// of `width` values per input in the caller's order.
///
/// [`WorkerClient::embed_encoded`]: crate::WorkerClient::embed_encoded
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEmbeddings {
    pub model: String,
    pub encoding: Encoding,
    /// Values per row: the dimensions kept, or their bytes (dimensions / 8) when bit-packed.
    pub width: usize,
    pub values: EncodedValues,
    pub usage: Usage,
}

/// The values of [`EncodedEmbeddings`], typed by encoding.
#[derive(Debug, Clone, PartialEq)]
pub enum EncodedValues {
    Float32(Vec<f32>),
    /// IEEE half floats as their bits ([`f16_bits_to_f32`] widens one).
    Float16(Vec<u16>),
    /// `int8` and `binary`.
    Int8(Vec<i8>),
    /// `uint8` and `ubinary`.
    Uint8(Vec<u8>),
}

impl EncodedValues {
    /// How many values it holds.
    pub fn len(&self) -> usize {
        match self {
            EncodedValues::Float32(values) => values.len(),
            EncodedValues::Float16(values) => values.len(),
            EncodedValues::Int8(values) => values.len(),
            EncodedValues::Uint8(values) => values.len(),
        }
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Empty values of `encoding`, with room for `capacity`.
    pub(crate) fn with_capacity(encoding: Encoding, capacity: usize) -> Self {
        match encoding {
            Encoding::Float32 => EncodedValues::Float32(Vec::with_capacity(capacity)),
            Encoding::Float16 => EncodedValues::Float16(Vec::with_capacity(capacity)),
            Encoding::Int8 | Encoding::Binary => EncodedValues::Int8(Vec::with_capacity(capacity)),
            Encoding::Uint8 | Encoding::Ubinary => {
                EncodedValues::Uint8(Vec::with_capacity(capacity))
            }
        }
    }

    /// Writes the little-endian bytes of one row at `start` (values), growing to `total`.
    pub(crate) fn put_row(&mut self, start: usize, total: usize, row: &[u8]) {
        fn put<T: Copy + Default>(values: &mut Vec<T>, start: usize, total: usize, row: &[T]) {
            if values.len() < total {
                values.resize(total, T::default());
            }
            values[start..start + row.len()].copy_from_slice(row);
        }
        match self {
            EncodedValues::Float32(values) => {
                let row: Vec<f32> = row
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                put(values, start, total, &row)
            }
            EncodedValues::Float16(values) => {
                let row: Vec<u16> =
                    row.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                put(values, start, total, &row)
            }
            EncodedValues::Int8(values) => {
                let row: Vec<i8> = row.iter().map(|&byte| byte as i8).collect();
                put(values, start, total, &row)
            }
            EncodedValues::Uint8(values) => put(values, start, total, row),
        }
    }
}

/// The f32 value of IEEE half-precision `bits` (subnormals, infinities and NaN included).
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((bits >> 10) & 0x1f);
    let fraction = f32::from(bits & 0x03ff);
    match exponent {
        0 => sign * fraction * 2f32.powi(-24),
        31 if fraction == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        _ => sign * (1.0 + fraction / 1024.0) * 2f32.powi(exponent - 15),
    }
}

/// The vectors of a traced call ([`WorkerClient::embed_traced`]) and where each of its wire
/// requests spent its time.
///
/// [`WorkerClient::embed_traced`]: crate::WorkerClient::embed_traced
#[derive(Debug, Clone, PartialEq)]
pub struct TracedEmbedding {
    /// What `embed_batch_with` would have answered.
    pub response: BatchEmbeddingResponse,
    /// One trace per wire request, in sending order (shortest texts first); a lone query, or
    /// any batch within the worker's limits, is one wire request.
    pub traces: Vec<RequestTrace>,
}

/// Where one wire request of a traced call spent its time: the client's stages, measured on
/// the client's clock, and the worker's marks ([`WorkerTrace`]), on the worker's. Only
/// durations are compared across the two clocks: [`pipes_and_wakeups`] is what remains of
/// `total` once every measured stage is taken out.
///
/// ```text
/// caller ── client_encode ──▶ frame ── client_write ──▶ worker stdin
///   worker: read ─ parse ─ tokenize ─ queue ─ ort_run ─ pool ─ reply_encode ─▶ stdout
/// reader ── reader_read ──▶ delivered ── caller_wakeup ──▶ caller ── client_decode ──▶ done
/// total: from the start of client_encode to the end of client_decode
/// ```
///
/// Meant for a lone request: when several wire requests are in flight together, their stages
/// overlap and each total includes waiting for the others.
///
/// [`pipes_and_wakeups`]: RequestTrace::pipes_and_wakeups
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTrace {
    /// The worker's marks for this request; `None` from a worker that predates tracing (it
    /// ignores the request's `trace`).
    pub worker: Option<WorkerTrace>,
    /// Request to frame bytes (msgpack encoding and the length prefix).
    pub client_encode: Duration,
    /// Frame ready to frame written to the worker's stdin: the hand-over to whoever writes it
    /// (the caller itself when the stream is idle, else the worker's writer task) and the
    /// write system calls.
    pub client_write: Duration,
    /// The client's reader: from the first bytes of the reply frame read off the worker's
    /// stdout to the reply handed to the caller (the rest of the frame, the envelope decoded,
    /// the request looked up by id).
    pub reader_read: Duration,
    /// From the reply handed to the caller to the caller running again.
    pub caller_wakeup: Duration,
    /// The caller decoding the reply: envelope, body, vectors to `f32`s in the caller's order.
    pub client_decode: Duration,
    /// From the start of `client_encode` to the end of `client_decode`.
    pub total: Duration,
}

impl RequestTrace {
    /// Every measured stage, client's and worker's, summed.
    pub fn measured(&self) -> Duration {
        self.client_encode
            + self.client_write
            + self.worker.map_or(Duration::ZERO, |worker| worker.stages())
            + self.reader_read
            + self.caller_wakeup
            + self.client_decode
    }

    /// `total` minus every measured stage: the two pipe transits, the wake-ups of the worker's
    /// reader and of the client's reader, and the worker's moments outside its marked stages
    /// (building the reply, writing it). A traced reply is encoded twice by the worker (once
    /// more to time it), so this also holds one extra `reply_encode` that an untraced call
    /// does not spend. Zero if the stages add up to more (clock granularity).
    pub fn pipes_and_wakeups(&self) -> Duration {
        self.total.saturating_sub(self.measured())
    }
}

/// The worker's stage marks for one traced embed request (protocol.md, `embed`, `trace`):
/// instants of the worker's monotonic clock in nanoseconds (`CLOCK_MONOTONIC` on Linux), and
/// the time it took to encode the reply. The methods give the stages as durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct WorkerTrace {
    /// The request's frame was read whole.
    pub read: u64,
    /// It was decoded and validated.
    pub parsed: u64,
    /// Its texts were tokenized.
    pub tokenized: u64,
    /// It was put in the batching queue; `None` when the worker ran it at once (a lone query).
    pub queued: Option<u64>,
    /// The model run holding its first text began.
    pub started: u64,
    /// The model run holding its last text returned.
    pub ran: u64,
    /// Its vectors were pooled (and normalised).
    pub pooled: u64,
    /// Nanoseconds the worker took to encode the reply (a duration, not a mark).
    pub encode_ns: u64,
}

impl WorkerTrace {
    fn between(from: u64, to: u64) -> Duration {
        Duration::from_nanos(to.saturating_sub(from))
    }

    /// `parsed - read`: decoding and validating the request.
    pub fn parse(&self) -> Duration {
        Self::between(self.read, self.parsed)
    }

    /// `tokenized - parsed`.
    pub fn tokenize(&self) -> Duration {
        Self::between(self.parsed, self.tokenized)
    }

    /// `started - (queued, or tokenized when it was not queued)`: waiting for the model.
    pub fn queue(&self) -> Duration {
        Self::between(self.queued.unwrap_or(self.tokenized), self.started)
    }

    /// `ran - started`: ONNX Runtime's run.
    pub fn ort_run(&self) -> Duration {
        Self::between(self.started, self.ran)
    }

    /// `pooled - ran`: pooling and normalising.
    pub fn pool(&self) -> Duration {
        Self::between(self.ran, self.pooled)
    }

    /// `encode_ns`: encoding the reply.
    pub fn reply_encode(&self) -> Duration {
        Duration::from_nanos(self.encode_ns)
    }

    /// The sum of the stages above (the moments between them are not included).
    pub fn stages(&self) -> Duration {
        self.parse()
            + self.tokenize()
            + self.queue()
            + self.ort_run()
            + self.pool()
            + self.reply_encode()
    }
}

/// AkiDB's `BatchEmbeddingResponse`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchEmbeddingResponse {
    /// The model that produced the vectors.
    pub model: String,
    /// One vector of the model's dimension per input, in the order of the inputs.
    pub embeddings: Vec<Vec<f32>>,
    /// What the worker spent on the request.
    pub usage: Usage,
}

/// A batch's vectors in one buffer instead of one `Vec` each (an extra beside AkiDB's
/// [`BatchEmbeddingResponse`]: one allocation for the whole batch, rows contiguous for a copy
/// into an index or a matrix library).
#[derive(Debug, Clone, PartialEq)]
pub struct FlatEmbeddings {
    /// The model that produced the vectors.
    pub model: String,
    /// Values per vector.
    pub dimension: usize,
    /// `inputs.len() * dimension` values, row-major: row `i` is the vector of `inputs[i]`.
    pub values: Vec<f32>,
    pub usage: Usage,
}

impl FlatEmbeddings {
    /// The vector of `inputs[index]`.
    pub fn row(&self, index: usize) -> &[f32] {
        &self.values[index * self.dimension..(index + 1) * self.dimension]
    }

    /// Every vector, in the order of the inputs.
    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.values.chunks_exact(self.dimension.max(1))
    }
}

/// AkiDB's `Usage`.
///
/// `duration_ms` runs from the worker reading the request to the worker writing the reply,
/// rounded to whole milliseconds. When a batch was split into several wire requests,
/// `total_tokens` is their sum and `duration_ms` the longest of them (they are written together
/// and run in the worker's shared batches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens the model ran, special tokens included, after truncation, padding not counted.
    pub total_tokens: usize,
    /// Worker-side milliseconds, see the type's documentation.
    pub duration_ms: u64,
}

/// AkiDB's `ModelInfo`: what the worker announced of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model id, e.g. the Hugging Face name.
    pub model: String,
    /// Length of each embedding vector.
    pub dimension: u32,
    /// Most tokens per input (special tokens included); longer inputs are truncated or refused.
    pub max_tokens: usize,
}

/// Everything the worker announced of one loaded model (an entry of the hello's `models`).
/// From a worker that predates `models`, the one model with what its hello says (`pooling`
/// unknown, no prompts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDescription {
    pub model: String,
    pub dimension: u32,
    pub max_tokens: usize,
    /// Whether the model's own pipeline normalises (a Normalize module).
    pub normalize_default: bool,
    /// `mean`, `cls`, `max` or `lasttoken`.
    pub pooling: Option<String>,
    /// The names [`EmbedOptions::prompt_name`] accepts.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// The prompt applied when a request names none.
    pub default_prompt_name: Option<String>,
    /// `None`: the model as exported; `Some("int8")`: a quantised variant of `base_model`
    /// that passed the quality gate against it.
    pub variant: Option<String>,
    /// A variant's fp32 model id.
    pub base_model: Option<String>,
    /// The encodings ([`Encoding::as_str`]) an embed of this model may ask for; empty from a
    /// worker older than encodings (float32 only).
    #[serde(default)]
    pub encodings: Vec<String>,
    /// The shorter [`EmbedOptions::dimensions`] the model was trained for (Matryoshka),
    /// largest first, where its files list them.
    #[serde(default)]
    pub matryoshka_dimensions: Vec<u32>,
}

impl ModelDescription {
    /// AkiDB's view of this model.
    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            model: self.model.clone(),
            dimension: self.dimension,
            max_tokens: self.max_tokens,
        }
    }
}

/// The shape of AkiDB's `EmbeddingProvider` trait, written with `impl Future` so that no
/// `async-trait` dependency is needed and the futures are `Send` (spawnable on tokio).
///
/// AkiDB's own trait is object-safe through `#[async_trait]`; the adapter that implements it
/// is `akidb/akidb_embed_provider.rs` in this crate's directory.
pub trait EmbeddingProvider: Send + Sync {
    /// Embeds every input of `request`, in order.
    fn embed_batch(
        &self,
        request: BatchEmbeddingRequest,
    ) -> impl Future<Output = EmbeddingResult<BatchEmbeddingResponse>> + Send;

    /// The default model's id, dimension and token limit.
    fn model_info(&self) -> impl Future<Output = EmbeddingResult<ModelInfo>> + Send;

    /// `Ok(())` when the worker embeds a fixed sentence correctly right now.
    fn health_check(&self) -> impl Future<Output = EmbeddingResult<()>> + Send;
}
