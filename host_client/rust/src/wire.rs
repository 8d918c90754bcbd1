//! The wire codec of protocol.md version 1: the only place where frames are built and parsed.
//!
//! A frame is a 4-byte unsigned big-endian length `N` followed by `N` bytes holding one msgpack
//! map with string keys. serde and rmp-serde do all the msgpack; this module adds the length
//! prefix, the size limit and the message types. Fields are declared in the order of the
//! protocol's examples, so that encoding them gives the golden frames byte for byte.
//!
//! Replies are decoded in two steps: the client's reader task decodes only the envelope
//! ([`ReplyEnvelope`]: `id`, `ok`, `error`) to route the payload to its caller, and the caller
//! decodes the op-specific body ([`EmbedReply`], [`HealthReply`]) from the same bytes. The
//! embeddings `bin` is borrowed from the payload, not copied, and becomes `f32`s in one bulk
//! conversion ([`embeddings_from_bytes`]).
//!
//! A field a message may lack is an `Option` where `None` means absent: decoding gives `None`
//! for a missing one (serde's rule for `Option`, here and in `types.rs`; other types say
//! `#[serde(default)]`), and a request leaves a `None` out of its map (`requests!`).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::types::{
    EmbeddingError, EmbeddingResult, ModelDescription, ModelInfo, Usage, WorkerTrace,
};

/// Major version of the wire contract; a worker announcing another one is refused.
pub const PROTOCOL_VERSION: u64 = 1;

/// Largest payload either side accepts unless the worker's hello says otherwise.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of the big-endian `u32` length that precedes every payload.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Bytes of one embedding value on the wire (little-endian IEEE 754 binary32).
pub const BYTES_PER_VALUE: usize = 4;

