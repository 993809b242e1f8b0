"""lmsmith: the whole life of a decoder-only language model."""

from .checkpoint import read_config, save
from .config import ModelConfig, preset
from .decoding import GenerationConfig, generate, generate_ids, generate_stream, next_token_probs
from .errors import LmsmithError
from .loader import load
from .model import KVCache, Transformer, build_model
from .reward_model import RewardModel, score, score_batch
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GenerationConfig", "KVCache", "LmsmithError", "ModelConfig", "Tokenizer", "Transformer", "build_model",
    "RewardModel", "generate", "generate_ids", "generate_stream", "load", "next_token_probs", "preset",
    "read_config", "save", "score", "score_batch",
]
