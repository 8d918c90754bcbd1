//! AkiDB's embedding types: the same fields, derives and error messages as AkiDB's own, so that
//! the adapter meets exactly what it meets there (no `PartialEq` or `Clone` on the error, a
//! `u64` duration, a `normalize` that is `false` when absent).

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EmbeddingError {
    #[error("Model not found: {0}")]
    ModelNotFound(String),
    #[error("Invalid input: {0}")]
    InvalidInput(String),
    #[error("Service unavailable: {0}")]
    ServiceUnavailable(String),
    #[error("Internal error: {0}")]
    Internal(String),
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
