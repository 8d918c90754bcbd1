"""``python -m akidb_embed.cli``: the ``akidb-embed`` command."""

import sys

from akidb_embed.cli import main

sys.exit(main())
