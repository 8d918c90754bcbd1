"""The design the bridge replaces, kept only as a benchmark baseline: a JSON-lines subprocess.

One request at a time: the host writes ``{"inputs": [...]}`` as one line, the subprocess embeds
with the same engine code and answers ``{"embeddings": [[float, ...], ...]}`` as one line of
text. No pipelining, no batching across callers, floats printed and parsed as decimal text.

    python -m akidb_embed.bench.jsonl_baseline --model-dir DIR --threads N
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from akidb_embed.worker.config import WorkerConfig
from akidb_embed.worker.engine import Engine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    engine = Engine.load(WorkerConfig(model_dir=args.model_dir, threads=args.threads))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        inputs = json.loads(line)["inputs"]
        vectors = engine.embed(inputs)
        print(json.dumps({"embeddings": vectors.tolist()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
