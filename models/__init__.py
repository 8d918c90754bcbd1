"""Offline provisioning of model directories, and reading and checking their metadata.

``python -m akidb_embed.models provision`` (``make models``) produces the default model
directory (see ``provision.py``); ``default_model_dir``, ``load_metadata``, ``verify_model_dir``
and ``open_model_dir`` tell everything else where it is, what it holds and whether it is intact,
without importing onnxruntime, tokenizers or numpy.
"""

from akidb_embed.models.metadata import (
    DEFAULT_MODEL_ID,
    DEFAULT_MODEL_NAME,
    GOLDEN_FILE,
    METADATA_FILE,
    MODEL_DIR_ENV,
    MODEL_FILE,
    POOLING_MODES,
    PROVISION_HINT,
    REQUIRED_FILES,
    TOKENIZER_FILE,
    FileRecord,
    ModelMetadata,
    default_model_dir,
    file_sha256,
    load_metadata,
    open_model_dir,
    verify_model_dir,
)

__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_NAME",
    "GOLDEN_FILE",
    "METADATA_FILE",
    "MODEL_DIR_ENV",
    "MODEL_FILE",
    "POOLING_MODES",
    "PROVISION_HINT",
    "REQUIRED_FILES",
    "TOKENIZER_FILE",
    "FileRecord",
    "ModelMetadata",
    "default_model_dir",
    "file_sha256",
    "load_metadata",
    "open_model_dir",
    "verify_model_dir",
]
