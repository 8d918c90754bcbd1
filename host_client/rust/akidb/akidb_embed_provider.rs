//! AkiDB's `EmbeddingProvider` served by an akidb-embed worker (crate `akidb-embed-client`):
//! copy this file into crates/akidb-embedding/src/ and declare it in lib.rs. Start one with
//! `AkidbEmbedProvider(WorkerClient::spawn(WorkerConfig::from_env()?).await?)`.
use akidb_embed_client as embed;
use async_trait::async_trait;

use crate::provider::EmbeddingProvider;
use crate::types::*;

/// The supervised worker processes (one unless `workers` says more); clones share them.
pub struct AkidbEmbedProvider(pub embed::WorkerClient);

impl From<embed::EmbeddingError> for EmbeddingError {
    fn from(error: embed::EmbeddingError) -> Self {
        use EmbeddingError::*;
        error.into_variant_of([ModelNotFound, InvalidInput, ServiceUnavailable, Internal])
    }
}

#[async_trait]
impl EmbeddingProvider for AkidbEmbedProvider {
    async fn embed_batch(
        &self,
        request: BatchEmbeddingRequest,
    ) -> EmbeddingResult<BatchEmbeddingResponse> {
        let BatchEmbeddingRequest { model, inputs, normalize } = request;
        let call = self.0.embed_batch(embed::BatchEmbeddingRequest { model, inputs, normalize });
        let embed::BatchEmbeddingResponse { model, embeddings, usage } = call.await?;
        let usage = Usage { total_tokens: usage.total_tokens, duration_ms: usage.duration_ms };
        Ok(BatchEmbeddingResponse { model, embeddings, usage })
    }
    async fn model_info(&self) -> EmbeddingResult<ModelInfo> {
        let embed::ModelInfo { model, dimension, max_tokens } = self.0.model_info().await?;
        Ok(ModelInfo { model, dimension, max_tokens })
    }
    async fn health_check(&self) -> EmbeddingResult<()> {
        Ok(self.0.health_check().await?)
    }
}
