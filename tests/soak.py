"""``make soak``: minutes of mixed load through the Python client while the worker is killed.

::

    lone-query threads --embed(1 short text)--+
    bulk thread -------embed(256 mixed texts)-+--> EmbeddingClient --> worker (SIGKILLed every
    bad-request thread --over-long text with  |                         --kill-every seconds,
       truncate=False, another model's name --+                         restarted by the client)

Every answer is checked (shape, unit norm, the same vector for the same text every time).
At the end it prints requests served by kind, errors by kind (expected ones, from the bad
requests, apart from the others), the client's restarts and re-sent requests, and the
worker's resident memory: of the first worker after warm-up, of each worker just before its
kill, and of the last worker at the end. Not part of ``make test``: it runs for minutes and
takes most of the machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from akidb_embed.bench.runner import proc_status_mb
from akidb_embed.host_client import BatchEmbeddingRequest, EmbeddingClient, InvalidInput
from akidb_embed.models import default_model_dir, load_metadata

LONE_QUERY_THREADS = 2
BULK_TEXTS = 256
BULK_PAUSE_SECONDS = 0.5
BAD_REQUEST_PAUSE_SECONDS = 0.2


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of ``pid`` in MB (Linux /proc), None if unknown."""
    return None if pid is None else proc_status_mb(pid, "VmRSS")


class Soak:
    def __init__(
        self, client: EmbeddingClient, sentences: list[str], reference: np.ndarray
    ) -> None:
        self.client = client
        self.sentences = sentences
        self.reference = reference
        self.model = client.model_info().model
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.served: Counter[str] = Counter()
        self.texts: Counter[str] = Counter()
        self.expected_errors: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong_answers = 0
        self.rss_before_kills: list[float] = []

    def count(self, counter: Counter[str], key: str, texts: int = 0) -> None:
        with self.lock:
            counter[key] += 1
            if texts:
                self.texts[key] += texts

    def check(self, picks: list[int], vectors: np.ndarray) -> None:
        """Each row is the reference vector of its sentence (cosine >= 0.9999)."""
        expected = self.reference[picks]
        cosine = np.sum(vectors * expected, axis=1)
        if vectors.shape != expected.shape or cosine.min() < 0.9999:
            with self.lock:
                self.wrong_answers += 1

    def lone_queries(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            pick = int(rng.integers(len(self.sentences)))
            self.call("lone query", [pick])
            time.sleep(0.005)

    def bulk(self) -> None:
        rng = np.random.default_rng(99)
        while not self.stop.is_set():
            picks = [int(p) for p in rng.integers(len(self.sentences), size=BULK_TEXTS)]
            self.call("bulk", picks)
            self.stop.wait(BULK_PAUSE_SECONDS)

    def call(self, kind: str, picks: list[int]) -> None:
        try:
            vectors = self.client.embed([self.sentences[p] for p in picks])
        except Exception as exc:
            self.count(self.errors, f"{kind}: {type(exc).__name__}: {str(exc)[:80]}")
            return
        self.check(picks, vectors)
        self.count(self.served, kind, len(picks))

    def bad_requests(self) -> None:
        long_text = "word " * 600  # over max_tokens: refused with truncate=False
        over_long = BatchEmbeddingRequest(None, ["ok", long_text], normalize=True, truncate=False)
        requests = [
            ("over-long text, truncate=False", over_long),
            ("another model", BatchEmbeddingRequest("no-such/model", ["ok"])),
        ]
        turn = 0
        while not self.stop.is_set():
            name, request = requests[turn % len(requests)]
            turn += 1
            try:
                self.client.embed_batch(request)
            except InvalidInput as exc:
                expected = name.startswith("over-long") and exc.index == 1
                counter = self.expected_errors if expected else self.errors
                self.count(counter, f"{name}: {type(exc).__name__}")
            except Exception as exc:
                expected = name == "another model" and type(exc).__name__ == "ModelNotFound"
                counter = self.expected_errors if expected else self.errors
                self.count(counter, f"{name}: {type(exc).__name__}")
            else:
                self.count(self.errors, f"{name}: accepted")
            self.stop.wait(BAD_REQUEST_PAUSE_SECONDS)

    def kill_worker(self) -> None:
        pid = self.client.stats().worker_pid
        if pid is None:
            return
        rss = rss_mb(pid)
        if rss is not None:
            self.rss_before_kills.append(rss)
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (%(default)s)")
    parser.add_argument(
        "--kill-every", type=float, default=60.0, help="seconds between SIGKILLs (%(default)s)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    metadata = load_metadata(default_model_dir())
    golden = json.loads(metadata.path("golden.json").read_text(encoding="utf-8"))
    sentences: list[str] = golden["sentences"]
    reference = np.asarray(golden["embeddings"], dtype=np.float32)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)

    started = time.monotonic()
    client_rss_start = rss_mb(os.getpid())
    with EmbeddingClient() as client:
        soak = Soak(client, sentences, reference)
        client.embed(sentences)  # warm-up before the first memory reading
        first_pid = client.stats().worker_pid
        rss_start = rss_mb(first_pid)
        threads = [
            threading.Thread(target=soak.lone_queries, args=(seed,), daemon=True)
            for seed in range(LONE_QUERY_THREADS)
        ]
        threads += [
            threading.Thread(target=soak.bulk, daemon=True),
            threading.Thread(target=soak.bad_requests, daemon=True),
        ]
        for thread in threads:
            thread.start()
        deadline = started + args.minutes * 60
        next_kill = started + args.kill_every
        next_report = started + 60
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            now = time.monotonic()
            if now >= next_kill and now < deadline - 5:
                soak.kill_worker()
                next_kill += args.kill_every
            if now >= next_report:
                next_report += 60
                served = sum(soak.served.values())
                print(f"{(now - started) / 60:.0f} min: {served} requests served", flush=True)
        soak.stop.set()
        for thread in threads:
            thread.join(120)
        stats = client.stats()
        rss_end = rss_mb(stats.worker_pid)

    figures: dict[str, Any] = {
        "minutes": round((time.monotonic() - started) / 60, 2),
        "requests_served": dict(soak.served),
        "texts_embedded": dict(soak.texts),
        "wrong_answers": soak.wrong_answers,
        "expected_errors": dict(soak.expected_errors),
        "other_errors": dict(soak.errors),
        "kills": len(soak.rss_before_kills),
        "restarts": stats.restarts,
        "resent_requests": stats.resent_requests,
        "client_rss_mb": {"start": client_rss_start, "end": rss_mb(os.getpid())},
        "worker_rss_mb": {
            "first_worker_after_warm_up": rss_start,
            "before_each_kill": [round(value, 1) for value in soak.rss_before_kills],
            "last_worker_at_end": rss_end,
        },
    }
    if rss_start is not None and soak.rss_before_kills:
        figures["worker_rss_mb"]["drift_first_worker_mb"] = round(
            soak.rss_before_kills[0] - rss_start, 1
        )
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    healthy = not soak.errors and soak.wrong_answers == 0
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
