//! The example frames of protocol.md section 9 (also kept as files in `tests/golden/`): this
//! crate's types must encode the requests to exactly those bytes and decode the replies.

use std::path::PathBuf;

use akidb_embed_client::wire::{
    self, EmbedReply, EmbedRequest, OpRequest, ReplyEnvelope, TokenizeReply, TokenizeRequest,
    LENGTH_PREFIX_BYTES,
};
use akidb_embed_client::{EmbeddingError, Encoding, TruncationSide};

fn checkout() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The frame stored in `tests/golden/<name>`, checked against the hex of protocol.md.
fn golden(name: &str) -> Vec<u8> {
    let path = checkout().join("tests/golden").join(name);
    let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(stored, hex_in_protocol_md(name), "{name} differs from protocol.md's hex");
    stored
}

fn hex_in_protocol_md(name: &str) -> Vec<u8> {
    let protocol = std::fs::read_to_string(checkout().join("protocol.md")).unwrap();
    let marker = format!("[`{name}`]");
    let after = &protocol[protocol.find(&marker).unwrap_or_else(|| panic!("no {marker}"))..];
    let block = after.split("```").nth(1).expect("a fenced hex block follows the file name");
    block.split_whitespace().map(|byte| u8::from_str_radix(byte, 16).unwrap()).collect()
}

fn payload(frame: &[u8]) -> &[u8] {
    let length = u32::from_be_bytes(frame[..LENGTH_PREFIX_BYTES].try_into().unwrap()) as usize;
    assert_eq!(frame.len(), LENGTH_PREFIX_BYTES + length, "length prefix of the whole frame");
    &frame[LENGTH_PREFIX_BYTES..]
}

/// An embed request of `inputs` with id 7 and nothing else set; each test sets what it needs.
fn embed_request(inputs: &[String]) -> EmbedRequest<'_> {
    EmbedRequest {
        id: 7,
        op: EmbedRequest::OP,
        model: None,
        inputs,
        normalize: false,
        truncate: None,
        prompt_name: None,
        trace: false,
        truncation_side: None,
        dimensions: None,
        encoding: None,
    }
}

#[test]
fn op_requests_encode_to_the_golden_frames() {
    for (id, op, name) in [(1, "ping", "ping_request.bin"), (9, "nope", "unknown_op_request.bin")] {
        let frame = wire::encode_frame(&OpRequest { id, op }).unwrap();
        assert_eq!(frame, golden(name), "{name}");
    }
}

#[test]
fn embed_requests_encode_to_the_golden_frames() {
    let hi = vec!["hi".to_owned()];
    let cat = vec!["a cat on a mat".to_owned()];
    let plain = EmbedRequest {
        model: Some("sentence-transformers/all-MiniLM-L6-v2"),
        normalize: true,
        truncate: Some(true),
        ..embed_request(&hi)
    };
    // the options added after the first release
    let newer_options = EmbedRequest {
        id: 16,
        normalize: true,
        truncation_side: Some(TruncationSide::Left.as_str()),
        dimensions: Some(64),
        encoding: Some(Encoding::Ubinary.as_str()),
        ..embed_request(&cat)
    };
    for (request, name) in
        [(plain, "embed_request.bin"), (newer_options, "embed_options_request.bin")]
    {
        assert_eq!(wire::encode_frame(&request).unwrap(), golden(name), "{name}");
    }
}

#[test]
fn ping_reply_decodes_as_success_for_its_id() {
    let frame = golden("ping_reply.bin");
    let reply: ReplyEnvelope = wire::decode_payload(payload(&frame)).unwrap();
    assert_eq!(reply.id, Some(1));
    assert_eq!(reply.into_result(), Ok(()));
}

#[test]
fn unknown_op_reply_decodes_as_an_internal_protocol_error() {
    let frame = golden("unknown_op_reply.bin");
    let reply: ReplyEnvelope = wire::decode_payload(payload(&frame)).unwrap();
    assert_eq!(reply.id, Some(9));
    assert_eq!(
        reply.into_result(),
        Err(EmbeddingError::Internal("[protocol_error] unknown op 'nope'".into()))
    );
}

#[test]
fn an_embed_request_without_model_or_truncate_omits_them() {
    let inputs = vec!["hi".to_owned()];
    let frame = wire::encode_frame(&embed_request(&inputs)).unwrap();
    // fixmap of 4: id, op, inputs, normalize
    assert_eq!(payload(&frame)[0], 0x84);
}

#[test]
fn a_prompt_name_travels_as_the_last_key() {
    let inputs = vec!["hi".to_owned()];
    let request = EmbedRequest {
        model: Some("m"),
        normalize: true,
        prompt_name: Some("query"),
        ..embed_request(&inputs)
    };
    let frame = wire::encode_frame(&request).unwrap();
    let decoded: serde_json::Value = rmp_serde::from_slice(payload(&frame)).unwrap();
    let expected = serde_json::json!({
        "id": 7, "op": "embed", "model": "m", "inputs": ["hi"], "normalize": true,
        "prompt_name": "query"
    });
    assert_eq!(decoded, expected);
    // fixmap of 6, and the key just before the value "query" (a5 + 5 bytes) is prompt_name
    let payload = payload(&frame);
    assert_eq!(payload[0], 0x86);
    assert!(payload.ends_with(b"\xabprompt_name\xa5query"));
}

