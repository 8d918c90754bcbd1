"""Offline provisioning of model directories, and reading their metadata.

``python -m akidb_embed.models provision`` (``make models``) produces the default model
directory; ``load_metadata`` and ``default_model_dir`` tell everything else where it is and what
it holds without importing onnxruntime or tokenizers.
"""

from akidb_embed.models.metadata import (
    DEFAULT_MODEL_NAME,
    METADATA_FILE,
    MODEL_DIR_ENV,
    FileRecord,
    ModelMetadata,
    default_model_dir,
    file_sha256,
    load_metadata,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "METADATA_FILE",
    "MODEL_DIR_ENV",
    "FileRecord",
    "ModelMetadata",
    "default_model_dir",
    "file_sha256",
    "load_metadata",
]
