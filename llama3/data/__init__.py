"""Pretraining data: prepare (read, filter, deduplicate, tokenize, shard) and load (stateful batches).

The preparation function is `llama3.data.prepare.prepare`; it is not re-exported here, where its name
would hide the module of the same name.
"""

from llama3.data.cli import add_data_parser, cli_data
from llama3.data.default_corpus import default_corpus_dir, prepare_default_corpus
from llama3.data.loader import TokenLoader
from llama3.data.minhash import MinHashConfig
from llama3.data.prepare import PrepareConfig, PrepareStats
from llama3.data.quality import QualityConfig
from llama3.data.shards import TokenShards
from llama3.data.sources import DataError, InputOptions

__all__ = [
    "DataError",
    "InputOptions",
    "MinHashConfig",
    "PrepareConfig",
    "PrepareStats",
    "QualityConfig",
    "TokenLoader",
    "TokenShards",
    "add_data_parser",
    "cli_data",
    "default_corpus_dir",
    "prepare_default_corpus",
]
