//! How a call's texts are cut into wire requests: the worker accepts each, its reply fits a
//! frame, and the worker answers it within a few of its batches.
//!
//! protocol.md section 10 ("Cutting a call into requests") is the definition of the cut and of
//! every constant below; the Python client's `host_client/chunking.py` follows the same page,
//! and both are checked against the cases of `tests/golden/chunking.json`.
//!
//! ```text
//!  caller's texts ──shortest_first──▶ texts in sending order (order[i] = caller's index)
//!      │ ChunkPlan::new(hello's limits, served model, max_in_flight_texts, model, prompt)
//!      ▼
//!  ChunkPlan::split ──▶ [start, stop) ranges ──▶ one wire request each (client.rs)
//! ```

use std::ops::Range;

use crate::types::{EmbeddingError, EmbeddingResult, ModelDescription};
use crate::wire::{Limits, BYTES_PER_VALUE};

// The constants of protocol.md section 10: change them there and in host_client/chunking.py
// together (tests/golden/chunking.json checks both). Its `BYTES_PER_VALUE` is the codec's
// (`wire::BYTES_PER_VALUE`, a float32: the widest encoding bounds a reply row).

/// Room in an embed or tokenize request for everything but its texts, its model name and its
/// prompt name: id, op, flags and options take at most 145 bytes of msgpack.
const REQUEST_ENVELOPE_BYTES: usize = 256;
/// Room in an embed reply for everything but its vectors, their bin header and its model id:
/// id, ok, shape, dtype, usage and trace take about 250 bytes of msgpack at most.
const REPLY_ENVELOPE_BYTES: usize = 256;
/// Largest msgpack header of one str or bin (str 32, bin 32).
const TEXT_HEADER_BYTES: usize = 5;
/// [CLS] and [SEP] around every input (an estimate: only chunk sizes and routing depend on it).
const SPECIAL_TOKENS: usize = 2;
/// An embed wire request carries about this many of the worker's ONNX Runtime runs
/// (`max_batch_tokens`) of estimated tokens: a busy worker then answers something every few
/// seconds, which is how `request_timeout` tells a busy worker from a hung one.
const CHUNK_MICRO_BATCHES: usize = 4;

/// How much one wire request of a call may carry, from a worker's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkPlan {
    /// Texts per request: the hello's `max_texts_per_request`, the client's
    /// `max_in_flight_texts` and the rows a reply frame holds, at least 1.
    max_texts: usize,
    /// Room in a request frame for its texts, each counted with its str header.
    max_payload_bytes: usize,
    /// The longest text a request can carry, in UTF-8 bytes; a longer one is refused.
    max_text_bytes: usize,
    /// The model's `max_tokens`: no text is estimated above it (truncation).
    max_tokens_per_text: usize,
    /// Estimated tokens per request (`CHUNK_MICRO_BATCHES` runs of the worker).
    max_chunk_tokens: usize,
}

impl ChunkPlan {
    /// The plan of requests for `served` under the hello's `limits`, whose `model` field is
    /// `sent_model` (`None`: nil, the default model) and whose `prompt_name` is `prompt_name`.
    pub(crate) fn new(
        limits: &Limits,
        served: &ModelDescription,
        max_in_flight_texts: usize,
        sent_model: Option<&str>,
        prompt_name: Option<&str>,
    ) -> Self {
        let named = sent_model.map_or(0, str::len) + prompt_name.map_or(0, str::len);
        let max_payload_bytes =
            limits.max_frame_bytes.saturating_sub(REQUEST_ENVELOPE_BYTES + named);
        // the reply names the model by its full id, and its vectors are one bin
        let reply_rest = REPLY_ENVELOPE_BYTES + served.model.len() + TEXT_HEADER_BYTES;
        let reply_row_bytes = (served.dimension as usize).saturating_mul(BYTES_PER_VALUE).max(1);
        let max_reply_rows = limits.max_frame_bytes.saturating_sub(reply_rest) / reply_row_bytes;
        let max_texts =
            limits.max_texts_per_request.min(max_in_flight_texts).min(max_reply_rows).max(1);
        Self {
            max_texts,
            max_payload_bytes,
            max_text_bytes: limits
                .max_text_bytes
                .min(max_payload_bytes.saturating_sub(TEXT_HEADER_BYTES)),
            max_tokens_per_text: served.max_tokens,
            max_chunk_tokens: CHUNK_MICRO_BATCHES * limits.max_batch_tokens.max(served.max_tokens),
        }
    }

