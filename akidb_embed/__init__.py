"""akidb-embed: sentence embeddings from ONNX Runtime through one long-lived worker process.

Subpackages: ``akidb_embed.worker`` (the process that holds the ONNX Runtime session),
``akidb_embed.host_client`` (spawns, supervises and calls it), ``akidb_embed.models`` (offline
provisioning of model directories). Shared by all three: ``wire`` (the frame codec) and
``errors`` (the error hierarchy).

The library logs to the loggers ``akidb_embed.*`` and shows nothing unless the host configures
logging (a ``NullHandler`` here keeps Python's last-resort handler from printing its records).
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
