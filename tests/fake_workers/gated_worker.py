"""The real worker behind a gate, for the pool tests (test_pool.py): each spawn claims a number
(a file of ``spawn_dir`` holding its pid), then ``exec``s ``python -m akidb_embed.worker`` with
the remaining arguments (same pid, same pipes). Spawn ``$FAIL_SPAWN`` exits at once with a line
on stderr instead; spawns from ``first_gated`` on wait for the ``gate`` file first.

    python gated_worker.py SPAWN_DIR GATE FIRST_GATED [worker arguments...]
"""

import os
import sys
import time

spawn_dir, gate, first_gated = sys.argv[1], sys.argv[2], int(sys.argv[3])
number = 0
while True:
    try:
        claim = os.open(os.path.join(spawn_dir, str(number)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        break
    except FileExistsError:
        number += 1
os.write(claim, str(os.getpid()).encode())
os.close(claim)
if number == int(os.environ.get("FAIL_SPAWN", "-1")):
    sys.stderr.write(f"spawn {number}: cannot open the accelerator\n")
    sys.exit(1)
if number >= first_gated:
    while not os.path.exists(gate):
        time.sleep(0.05)
os.execv(sys.executable, [sys.executable, "-m", "akidb_embed.worker", *sys.argv[4:]])
