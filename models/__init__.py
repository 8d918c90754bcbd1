"""Offline provisioning of model directories, and reading and checking their metadata.

``python -m akidb_embed.models provision`` (``make models``) produces the default model
directory (see ``provision.py``); ``default_model_dir``, ``load_metadata``, ``verify_model_dir``
and ``open_model_dir`` tell everything else where it is, what it holds and whether it is intact,
without importing onnxruntime, tokenizers or numpy.
"""

# The package's API is the metadata module's: its ``__all__`` is this package's too.
from akidb_embed.models.metadata import *  # noqa: F403
from akidb_embed.models.metadata import __all__ as __all__
