"""Evaluation: perplexity and bits per byte (and, later, task accuracy)."""

from .perplexity import PerplexityResult, perplexity, sliding_windows

__all__ = ["PerplexityResult", "perplexity", "sliding_windows"]