/// A hello as a worker writes it, with `extra` fields laid over the one-model basics.
fn hello_frame(extra: serde_json::Value) -> Vec<u8> {
    let mut hello = serde_json::json!({
        "op": "hello", "ok": true, "protocol": 1, "worker_version": "0.1.0", "pid": 42,
        "model": {"model": "a/first", "dimension": 384, "max_tokens": 256},
        "normalize_default": true, "providers": ["CPUExecutionProvider"],
        "limits": {"max_frame_bytes": 16777216, "max_texts_per_request": 1024,
                   "max_text_bytes": 262144, "max_batch_tokens": 1024, "max_pending_texts": 16384}
    });
    for (key, value) in extra.as_object().unwrap() {
        hello[key] = value.clone();
    }
    rmp_serde::to_vec_named(&hello).unwrap()
}

fn ready(payload: &[u8]) -> Result<wire::ReadyHello, EmbeddingError> {
    wire::decode_payload::<wire::Hello>(payload).and_then(wire::Hello::into_ready)
}

#[test]
fn a_hello_without_models_is_one_model_from_its_model_field() {
    let hello = ready(&hello_frame(serde_json::json!({}))).unwrap();
    assert_eq!(hello.models.len(), 1);
    let only = &hello.models[0];
    assert_eq!(only.info(), hello.model);
    assert!(only.normalize_default);
    assert_eq!((only.pooling.as_deref(), only.prompts.len()), (None, 0));
    assert_eq!(hello.find_model("").map(|m| &m.model), Some(&hello.model.model));
    assert_eq!(hello.find_model("a/first").map(|m| m.dimension), Some(384));
    assert!(hello.find_model("b/second").is_none());
}

#[test]
fn a_hello_with_models_lists_them_default_first() {
    let models = serde_json::json!({"models": [
        {"model": "a/first", "dimension": 384, "max_tokens": 256, "normalize_default": true,
         "pooling": "mean", "prompts": [], "default_prompt_name": null},
        {"model": "b/second", "dimension": 768, "max_tokens": 512, "normalize_default": false,
         "pooling": "cls", "prompts": ["query", "passage"], "default_prompt_name": "passage",
         "a_field_from_a_later_worker": 1},
        {"model": "a/first@int8", "dimension": 384, "max_tokens": 256, "normalize_default": true,
         "pooling": "mean", "prompts": [], "default_prompt_name": null, "variant": "int8",
         "base_model": "a/first"}
    ]});
    let hello = ready(&hello_frame(models)).unwrap();
    assert_eq!(hello.model_ids(), "\"a/first\", \"b/second\", \"a/first@int8\"");
    let second = hello.find_model("b/second").unwrap();
    assert_eq!((second.dimension, second.max_tokens, second.normalize_default), (768, 512, false));
    assert_eq!(second.pooling.as_deref(), Some("cls"));
    assert_eq!(second.prompts, ["query", "passage"]);
    assert_eq!(second.default_prompt_name.as_deref(), Some("passage"));
    assert_eq!((second.variant.as_deref(), second.base_model.as_deref()), (None, None));
    let variant = hello.find_model("a/first@int8").unwrap();
    assert_eq!(variant.variant.as_deref(), Some("int8"));
    assert_eq!(variant.base_model.as_deref(), Some("a/first"));
    assert_eq!(hello.find_model("").unwrap().model, "a/first");
}

#[test]
fn a_hello_whose_models_do_not_start_with_its_default_breaks_the_protocol() {
    let models = serde_json::json!({"models": [
        {"model": "b/second", "dimension": 768, "max_tokens": 512, "normalize_default": false,
         "pooling": "cls", "prompts": [], "default_prompt_name": null}
    ]});
    let error = ready(&hello_frame(models)).unwrap_err();
    assert!(matches!(&error, EmbeddingError::Internal(m) if m.contains("protocol_error")));
}

#[test]
fn the_golden_packed_reply_decodes_to_its_dtype_shape_and_bits() {
    let frame = golden("embed_options_reply.bin");
    let reply: EmbedReply<'_> = wire::decode_payload(payload(&frame)).unwrap();
    assert_eq!(reply.dtype.as_deref(), Some("ubinary"));
    assert_eq!(reply.shape, (1, 8));
    let rows: Vec<&[u8]> = wire::value_rows(reply.embeddings, 1, 8, 1).unwrap().collect();
    assert_eq!(rows, [&[0x97, 0x5c, 0x72, 0x49, 0x4b, 0x8e, 0x9c, 0x87][..]]);
    assert_eq!(reply.usage.total_tokens, 7);
}

#[test]
fn a_tokenize_request_encodes_to_the_golden_frame_and_its_reply_decodes() {
    let inputs = vec!["hi".to_owned(), "caf\u{e9} \u{2615}".to_owned()];
    let frame = wire::encode_frame(&TokenizeRequest {
        id: 17,
        op: TokenizeRequest::OP,
        model: None,
        inputs: &inputs,
        prompt_name: None,
        truncate: None,
        truncation_side: None,
    })
    .unwrap();
    assert_eq!(frame, golden("tokenize_request.bin"));
    let reply_frame = golden("tokenize_reply.bin");
    let reply: TokenizeReply = wire::decode_payload(payload(&reply_frame)).unwrap();
    assert_eq!(reply.model, "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(reply.token_counts, [3, 4]);
    assert_eq!(reply.ids, [vec![101, 7632, 102], vec![101, 7668, 100, 102]]);
}

#[test]
fn a_hello_entry_lists_encodings_and_matryoshka_dimensions() {
    let models = serde_json::json!({"models": [
        {"model": "a/first", "dimension": 384, "max_tokens": 256, "normalize_default": true,
         "pooling": "mean", "prompts": [], "default_prompt_name": null,
         "encodings": ["float32", "binary"], "matryoshka_dimensions": [256, 128]}
    ]});
    let hello = ready(&hello_frame(models)).unwrap();
    assert_eq!(hello.models[0].encodings, ["float32", "binary"]);
    assert_eq!(hello.models[0].matryoshka_dimensions, [256, 128]);
}
