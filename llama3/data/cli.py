"""`llama3 data prepare` and `llama3 data default-corpus`: the command line of the data pipeline, above both."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from llama3.data.default_corpus import prepare_default_corpus
from llama3.data.minhash import MinHashConfig
from llama3.data.prepare import PrepareConfig, default_workers, prepare
from llama3.data.quality import QualityConfig
from llama3.data.sources import InputOptions


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("data", help="prepare pretraining data (tokenize, dedup, filter, shard)")
    verbs = parser.add_subparsers(dest="data_command", required=True, metavar="{prepare,default-corpus}")

    p = verbs.add_parser(
        "prepare",
        help="turn text/JSONL/Parquet files into token shards",
        description="Read documents, drop empty, low-quality and duplicate ones, tokenize the rest with "
        "<|begin_of_text|>/<|end_of_text|> around each, and write uint32 token shards with an index and a "
        "stats report. An interrupted run resumes when started again with the same arguments.",
    )
    p.add_argument("inputs", nargs="+", type=Path, help="files or directories (.txt/.md/.rst, .jsonl, .parquet, optionally .gz)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--tokenizer", default="llama3", help="'llama3' or a path to a tokenizer.model file")
    p.add_argument("--jsonl-field", default="text", help="JSONL field holding the text")
    p.add_argument("--parquet-column", default="text", help="Parquet column holding the text")
    p.add_argument("--split-blank-lines", action="store_true", help="text files: each blank-line separated block is a document")
    p.add_argument("--workers", type=int, default=default_workers(), help="worker processes (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=PrepareConfig.shard_tokens, help="tokens per shard (at most, unless one document is longer)")
    p.add_argument("--no-exact-dedup", action="store_true", help="keep documents whose normalized text repeats")
    p.add_argument("--near-dedup", action="store_true", help="also drop near duplicates (MinHash + LSH)")
    p.add_argument("--near-dedup-threshold", type=float, default=MinHashConfig.threshold, help="estimated Jaccard similarity that counts as a near duplicate")
    p.add_argument("--seed", type=int, default=0, help="seed of the MinHash functions")
    p.add_argument("--no-quality-filters", action="store_true", help="switch every heuristic quality filter off")
    p.add_argument(
        "--quality", action="append", default=[], metavar="NAME=VALUE",
        help=f"set one quality threshold ('none' switches it off), e.g. min_words=20; names: {', '.join(f.name for f in dataclasses.fields(QualityConfig))}",
    )
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = verbs.add_parser("default-corpus", help="build the built-in corpus (Python standard library docs) and print its directory")
    d.add_argument("--tokenizer", default="llama3", help="'llama3' or a path to a tokenizer.model file")
    d.add_argument("--out", type=Path, default=None, help="directory (default: under $LLAMA3_HOME)")
    return parser


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    base = QualityConfig.off() if args.no_quality_filters else QualityConfig()
    return PrepareConfig(
        inputs=InputOptions(args.jsonl_field, args.parquet_column, args.split_blank_lines),
        quality=base.with_overrides(args.quality),
        exact_dedup=not args.no_exact_dedup,
        near_dedup=MinHashConfig(threshold=args.near_dedup_threshold, seed=args.seed) if args.near_dedup else None,
        shard_tokens=args.shard_tokens,
    )


def cli_data(args: argparse.Namespace) -> None:
    if args.data_command == "default-corpus":
        print(prepare_default_corpus(args.out, tokenizer=args.tokenizer))
        return
    stats = prepare(
        args.inputs, args.out, args.tokenizer, config_from_args(args),
        workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(stats.report())
    print(f"wrote {args.out}")