/// Declares request messages, each `Name = "op" { fields }`: the envelope's `id` and `op`
/// (always `"op"`, the struct's `OP`), then the fields given, in that order. A field of type
/// `Option<T>` is left out of the map while `None` (protocol.md: an absent field is the
/// worker's default), so that a request without options is the same bytes as before they
/// existed.
macro_rules! requests {
    ($($(#[$attribute:meta])* $name:ident = $op:literal { $($fields:tt)* })*) => {
        $(requests!(@fields [$(#[$attribute])* $name $op] [] $($fields)*);)*
    };
    (@fields $head:tt [$($done:tt)*]
        $(#[$field_attribute:meta])* $field:ident: Option<$inner:ty> $(, $($rest:tt)*)?
    ) => {
        requests!(@fields $head [$($done)*
            $(#[$field_attribute])*
            #[serde(skip_serializing_if = "Option::is_none")]
            pub $field: Option<$inner>,
        ] $($($rest)*)?);
    };
    (@fields $head:tt [$($done:tt)*]
        $(#[$field_attribute:meta])* $field:ident: $type:ty $(, $($rest:tt)*)?
    ) => {
        requests!(@fields $head [$($done)*
            $(#[$field_attribute])*
            pub $field: $type,
        ] $($($rest)*)?);
    };
    (@fields [$(#[$attribute:meta])* $name:ident $op:literal] [$($done:tt)*]) => {
        $(#[$attribute])*
        #[derive(Debug, Clone, Serialize)]
        pub struct $name<'a> {
            pub id: u64,
            /// Always `OP`; a field so that it is encoded second, as in the examples.
            pub op: &'static str,
            $($done)*
        }

        impl<'a> $name<'a> {
            pub const OP: &'static str = $op;
        }
    };
}

requests! {
    /// An `embed` request: AkiDB's `BatchEmbeddingRequest` with the envelope.
    EmbedRequest = "embed" {
        model: Option<&'a str>,
        inputs: &'a [String],
        normalize: bool,
        truncate: Option<bool>,
        prompt_name: Option<&'a str>,
        /// Ask the worker for its stage marks in the reply ([`EmbedReply::trace`]); written
        /// only when `true`, so an untraced request is the same bytes as before the field
        /// existed.
        #[serde(skip_serializing_if = "is_false")]
        trace: bool,
        /// `"left"` or `"right"`.
        truncation_side: Option<&'static str>,
        dimensions: Option<u32>,
        /// An [`Encoding`](crate::Encoding)'s name; the reply then names it in `dtype`.
        encoding: Option<&'static str>,
    }

    /// A `tokenize` request (protocol.md): the same text fields as `embed`.
    TokenizeRequest = "tokenize" {
        model: Option<&'a str>,
        inputs: &'a [String],
        prompt_name: Option<&'a str>,
        truncate: Option<bool>,
        truncation_side: Option<&'static str>,
    }

    /// A `quantization_ranges` request (protocol.md): the int8/uint8 ranges of an embed of the
    /// same model, dimensions and normalisation.
    RangesRequest = "quantization_ranges" {
        model: Option<&'a str>,
        dimensions: Option<u32>,
        normalize: Option<bool>,
    }
}

/// The body of a successful `quantization_ranges` reply: `shape` is `(2, dimensions)`.
#[derive(Debug, Clone, Deserialize)]
pub struct RangesReply<'a> {
    pub shape: (usize, usize),
    #[serde(borrow)]
    pub ranges: &'a serde_bytes::Bytes,
}

/// The body of a successful `tokenize` reply.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeReply {
    pub model: String,
    pub token_counts: Vec<usize>,
    pub ids: Vec<Vec<u32>>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// A request that is only an envelope: `info`, `health`, `ping`, `shutdown`.
#[derive(Debug, Clone, Serialize)]
pub struct OpRequest<'a> {
    pub id: u64,
    pub op: &'a str,
}

/// The `error` map of a failed reply or hello.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
    /// For an error about one text: its position in the request's `inputs` (the message then
    /// starts with `inputs[index]`).
    pub index: Option<usize>,
}

/// How the worker ends the message of an input over `max_tokens` sent with `truncate: false`
/// (protocol.md, section 5), and what this client says instead.
const TRUNCATE_HINT: &str = "send truncate: true";
const TRUNCATE_WORDING: &str = "leave EmbedOptions::truncate at None (the worker then truncates)";

impl WireError {
    /// The error about a request whose `inputs[i]` is the caller's `inputs[caller_index(i)]`
    /// (the request holds `texts` of them): an `index` is mapped to the caller's position and
    /// the message's `inputs[index]` prefix rewritten to match. An `index` outside the request
    /// is a protocol violation.
    pub fn for_caller(
        self,
        texts: usize,
        caller_index: impl FnOnce(usize) -> usize,
    ) -> EmbeddingError {
        let Some(index) = self.index else {
            return self.into();
        };
        if index >= texts {
            return protocol_violation(&format!(
                "error about inputs[{index}] of a request of {texts} texts"
            ));
        }
        let wire_prefix = format!("inputs[{index}]");
        let message = match self.message.strip_prefix(&wire_prefix) {
            Some(rest) => format!("inputs[{}]{rest}", caller_index(index)),
            None => self.message,
        };
        // the worker's advice in this crate's words
        let message = message.replace(TRUNCATE_HINT, TRUNCATE_WORDING);
        EmbeddingError::from_wire(&self.code, &message)
    }
}

impl From<WireError> for EmbeddingError {
    fn from(error: WireError) -> Self {
        EmbeddingError::from_wire(&error.code, &error.message)
    }
}

/// The part of every reply the reader needs to route it. Unknown keys are ignored (serde's
/// default), as the protocol requires.
#[derive(Debug, Clone, Deserialize)]
pub struct ReplyEnvelope {
    /// The request's id; `None` when the worker could not read one (a protocol error).
    pub id: Option<u64>,
    pub ok: bool,
    pub error: Option<WireError>,
}

impl ReplyEnvelope {
    /// `Ok(())` for a successful reply, else the error it carries.
    pub fn into_result(self) -> EmbeddingResult<()> {
        self.into_wire_result()?.map_err(EmbeddingError::from)
    }

    /// [`Self::into_result`] of a reply to an embed request of `texts` texts whose `inputs[i]`
    /// is the caller's `inputs[caller_index(i)]`: an error about one text names the caller's
    /// position ([`WireError::for_caller`]).
    pub fn into_embed_result(
        self,
        texts: usize,
        caller_index: impl FnOnce(usize) -> usize,
    ) -> EmbeddingResult<()> {
        self.into_wire_result()?.map_err(|error| error.for_caller(texts, caller_index))
    }

    /// The outcome as the wire has it; an error reply without an `error` map breaks the
    /// contract.
    fn into_wire_result(self) -> EmbeddingResult<Result<(), WireError>> {
        match (self.ok, self.error) {
            (true, _) => Ok(Ok(())),
            (false, Some(error)) => Ok(Err(error)),
            (false, None) => Err(protocol_violation("error reply without an `error` map")),
        }
    }
}

/// The body of a successful `embed` reply, borrowing its vectors from the payload.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbedReply<'a> {
    pub model: String,
    pub shape: (usize, usize),
    /// The encoding's name when the request named one (absent: float32).
    pub dtype: Option<String>,
    #[serde(borrow)]
    pub embeddings: &'a serde_bytes::Bytes,
    pub usage: WireUsage,
    /// The worker's stage marks, present when the request had `trace: true`.
    pub trace: Option<WorkerTrace>,
}

/// An embed reply's `usage` as the wire has it (the worker measures fractions of a
/// millisecond).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct WireUsage {
    pub total_tokens: usize,
    pub duration_ms: f64,
}

impl From<WireUsage> for Usage {
    fn from(usage: WireUsage) -> Self {
        // a negative or NaN duration (a broken clock) saturates to 0
        Usage { total_tokens: usage.total_tokens, duration_ms: usage.duration_ms.round() as u64 }
    }
}

/// The body of a successful `health` reply.
#[derive(Debug, Clone, Deserialize)]
pub struct HealthReply {
    pub status: String,
    pub dimension: Option<u32>,
    pub norm: Option<f64>,
    pub duration_ms: Option<f64>,
}

/// The worker's limits (protocol.md section 7), as announced in its hello.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_texts_per_request: usize,
    pub max_text_bytes: usize,
    pub max_batch_tokens: usize,
    pub max_pending_texts: usize,
}

/// The first frame a worker writes (protocol.md section 3). Fields that only a ready worker
/// sends are optional here so that a failed hello (`ok: false`) decodes too.
#[derive(Debug, Clone, Deserialize)]
pub struct Hello {
    pub op: String,
    pub ok: bool,
    pub protocol: u64,
    pub worker_version: Option<String>,
    pub pid: Option<u32>,
    pub model: Option<ModelInfo>,
    pub normalize_default: Option<bool>,
    /// Every loaded model, the default first; absent from a worker that serves one model only.
    pub models: Option<Vec<ModelDescription>>,
    #[serde(default)]
    pub providers: Vec<String>,
    /// ONNX Runtime runs the worker makes at once; absent from a worker without lanes.
    pub lanes: Option<usize>,
    /// Intra-op threads of the worker's sessions (0: ONNX Runtime's choice).
    pub threads: Option<usize>,
    pub limits: Option<Limits>,
    pub error: Option<WireError>,
}

/// What a ready worker announced, checked: see [`Hello::into_ready`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyHello {
    pub pid: u32,
    pub worker_version: Option<String>,
    /// The default model (the first model directory).
    pub model: ModelInfo,
    /// Whether the default model normalises by default.
    pub normalize_default: bool,
    /// Every loaded model, the default first; never empty.
    pub models: Vec<ModelDescription>,
    pub providers: Vec<String>,
    /// ONNX Runtime runs the worker makes at once (1 from a worker that does not say).
    pub lanes: usize,
    /// Intra-op threads of the worker's sessions (0: ONNX Runtime's choice, or not said).
    pub threads: usize,
    pub limits: Limits,
}

impl ReadyHello {
    /// The loaded model `id` names; the empty id names the default model, and a short name
    /// (the part after the last `/`, `all-MiniLM-L6-v2`) the one model whose id ends with it
    /// when no other does (protocol.md, `embed`).
    pub fn find_model(&self, id: &str) -> Option<&ModelDescription> {
        if id.is_empty() {
            return self.models.first();
        }
        if let Some(exact) = self.models.iter().find(|model| model.model == id) {
            return Some(exact);
        }
        let short_name = |model: &&ModelDescription| model.model.rsplit('/').next() == Some(id);
        let mut matches = self.models.iter().filter(short_name);
        match (matches.next(), matches.next()) {
            (Some(only), None) => Some(only),
            _ => None,
        }
    }

    /// The ids of the loaded models, for messages: `"a", "b"`.
    pub fn model_ids(&self) -> String {
        let ids: Vec<String> = self.models.iter().map(|m| format!("{:?}", m.model)).collect();
        ids.join(", ")
    }
}

impl Hello {
    /// The announcement of a worker ready to serve, or why it is not usable: the worker's own
    /// error for a failed hello, `Internal` for a protocol version or a hello this client
    /// cannot use.
    pub fn into_ready(self) -> EmbeddingResult<ReadyHello> {
        if self.op != "hello" {
            return Err(protocol_violation(&format!(
                "the worker's first frame is op {:?}, not a hello",
                self.op
            )));
        }
        if self.protocol != PROTOCOL_VERSION {
            return Err(EmbeddingError::Internal(format!(
                "the worker speaks protocol {}, this client speaks {PROTOCOL_VERSION}",
                self.protocol
            )));
        }
        if !self.ok {
            return Err(match self.error {
                Some(error) => error.into(),
                None => protocol_violation("failed hello without an `error` map"),
            });
        }
        let missing = |field: &str| protocol_violation(&format!("hello without `{field}`"));
        let model = self.model.ok_or_else(|| missing("model"))?;
        let normalize_default =
            self.normalize_default.ok_or_else(|| missing("normalize_default"))?;
        let models = match self.models {
            Some(models) => {
                if models.first().map(ModelDescription::info).as_ref() != Some(&model) {
                    return Err(protocol_violation(
                        "the hello's `models` does not start with its default `model`",
                    ));
                }
                models
            }
            // a worker from before several models: its one model
            None => vec![ModelDescription {
                model: model.model.clone(),
                dimension: model.dimension,
                max_tokens: model.max_tokens,
                normalize_default,
                pooling: None,
                prompts: Vec::new(),
                default_prompt_name: None,
                variant: None,
                base_model: None,
                encodings: Vec::new(),
                matryoshka_dimensions: Vec::new(),
            }],
        };
        Ok(ReadyHello {
            pid: self.pid.ok_or_else(|| missing("pid"))?,
            worker_version: self.worker_version,
            model,
            normalize_default,
            models,
            providers: self.providers,
            lanes: self.lanes.unwrap_or(1),
            threads: self.threads.unwrap_or(0),
            limits: self.limits.ok_or_else(|| missing("limits"))?,
        })
    }
}

/// An `Internal` error for a frame that broke the wire contract.
pub fn protocol_violation(what: &str) -> EmbeddingError {
    EmbeddingError::Internal(format!("[protocol_error] {what}"))
}

/// One whole frame (length prefix and payload) holding `message` as a msgpack map.
pub fn encode_frame<T: Serialize>(message: &T) -> EmbeddingResult<Vec<u8>> {
    let mut frame = vec![0; LENGTH_PREFIX_BYTES];
    rmp_serde::encode::write_named(&mut frame, message)
        .map_err(|error| EmbeddingError::Internal(format!("cannot encode a request: {error}")))?;
    let payload_len = u32::try_from(frame.len() - LENGTH_PREFIX_BYTES).map_err(|_| {
        EmbeddingError::InvalidInput("request does not fit in one frame".to_owned())
    })?;
    frame[..LENGTH_PREFIX_BYTES].copy_from_slice(&payload_len.to_be_bytes());
    Ok(frame)
}

/// A message decoded from one frame's payload (the bytes after the length prefix).
pub fn decode_payload<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> EmbeddingResult<T> {
    rmp_serde::from_slice(payload)
        .map_err(|error| protocol_violation(&format!("undecodable reply: {error}")))
}

/// Why no further frame can be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {length} bytes exceeds max_frame_bytes={max_frame_bytes}")]
    TooLarge { length: usize, max_frame_bytes: usize },
    #[error("stream ended inside a frame ({read} of {expected} bytes)")]
    Truncated { read: usize, expected: usize },
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The next frame's payload, or `None` at a clean end of stream (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_bytes: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    Ok(read_frame_timed(reader, max_frame_bytes).await?.map(|(payload, _)| payload))
}

/// [`read_frame`], with the instant the frame's first bytes were read (the reader's read of
/// the frame runs from then to the return).
pub async fn read_frame_timed<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_bytes: usize,
) -> Result<Option<(Vec<u8>, Instant)>, FrameError> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    let mut filled = 0;
    let mut first_bytes_at = None;
    while filled < LENGTH_PREFIX_BYTES {
        let read = reader.read(&mut prefix[filled..]).await?;
        if read == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated { read: filled, expected: LENGTH_PREFIX_BYTES });
        }
        first_bytes_at.get_or_insert_with(Instant::now);
        filled += read;
    }
    let length = u32::from_be_bytes(prefix) as usize;
    if length > max_frame_bytes {
        return Err(FrameError::TooLarge { length, max_frame_bytes });
    }
    let mut payload = vec![0; length];
    let mut filled = 0;
    while filled < length {
        let read = reader.read(&mut payload[filled..]).await?;
        if read == 0 {
            return Err(FrameError::Truncated { read: filled, expected: length });
        }
        filled += read;
    }
    Ok(Some((payload, first_bytes_at.unwrap_or_else(Instant::now))))
}

