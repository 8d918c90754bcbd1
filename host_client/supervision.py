"""The seams under the client's supervision, public for hosts that start workers their own way and
for tests that drive supervision with stand-in workers.

* ``Spawner``: how a worker slot starts each worker (``EmbeddingClient(spawner=...)``); its
  ``command(slot)`` gives the ``WorkerCommand`` (argv and environment) of the next spawn.
  ``CommandSpawner`` (the default) runs the client's ``worker_command``.
* ``RestartPolicy``: each slot's restart budget, backoff and stable start, driven by a clock
  that can be passed in; ``GiveUp`` is its verdict once the budget is spent.
"""

from akidb_embed.host_client._restart import GiveUp, RestartPolicy
from akidb_embed.host_client._worker import CommandSpawner, Spawner, WorkerCommand

__all__ = ["CommandSpawner", "GiveUp", "RestartPolicy", "Spawner", "WorkerCommand"]
