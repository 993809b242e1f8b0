"""The embedded default corpus: text every Python installation carries, plus worked examples.

Four sources, so `lmsmith pretrain` runs on a fresh machine with no download:

- "code" (weight 0.7): the standard library's `.py` files (about 10 MB), found with
  `sysconfig`; left out: site-packages, test suites, `pydoc_data` (that is the "docs"
  source), IDLE icons, bundled wheels, generated codec tables (`encodings/cp*.py` & co.:
  thousands of near-identical table lines teach a small model little) and files over 512 KB.
- "docs" (weight 0.3): the interpreter's documentation topics (`pydoc_data.topics.topics`,
  about 0.5 MB of English), one document per topic, held in memory.
- "tasks" (weight 0.1, so about 9% of the batches): about 1.5 MB of worked examples of the
  synthetic instruction tasks (`synth.corpus_documents`: arithmetic, reversing and sorting words,
  unit conversion, reading a capital from a list), written as plain text, never in a chat
  template. Real pretraining text holds such worked examples too; with them the demo model learns
  the skills here, and fine-tuning (even prompt tuning, which adds no weights to the model) teaches
  it to use them when asked in the chat format. No question held out for evaluation, nor any
  variant of it with the same answer, is in it (`synth.reserved`).
- "stories" (weight 0.15, about 12% of the batches): 20,000 short English stories from the
  grammar in `stories.py`, one document each, so the demo model speaks simple English and its
  next-token table for "The cat sat on the" can be checked against the grammar's exact
  next-word probabilities (`lmsmith probs` prints them for such a prompt).
"""

from __future__ import annotations

import sysconfig

from ..errors import LmsmithError
from .sources import Source
from .stories import generate_stories
from .synth import corpus_documents

STORIES = 20_000
STORIES_SEED = 2026


def story_documents() -> list[tuple[str, str]]:
    """The "stories" source: [(doc_id, story), ...], the same on every machine."""
    return [(f"story-{i:05d}", s) for i, s in enumerate(generate_stories(STORIES, seed=STORIES_SEED))]

CODE_EXCLUDE = (
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data",
    "idlelib/Icons", "ensurepip/_bundled", "config-*", "lib-dynload", "lib2to3/tests",
    "encodings/cp*.py", "encodings/mac_*.py", "encodings/iso8859_*.py", "encodings/koi8_*.py",
    "encodings/kz1048.py", "encodings/ptcp154.py", "encodings/hp_roman8.py", "encodings/palmos.py",
    "encodings/tis_620.py",
)
CODE_MAX_FILE_BYTES = 512 * 1024


def _pydoc_topics():
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [(name, text) for name, text in sorted(topics.items())]


def default_corpus_sources(code_weight: float = 0.7, docs_weight: float = 0.3,
                           tasks_weight: float = 0.1, stories_weight: float = 0.15) -> list[Source]:
    """The embedded corpus: Sources "code" (stdlib .py files), "docs" (pydoc topics), "tasks", "stories".

    "docs" is omitted if this Python has no `pydoc_data`.
    """
    stdlib = sysconfig.get_paths().get("stdlib")
    if not stdlib:
        raise LmsmithError(
            "cannot find the Python standard library (sysconfig has no 'stdlib' path); pass --source"
        )
    sources = [
        Source("code", path=stdlib, weight=code_weight, include=("*.py",), exclude=CODE_EXCLUDE,
               max_file_bytes=CODE_MAX_FILE_BYTES),
    ]
    if _pydoc_topics():
        sources.append(Source("docs", documents=_pydoc_topics, weight=docs_weight))
    sources.append(Source("tasks", documents=corpus_documents, weight=tasks_weight))
    sources.append(Source("stories", documents=story_documents, weight=stories_weight))
    return sources
