//! A stand-in for AkiDB's `akidb-embedding` crate: its `EmbeddingProvider` trait and its types
//! as AkiDB defines them (crates/akidb-embedding/src/provider.rs and types.rs), under the same
//! module paths, and beside them the adapter file `../akidb_embed_provider.rs`, compiled
//! unchanged, as it is once copied into AkiDB. `tests/provider.rs` runs it against the real
//! worker.

pub mod provider;
pub mod types;

#[path = "../akidb_embed_provider.rs"]
pub mod akidb_embed_provider;