/// The `count` rows of `dimension` values held by `data` (row-major little-endian f32), each
/// as its bytes; a length that does not match the shape is a protocol violation.
pub fn embedding_rows(
    data: &[u8],
    count: usize,
    dimension: usize,
) -> EmbeddingResult<std::slice::ChunksExact<'_, u8>> {
    value_rows(data, count, dimension, BYTES_PER_VALUE)
}

/// [`embedding_rows`] of values of `bytes_per_value` bytes (an encoding's).
pub fn value_rows(
    data: &[u8],
    count: usize,
    width: usize,
    bytes_per_value: usize,
) -> EmbeddingResult<std::slice::ChunksExact<'_, u8>> {
    let expected = count.checked_mul(width).and_then(|n| n.checked_mul(bytes_per_value));
    if expected != Some(data.len()) || (width == 0 && count != 0) {
        return Err(protocol_violation(&format!(
            "embeddings hold {} bytes, shape {count}x{width} needs {}",
            data.len(),
            count.saturating_mul(width).saturating_mul(bytes_per_value)
        )));
    }
    Ok(data.chunks_exact((width * bytes_per_value).max(1)))
}

/// The values of one row's bytes, appended to `values`.
pub fn decode_row(row: &[u8], values: &mut Vec<f32>) {
    values.extend(row.chunks_exact(BYTES_PER_VALUE).map(value_of));
}

