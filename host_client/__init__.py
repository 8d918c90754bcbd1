"""Host client: spawns and supervises the worker and presents embed_batch."""
