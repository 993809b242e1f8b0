"""Corpus reading, cleaning, de-duplication, token shards and mixture sampling.

    prepare(sources, tokenizer, out_dir) -> manifest      text -> token shards (+ manifest.json)
    TokenShards(dir)                                      memory-mapped streams per source/split
    MixtureBatches(shards, batch_size=, seq_len=)         weighted, resumable training batches
    sequential_batches(shards, "validation", ...)         in-order evaluation batches
    default_corpus_sources()                              the built-in corpus (stdlib, pydoc topics, worked tasks)
    resolve_sources(sources)                              checked Sources (None: the built-in corpus)
"""

from .corpus import default_corpus_sources
from .mixture import IGNORE_INDEX, MixtureBatches, sequential_batches
from .shards import TokenShards, TokenStream, load_manifest, prepare, resolve_sources, token_dtype
from .sources import Source, SourceStats, iter_documents, parse_source

__all__ = [
    "IGNORE_INDEX",
    "MixtureBatches",
    "Source",
    "SourceStats",
    "TokenShards",
    "TokenStream",
    "default_corpus_sources",
    "iter_documents",
    "load_manifest",
    "parse_source",
    "prepare",
    "resolve_sources",
    "sequential_batches",
    "token_dtype",
]