/// The values of one row's bytes, written over `values` (of the row's length).
pub fn decode_row_into(row: &[u8], values: &mut [f32]) {
    for (value, bytes) in values.iter_mut().zip(row.chunks_exact(BYTES_PER_VALUE)) {
        *value = value_of(bytes);
    }
}

fn value_of(bytes: &[u8]) -> f32 {
    f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The `count` vectors of `dimension` values held by `data`, in one pass over the bytes.
pub fn embeddings_from_bytes(
    data: &[u8],
    count: usize,
    dimension: usize,
) -> EmbeddingResult<Vec<Vec<f32>>> {
    Ok(embedding_rows(data, count, dimension)?
        .map(|row| {
            let mut values = Vec::with_capacity(dimension);
            decode_row(row, &mut values);
            values
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_decode_little_endian_rows() {
        let values = [1.0f32, -2.5, 0.125, 3.0e-3, 7.0, -0.0];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let rows = embeddings_from_bytes(&bytes, 2, 3).unwrap();
        assert_eq!(rows, vec![values[..3].to_vec(), values[3..].to_vec()]);
    }

    #[test]
    fn embeddings_of_the_wrong_length_are_a_protocol_violation() {
        let error = embeddings_from_bytes(&[0; 20], 2, 3).unwrap_err();
        assert!(matches!(error, EmbeddingError::Internal(ref m) if m.contains("protocol_error")));
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_is_truncated() {
        let mut whole = &[0u8, 0, 0, 2, 0x80, 0x80][..];
        assert_eq!(read_frame(&mut whole, 16).await.unwrap(), Some(vec![0x80, 0x80]));
        assert!(read_frame(&mut whole, 16).await.unwrap().is_none());
        let mut cut = &[0u8, 0, 0, 3, 0x80][..];
        assert!(matches!(read_frame(&mut cut, 16).await, Err(FrameError::Truncated { .. })));
        let mut cut_prefix = &[0u8, 0][..];
        assert!(matches!(read_frame(&mut cut_prefix, 16).await, Err(FrameError::Truncated { .. })));
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused() {
        let mut stream = &[0u8, 1, 0, 0][..];
        assert!(matches!(read_frame(&mut stream, 1024).await, Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn a_hello_of_another_protocol_version_is_refused() {
        let hello = Hello {
            op: "hello".into(),
            ok: true,
            protocol: 2,
            worker_version: None,
            pid: Some(1),
            model: None,
            normalize_default: None,
            models: None,
            providers: vec![],
            lanes: None,
            threads: None,
            limits: None,
            error: None,
        };
        let error = hello.into_ready().unwrap_err();
        assert!(matches!(error, EmbeddingError::Internal(ref m) if m.contains("protocol 2")));
    }

    fn invalid_input_about(index: Option<usize>, message: &str) -> WireError {
        WireError { code: "invalid_input".into(), message: message.into(), index }
    }

    #[test]
    fn an_error_about_one_text_names_the_callers_position() {
        let error = invalid_input_about(Some(1), "inputs[1] has 600 tokens, more than 256");
        assert_eq!(
            error.for_caller(4, |index| index + 12),
            EmbeddingError::InvalidInput("inputs[13] has 600 tokens, more than 256".into())
        );
        // Only a prefix naming that same index is rewritten.
        let error = invalid_input_about(Some(1), "the text inputs[1] is odd");
        let mapped = error.for_caller(4, |index| index + 12);
        assert_eq!(mapped, EmbeddingError::InvalidInput("the text inputs[1] is odd".into()));
        let error = invalid_input_about(None, "inputs is empty");
        let unmapped = error.for_caller(4, |_| unreachable!("no index to map"));
        assert_eq!(unmapped, EmbeddingError::InvalidInput("inputs is empty".into()));
    }

    #[test]
    fn an_error_about_a_text_outside_the_request_is_a_protocol_violation() {
        let error = invalid_input_about(Some(4), "inputs[4] has 600 tokens").for_caller(4, |i| i);
        assert!(matches!(error, EmbeddingError::Internal(ref m) if m.contains("protocol_error")));
    }

    /// An error reply as the worker writes it.
    #[derive(Serialize)]
    struct ErrorReply {
        id: u64,
        ok: bool,
        error: ErrorMap,
    }

    #[derive(Serialize)]
    struct ErrorMap {
        code: &'static str,
        message: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        index: Option<usize>,
    }

    fn error_reply_index(index: Option<usize>) -> Option<usize> {
        let error = ErrorMap { code: "invalid_input", message: "inputs[2] holds 9 bytes", index };
        let payload = rmp_serde::to_vec_named(&ErrorReply { id: 3, ok: false, error }).unwrap();
        decode_payload::<ReplyEnvelope>(&payload).unwrap().error.unwrap().index
    }

    #[test]
    fn the_error_index_is_decoded_when_present_and_optional() {
        assert_eq!(error_reply_index(Some(2)), Some(2));
        assert_eq!(error_reply_index(None), None);
    }

    #[test]
    fn unknown_error_codes_become_internal_with_the_code_kept() {
        assert_eq!(
            EmbeddingError::from_wire("brand_new", "x"),
            EmbeddingError::Internal("[brand_new] x".into())
        );
        assert_eq!(
            EmbeddingError::from_wire("invalid_input", "x"),
            EmbeddingError::InvalidInput("x".into())
        );
    }
}
