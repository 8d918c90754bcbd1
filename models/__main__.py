"""Command line of model provisioning: ``python -m akidb_embed.models COMMAND``.

::

    provision [--source-dir DIR] [--model-dir DIR] [--model-id ID] [--force] [--offline]
        intact model directory -> "nothing to do" (exit 0); else provision it (exit 0), or
        print why not, e.g. no source, with the three ways to get a model, or a module or
        pooling mode the worker does not serve (exit 1)
    provision --check [--model-dir DIR]
        only verify (metadata, sizes, sha256): exit 0 when intact, else print the problems, exit 1
    quantize --model-dir DIR --out DIR [--variant int8] [--min-recall R] [--min-cosine C]
             [--recipes A,B] [--threads N] [--force]
        try every int8 recipe on the fp32 model in DIR, print the table (recall@10, min
        cosine, texts/s against fp32) and write the fastest recipe passing the gate to --out
        (exit 0; "nothing to do" when --out already holds it); none passes: nothing written,
        exit 1
    path
        print the default model directory (AKIDB_EMBED_MODEL_DIR, else the checkout's models/,
        else the per-user cache)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from akidb_embed.errors import ModelNotFound
from akidb_embed.models.metadata import (
    INT8,
    PROVISION_HINT,
    default_model_dir,
    verify_model_dir,
)
from akidb_embed.models.sources import resolve_model_id

EXIT_OK = 0
EXIT_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m akidb_embed.models",
        description="Provision and check akidb-embed model directories.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    provision = commands.add_parser(
        "provision",
        help="make the model directory intact and verified (idempotent)",
        description=f"Make the model directory intact and verified. {PROVISION_HINT}",
    )
    provision.add_argument(
        "--source-dir",
        type=Path,
        help="take the model from this directory (Hugging Face layout); no other source is tried",
    )
    provision.add_argument(
        "--model-dir", type=Path, help="the model directory (default: see the `path` command)"
    )
    provision.add_argument(
        "--model-id",
        help="with --source-dir: the id the wire and ModelInfo carry (default: the directory's "
        "name, or a hub cache entry's id); without: a known model to fetch, by full or short "
        "name (sentence-transformers/all-MiniLM-L6-v2, the default, or all-mpnet-base-v2)",
    )
    provision.add_argument(
        "--force", action="store_true", help="provision again even if the directory is intact"
    )
    provision.add_argument(
        "--offline", action="store_true", help="never try a hub download (the export still runs)"
    )
    provision.add_argument(
        "--check", action="store_true", help="only verify the directory; change nothing"
    )
    commands.add_parser("path", help="print the default model directory")
    _add_quantize(commands)
    return parser


def _add_quantize(commands: Any) -> None:
    from akidb_embed.models.gate_corpus import DEFAULT_GATE

    quantize = commands.add_parser(
        "quantize",
        help="write an int8 variant that keeps the fp32 model's neighbours, or refuse",
        description="Try int8 recipes on a provisioned fp32 model directory; keep the fastest "
        "whose vectors pass the gate against fp32 on the gate corpus (recall@10 of corpus "
        "neighbours and min cosine); when none passes, write nothing and exit 1.",
    )
    quantize.add_argument(
        "--variant", choices=[INT8], default=INT8, help="the variant to make (only int8)"
    )
    quantize.add_argument("--model-dir", type=Path, required=True, help="the fp32 model")
    quantize.add_argument("--out", type=Path, required=True, help="the variant's directory")
    quantize.add_argument(
        "--min-recall",
        type=float,
        default=DEFAULT_GATE.min_recall,
        help=f"least recall@10 against fp32 (default {DEFAULT_GATE.min_recall})",
    )
    quantize.add_argument(
        "--min-cosine",
        type=float,
        default=DEFAULT_GATE.min_cosine,
        help=f"least cosine of any text against fp32 (default {DEFAULT_GATE.min_cosine})",
    )
    quantize.add_argument(
        "--recipes", help="comma-separated recipe names to try (default: every one)"
    )
    quantize.add_argument(
        "--threads", type=int, help="ONNX Runtime threads (default: the worker's default)"
    )
    quantize.add_argument(
        "--force", action="store_true", help="quantise again even if --out holds the variant"
    )


def _quantize(args: argparse.Namespace) -> int:
    from akidb_embed.models.provision import ProvisionError
    from akidb_embed.models.quantize import (
        RECIPES,
        Gate,
        QuantizeRefused,
        format_table,
        quantize,
    )

    gate = Gate(min_recall=args.min_recall, min_cosine=args.min_cosine)
    recipes = None
    if args.recipes:
        known = {recipe.name: recipe for recipe in RECIPES}
        names = [name.strip() for name in args.recipes.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown:
            print(
                f"models: unknown recipe {', '.join(unknown)}; the recipes are {', '.join(known)}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        recipes = [known[name] for name in names]
    try:
        result = quantize(
            args.model_dir,
            args.out,
            gate=gate,
            recipes=recipes,
            threads=args.threads,
            force=args.force,
        )
    except QuantizeRefused as exc:
        print(format_table(exc.table, gate))
        print(f"models: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ModelNotFound, ProvisionError) as exc:
        print(f"models: cannot quantise {args.model_dir}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result is None:
        print(f"models: nothing to do: {args.out} holds the int8 variant of {args.model_dir}")
        return EXIT_OK
    print(format_table(result.table, gate))
    row = next(row for row in result.table if row.recipe == result.recipe.name)
    print(
        f"models: wrote {result.metadata.directory}: {result.metadata.model}, recipe "
        f"{result.recipe.name}, recall@{gate.neighbours} {row.recall:.4f}, min cosine "
        f"{row.min_cosine:.4f}, {row.speedup:.2f}x fp32"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "path":
        print(default_model_dir())
        return EXIT_OK
    if args.command == "quantize":
        return _quantize(args)
    known = args.model_id is not None and args.source_dir is None
    name = resolve_model_id(args.model_id).rsplit("/", 1)[-1] if known else None
    model_dir = args.model_dir or (default_model_dir(name) if name else default_model_dir())
    if args.check:
        problems = verify_model_dir(model_dir)
        for problem in problems:
            print(f"models: {model_dir}: {problem}", file=sys.stderr)
        if not problems:
            print(f"models: {model_dir} is intact")
        return EXIT_FAILED if problems else EXIT_OK

    # Imported here so that `path` and `--check` stay free of provisioning's imports.
    from akidb_embed.models.provision import NOTHING_TO_DO, ProvisionError, provision

    try:
        result = provision(
            model_dir,
            source_dir=args.source_dir,
            model_id=args.model_id,
            force=args.force,
            allow_hub=not args.offline,
        )
    except (ModelNotFound, ProvisionError) as exc:
        print(f"models: cannot provision {model_dir}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    metadata = result.metadata
    if result.outcome == NOTHING_TO_DO:
        hint = " (--force replaces it)" if args.source_dir else ""
        print(f"models: nothing to do: {metadata.directory} is intact ({metadata.model}){hint}")
    else:
        print(
            f"models: {result.outcome} {metadata.directory}: {metadata.model}, "
            f"{metadata.dimension} dims, max {metadata.max_tokens} tokens, from "
            f"{metadata.source.get('kind')}"
        )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
