//! AkiDB's embedding types: the same fields, derives and error messages as AkiDB's own, so that
//! the adapter meets exactly what it meets there (no `PartialEq` or `Clone` on the error, a
//! `u64` duration, a `normalize` that is `false` when absent). The error's variants and
//! messages come from the client crate's `akidb_error_enum!`, which declares its own
//! `EmbeddingError` too.

use serde::{Deserialize, Serialize};
use thiserror::Error;

akidb_embed_client::akidb_error_enum! {
    #[derive(Debug, Error)]
    pub enum EmbeddingError
}

pub type EmbeddingResult<T> = Result<T, EmbeddingError>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchEmbeddingRequest {
    pub model: String,
    pub inputs: Vec<String>,
    #[serde(default)]
    pub normalize: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchEmbeddingResponse {
    pub model: String,
    pub embeddings: Vec<Vec<f32>>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Usage {
    pub total_tokens: usize,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub model: String,
    pub dimension: u32,
    pub max_tokens: usize,
}