    /// At most the tokens `text` runs as, without a tokenizer: WordPiece makes at most one
    /// token per character, plus the special tokens, and truncation caps the count.
    pub(crate) fn estimated_tokens(&self, text: &str) -> usize {
        (text.chars().take(self.max_tokens_per_text).count() + SPECIAL_TOKENS)
            .min(self.max_tokens_per_text)
    }

    /// `InvalidInput` naming the first of `inputs` that no wire request could carry.
    pub(crate) fn check_text_sizes(&self, inputs: &[String]) -> EmbeddingResult<()> {
        match inputs.iter().position(|text| text.len() > self.max_text_bytes) {
            None => Ok(()),
            Some(index) => Err(EmbeddingError::InvalidInput(format!(
                "inputs[{index}] has {} UTF-8 bytes, over the worker's limit of {}",
                inputs[index].len(),
                self.max_text_bytes
            ))),
        }
    }

    /// Consecutive ranges covering `inputs`, in sending order. A single text always makes a
    /// chunk, even one over the limits ([`Self::check_text_sizes`] refuses those first).
    pub(crate) fn split(&self, inputs: &[String]) -> Vec<Range<usize>> {
        let mut chunks = Vec::new();
        let mut start = 0;
        let mut bytes = 0;
        let mut tokens = 0;
        for (index, text) in inputs.iter().enumerate() {
            let text_bytes = text.len() + TEXT_HEADER_BYTES;
            let text_tokens = self.estimated_tokens(text);
            let full = index - start == self.max_texts
                || bytes + text_bytes > self.max_payload_bytes
                || tokens + text_tokens > self.max_chunk_tokens;
            if full && index > start {
                chunks.push(start..index);
                start = index;
                bytes = 0;
                tokens = 0;
            }
            bytes += text_bytes;
            tokens += text_tokens;
        }
        if start < inputs.len() {
            chunks.push(start..inputs.len());
        }
        chunks
    }
}

