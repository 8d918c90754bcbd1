//! AkiDB's provider trait: object-safe through `async_trait`, used as
//! `Arc<dyn EmbeddingProvider>`.

use async_trait::async_trait;

use crate::types::{BatchEmbeddingRequest, BatchEmbeddingResponse, EmbeddingResult, ModelInfo};

#[async_trait]
pub trait EmbeddingProvider: Send + Sync {
    /// One vector per input, in order; fails for an unknown model or invalid inputs.
    async fn embed_batch(
        &self,
        request: BatchEmbeddingRequest,
    ) -> EmbeddingResult<BatchEmbeddingResponse>;

    /// The model's id, output dimension and input token limit.
    async fn model_info(&self) -> EmbeddingResult<ModelInfo>;

    /// `Ok(())` while the service can embed.
    async fn health_check(&self) -> EmbeddingResult<()>;
}
