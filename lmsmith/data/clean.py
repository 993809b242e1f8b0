"""Normalisation, filters and exact de-duplication of documents.

The pipeline for each raw document is: `normalize` (NFC, CRLF -> LF) ->
length filter (`min_chars`) -> exact de-duplication by content hash. The hash
is also what assigns a document to the train or validation split, so a
document's split depends only on its content and the seed.
"""

from __future__ import annotations

import hashlib
import unicodedata


def normalize(text: str) -> str:
    """Unicode NFC, and Windows/old-Mac line ends turned into '\\n'.

    NFC makes visually identical strings identical (so dedup and the tokenizer see one
    spelling); line ends are unified because they otherwise split the same code into
    different tokens.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # is_normalized is a fast check; most text is already NFC.
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


def content_hash(text: str) -> bytes:
    """16-byte BLAKE2b digest of the (normalised) text: the document's identity for dedup and splits."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_score(digest: bytes, seed: int) -> float:
    """A uniform number in [0, 1) from a document's hash and the seed; < val_fraction -> validation."""
    h = hashlib.blake2b(digest, digest_size=8, key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") / 2**64


def too_short(text: str, min_chars: int) -> bool:
    """True if the document has fewer than `min_chars` characters once surrounding whitespace is removed."""
    return len(text.strip()) < min_chars


class Deduper:
    """Exact de-duplication: remembers the hash of every document seen (16 bytes each)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def seen(self, digest: bytes) -> bool:
        """True if `digest` was seen before; otherwise remember it and return False."""
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False

    def __len__(self) -> int:
        return len(self._seen)