/// The texts in sending order, shortest first by UTF-8 bytes (a stable sort), and `order`:
/// `order[i]` is the caller's index of the `i`-th text sent. Each wire request, and so each of
/// the worker's micro-batches, then holds texts of similar length and pads little (measured
/// with the Python client, which does the same: +10% texts/s on a mixed-length corpus). The
/// strings are moved, not copied.
pub(crate) fn shortest_first(mut inputs: Vec<String>) -> (Vec<usize>, Vec<String>) {
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&index| inputs[index].len());
    let texts = order.iter().map(|&index| std::mem::take(&mut inputs[index])).collect();
    (order, texts)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde::Deserialize;

    use super::*;

    /// A case of `tests/golden/chunking.json` (its `about` says how to read one).
    #[derive(Deserialize)]
    struct Case {
        name: String,
        limits: Limits,
        model: ModelDescription,
        call: Call,
        texts: Vec<Texts>,
        expected: Expected,
    }

    #[derive(Deserialize)]
    struct Call {
        model: Option<String>,
        prompt_name: Option<String>,
        max_in_flight_texts: usize,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Texts {
        One(String),
        Repeated {
            repeat: String,
            times: usize,
            #[serde(default = "one")]
            count: usize,
        },
    }

    fn one() -> usize {
        1
    }

    #[derive(Deserialize)]
    struct Expected {
        max_texts: usize,
        max_payload_bytes: usize,
        max_text_bytes: usize,
        max_chunk_tokens: usize,
        cuts: Vec<(usize, usize)>,
        cut_tokens: Vec<usize>,
    }

    #[derive(Deserialize)]
    struct Golden {
        cases: Vec<Case>,
    }

    fn golden_cases() -> Vec<Case> {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/chunking.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        serde_json::from_str::<Golden>(&text).expect("chunking.json holds cases").cases
    }

    fn expand(entries: &[Texts]) -> Vec<String> {
        let mut texts = Vec::new();
        for entry in entries {
            match entry {
                Texts::One(text) => texts.push(text.clone()),
                Texts::Repeated { repeat, times, count } => {
                    texts.extend(std::iter::repeat(repeat.repeat(*times)).take(*count));
                }
            }
        }
        texts
    }

    #[test]
    fn calls_are_cut_as_the_golden_cases_say() {
        let cases = golden_cases();
        assert!(!cases.is_empty());
        for case in cases {
            let name = &case.name;
            let call = &case.call;
            let plan = ChunkPlan::new(
                &case.limits,
                &case.model,
                call.max_in_flight_texts,
                call.model.as_deref(),
                call.prompt_name.as_deref(),
            );
            let expected = &case.expected;
            let derived = (
                plan.max_texts,
                plan.max_payload_bytes,
                plan.max_text_bytes,
                plan.max_chunk_tokens,
            );
            let wanted = (
                expected.max_texts,
                expected.max_payload_bytes,
                expected.max_text_bytes,
                expected.max_chunk_tokens,
            );
            assert_eq!(derived, wanted, "{name}: (max_texts, payload, text bytes, tokens)");

            let texts = expand(&case.texts);
            assert_eq!(
                plan.check_text_sizes(&texts),
                Ok(()),
                "{name}: a case sends only texts it may"
            );
            let cuts = plan.split(&texts);
            let pairs: Vec<(usize, usize)> = cuts.iter().map(|cut| (cut.start, cut.end)).collect();
            assert_eq!(pairs, expected.cuts, "{name}: cuts");
            let tokens: Vec<usize> = cuts
                .into_iter()
                .map(|cut| texts[cut].iter().map(|text| plan.estimated_tokens(text)).sum())
                .collect();
            assert_eq!(tokens, expected.cut_tokens, "{name}: estimated tokens per cut");
        }
    }

    #[test]
    fn a_text_over_the_worker_limit_is_invalid_input() {
        let limits = Limits {
            max_frame_bytes: 1 << 20,
            max_texts_per_request: 4,
            max_text_bytes: 1000,
            max_batch_tokens: 2048,
            max_pending_texts: 16384,
        };
        let model = golden_cases().swap_remove(0).model;
        let plan = ChunkPlan::new(&limits, &model, 100, None, None);
        let texts = |lengths: &[usize]| -> Vec<String> {
            lengths.iter().map(|&length| "x".repeat(length)).collect()
        };
        let error = plan.check_text_sizes(&texts(&[3, 1001, 1002])).unwrap_err();
        let expected = "inputs[1] has 1001 UTF-8 bytes, over the worker's limit of 1000";
        assert_eq!(error, EmbeddingError::InvalidInput(expected.into()));
        assert_eq!(plan.check_text_sizes(&texts(&[3, 1000])), Ok(()));
    }

    #[test]
    fn texts_are_sent_shortest_first_keeping_ties_in_order() {
        let inputs: Vec<String> = ["ccc", "a", "bb", "é", "dd", ""].map(String::from).to_vec();
        let (order, texts) = shortest_first(inputs.clone());
        assert_eq!(order, vec![5, 1, 2, 3, 4, 0]); // "é" is two UTF-8 bytes
        let caller_texts: Vec<&String> = order.iter().map(|&index| &inputs[index]).collect();
        assert_eq!(texts.iter().collect::<Vec<_>>(), caller_texts);
    }
}
