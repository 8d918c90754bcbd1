//! The example frames of protocol.md section 9 (also kept as files in `tests/golden/`): this
//! crate's types must encode the requests to exactly those bytes and decode the replies.

use std::path::PathBuf;

use akidb_embed_client::wire::{self, EmbedRequest, OpRequest, ReplyEnvelope, LENGTH_PREFIX_BYTES};
use akidb_embed_client::EmbeddingError;

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

#[test]
fn ping_request_encodes_to_the_golden_frame() {
    let frame = wire::encode_frame(&OpRequest { id: 1, op: "ping" }).unwrap();
    assert_eq!(frame, golden("ping_request.bin"));
}

#[test]
fn embed_request_encodes_to_the_golden_frame() {
    let inputs = vec!["hi".to_owned()];
    let frame = wire::encode_frame(&EmbedRequest {
        id: 7,
        op: EmbedRequest::OP,
        model: Some("sentence-transformers/all-MiniLM-L6-v2"),
        inputs: &inputs,
        normalize: true,
        truncate: Some(true),
    })
    .unwrap();
    assert_eq!(frame, golden("embed_request.bin"));
}

#[test]
fn unknown_op_request_encodes_to_the_golden_frame() {
    let frame = wire::encode_frame(&OpRequest { id: 9, op: "nope" }).unwrap();
    assert_eq!(frame, golden("unknown_op_request.bin"));
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
    let request = EmbedRequest {
        id: 7,
        op: "embed",
        model: None,
        inputs: &inputs,
        normalize: false,
        truncate: None,
    };
    let frame = wire::encode_frame(&request).unwrap();
    // fixmap of 4: id, op, inputs, normalize
    assert_eq!(payload(&frame)[0], 0x84);
}
