"""Prompt tuning: n trainable "virtual token" embeddings in front of every input, base frozen.

    wrapped = apply_prompt_tuning(model, PromptTuningConfig(n_virtual_tokens=20), tokenizer)
    train(wrapped, ..., trainable_params=trainable_parameters(wrapped))
    save_prompt_tuning(wrapped, "adapter/")      # peft's PROMPT_TUNING format

`PromptTunedModel` has the Transformer's interface (`.config`, `.model`, `.lm_head`,
`hidden_states`, `forward`), so the training loop and the decoding engine use it
unchanged. Its outputs cover the real tokens only; the virtual positions are dropped.

Positions: the virtual tokens take rotary positions 0..n-1 and real token i takes
n + i (counted over real tokens, so left padding does not shift them). This is what
peft does for an unpadded batch (transformers numbers the concatenated sequence
0..n+T-1); peft ignores explicit position ids, so for LEFT-PADDED batches peft's
positions also count the pad slots while ours do not (our batched generation
equals one-by-one generation; peft's does not).

Trainable token rows (`train_tokens`): a base model's rows for tokens it never saw
in pretraining (a chat template's markers such as <|im_start|> / <|im_end|>, the
untrained special tokens of many base checkpoints) are random or zero, and a soft
prompt alone cannot teach the frozen model to read or emit them: it never learns to
end its answer. With `train_tokens` the wrapper also trains a copy of those rows of
the input embedding and of the LM head; the base weights stay untouched and the rows
are saved beside the soft prompt under `lmsmith.*` keys (peft, which has no such
option for prompt tuning, loads the soft prompt and ignores them).

KV cache: the virtual tokens' keys/values are the same for every row and every
request (they attend only to each other), so `make_cache` writes them once into the
`floor` columns in front of every row; a forward with a cache then runs the real
tokens only, whose positions (n + i) are their cache columns.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LmsmithError
from .lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter_config, read_adapter_weights

# Keys of our own tensors beside peft's `prompt_embeddings` (peft ignores them).
_TABLE_KEY = "lmsmith.prompt_table"
_ENCODER_PREFIX = "lmsmith.prompt_encoder."
_TOKEN_IDS_KEY = "lmsmith.token_ids"
_TOKEN_EMB_KEY = "lmsmith.token_embeddings"
_TOKEN_HEAD_KEY = "lmsmith.token_head"
ACTIVATIONS = ("relu", "tanh")


@dataclass
class PromptTuningConfig:
    """Soft-prompt settings.

    Attributes:
        n_virtual_tokens: how many virtual tokens are prepended.
        init_text: initialise the table from this text's token embeddings (repeated or
            truncated to n); None samples random rows of the vocabulary embedding.
        encoder_hidden: if set, a P-tuning style encoder makes the virtual tokens:
            E + Linear(H, D)(act(Linear(D, H)(E))) from the table E (n, D); the last layer
            starts at zero so training starts from E (and from init_text's embeddings).
        encoder_activation: "relu" or "tanh".
        train_tokens: token ids whose input-embedding and LM-head rows train with the prompt
            (tokens the base never learned, e.g. the chat template's markers); () for none.
        deep: train the virtual tokens' keys and values in EVERY layer (prefix tuning,
            P-tuning v2; peft's PREFIX_TUNING) instead of their input embeddings only. Far
            stronger on small models; starts from exactly the shallow prompt's keys/values.
    """

    n_virtual_tokens: int = 20
    init_text: str | None = None
    encoder_hidden: int | None = None
    encoder_activation: str = "relu"
    train_tokens: tuple[int, ...] = ()
    deep: bool = False

    def __post_init__(self) -> None:
        n = self.n_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LmsmithError(f"PromptTuningConfig.n_virtual_tokens = {n!r}: must be a positive integer")
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text):
            raise LmsmithError("PromptTuningConfig.init_text must be a non-empty string or None")
        h = self.encoder_hidden
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise LmsmithError(f"PromptTuningConfig.encoder_hidden = {h!r}: must be a positive integer or None")
        ids = self.train_tokens
        if isinstance(ids, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in ids):
            raise LmsmithError(f"PromptTuningConfig.train_tokens = {ids!r}: must be non-negative token ids")
        self.train_tokens = tuple(sorted(set(ids)))
        if self.deep and h is not None:
            raise LmsmithError("PromptTuningConfig: deep (prefix) tuning trains the keys/values directly; "
                               "it has no prompt encoder (drop encoder_hidden)")
        if self.encoder_activation not in ACTIVATIONS:
            raise LmsmithError(f"PromptTuningConfig.encoder_activation = {self.encoder_activation!r}: "
                               f"choose one of {', '.join(ACTIVATIONS)}")


class PromptTunedModel(nn.Module):
    """A frozen Transformer with trainable virtual tokens in front of every input.

    Submodules are registered as `model` (the base's decoder) and `lm_head`, so the
    base's state-dict names are unchanged; the soft prompt adds `prompt_embeddings.weight`
    (n, D), with an encoder `prompt_encoder.*`, and with `train_tokens` the rows
    `token_embeddings` (k, D) and, for an untied head, `token_head` (k, D).

    Attributes:
        base: the wrapped Transformer (not a registered submodule).
        config: a copy of the base's ModelConfig with max_seq_len reduced by n, the
            room left for real tokens (the base's config object is not modified).
        prompt_config: the PromptTuningConfig.
    """

    def __init__(self, base: nn.Module, config: PromptTuningConfig, init: torch.Tensor | None = None):
        super().__init__()
        n, D = config.n_virtual_tokens, base.config.dim
        if base.config.max_seq_len - n < 1:
            raise LmsmithError(f"{n} virtual tokens leave no room in a context of {base.config.max_seq_len}; "
                               f"use fewer virtual tokens")
        object.__setattr__(self, "base", base)  # not registered: keeps HF names for the base weights
        self.model = base.model
        self.lm_head = base.lm_head
        # The rotary buffer travels with `.to()` here and is handed to the base at each call.
        self.register_buffer("inv_freq", base.inv_freq, persistent=False)
        self.config = dataclasses.replace(base.config, max_seq_len=base.config.max_seq_len - n)
        self.prompt_config = config
        w = base.model.embed_tokens.weight
        self.prompt_embeddings = nn.Embedding(n, D, device=w.device, dtype=w.dtype)
        if init is not None:
            with torch.no_grad():
                self.prompt_embeddings.weight.copy_(init)
        self.prompt_encoder = None
        if config.encoder_hidden:
            act = nn.ReLU() if config.encoder_activation == "relu" else nn.Tanh()
            self.prompt_encoder = nn.Sequential(
                nn.Linear(D, config.encoder_hidden, device=w.device, dtype=w.dtype), act,
                nn.Linear(config.encoder_hidden, D, device=w.device, dtype=w.dtype))
            nn.init.zeros_(self.prompt_encoder[2].weight)
            nn.init.zeros_(self.prompt_encoder[2].bias)
        self.register_buffer("token_ids", None, persistent=False)
        self.register_buffer("token_slot", None, persistent=False)
        self.register_parameter("token_embeddings", None)
        self.register_parameter("token_head", None)
        if config.train_tokens:
            self._init_token_rows(base, config.train_tokens)
        self.register_parameter("prefix_kv", None)
        if config.deep:
            # (L, 2, K, n, Dh): each layer's keys and values of the virtual tokens, starting from what
            # the shallow prompt's embeddings produce, so deep tuning starts where shallow tuning would.
            with torch.no_grad():
                k, v = self._shallow_kv(self.prompt_embeddings.weight)
            self.prefix_kv = nn.Parameter(torch.stack([k[:, 0], v[:, 0]], dim=1))
            self.prompt_embeddings.weight.requires_grad_(False)  # only the starting point of prefix_kv

    def _init_token_rows(self, base: nn.Module, train_tokens: tuple[int, ...]) -> None:
        emb = base.model.embed_tokens.weight
        V = emb.shape[0]
        if max(train_tokens) >= V:
            raise LmsmithError(f"train_tokens has id {max(train_tokens)}, but the vocabulary has {V} tokens")
        ids = torch.tensor(train_tokens, device=emb.device)
        slot = torch.full((V,), -1, dtype=torch.long, device=emb.device)  # id -> row of token_embeddings, or -1
        slot[ids] = torch.arange(len(ids), device=emb.device)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("token_slot", slot, persistent=False)
        self.token_embeddings = nn.Parameter(emb.detach()[ids].clone())
        head = base.lm_head.weight
        if head is not emb:  # an untied head has its own rows to learn
            self.token_head = nn.Parameter(head.detach()[ids].clone())

    @property
    def n_virtual(self) -> int:
        return self.prompt_config.n_virtual_tokens

    def virtual_embeddings(self) -> torch.Tensor:
        """The virtual tokens' input embeddings (n, D), through the encoder if there is one."""
        e = self.prompt_embeddings.weight
        if self.prompt_encoder is not None:
            e = e + self.prompt_encoder(e)
        return e

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: the table (or, deep, the per-layer keys/values), the encoder and
        the token rows (those present)."""
        ps = [self.prefix_kv] if self.prefix_kv is not None else [self.prompt_embeddings.weight]
        if self.prompt_encoder is not None:
            ps += list(self.prompt_encoder.parameters())
        return ps + [p for p in (self.token_embeddings, self.token_head) if p is not None]

    # ---- trainable token rows ---------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, D) of ids (B, T), with the trained rows for `train_tokens`."""
        x = self.model.embed_tokens(input_ids)
        if self.token_ids is None:
            return x
        slot = self.token_slot[input_ids]  # (B, T): row in token_embeddings, or -1
        rows = self.token_embeddings[slot.clamp(min=0)].to(x.dtype)  # (B, T, D)
        return torch.where((slot >= 0)[..., None], rows, x)

    def _head_rows(self) -> torch.Tensor:
        return self.token_head if self.token_head is not None else self.token_embeddings

    def output_weight(self) -> torch.Tensor | None:
        """The LM head's (V, D) weight with the trained rows in place (what the SFT loss uses);
        None when the head is not a plain weight matrix (the objective then calls `lm_head`)."""
        w = getattr(self.lm_head, "weight", None)
        if w is None or getattr(self.lm_head, "bias", None) is not None:
            return None
        if self.token_ids is None:
            return w
        return w.index_copy(0, self.token_ids, self._head_rows().to(w.dtype))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states (..., D): the base head, then the trained rows' columns."""
        out = self.lm_head(h)
        if self.token_ids is None:
            return out
        cols = (h @ self._head_rows().to(h.dtype).t()).to(out.dtype)  # (..., k)
        return out.index_copy(-1, self.token_ids, cols)

    def tie_weights(self) -> None:
        self.base.tie_weights()
        self.lm_head = self.base.lm_head

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ---- the cache prefix ----------------------------------------------------------------

    def _shallow_kv(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (L, 1, K, n, Dh) each that the base computes for virtual embeddings (n, D)."""
        from ..model import KVCache

        dtype = self.model.embed_tokens.weight.dtype
        tmp = KVCache(self.base.config, 1, max_len=self.n_virtual, dtype=dtype, device=embeddings.device)
        self.base.inv_freq = self.inv_freq
        self.base.hidden_states(inputs_embeds=embeddings[None].to(dtype), cache=tmp)
        return tmp.k, tmp.v

    @torch.no_grad()
    def _prefix_kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the virtual tokens alone, (L, 1, K, n, Dh) each."""
        if self.prefix_kv is not None:
            return self.prefix_kv[:, 0, None].to(dtype), self.prefix_kv[:, 1, None].to(dtype)
        k, v = self._shallow_kv(self.virtual_embeddings())
        return k.to(dtype), v.to(dtype)

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None):
        """A KVCache for `max_len` real tokens per row whose first n columns (its `floor`) hold the
        virtual tokens' keys/values in every row, computed once here."""
        from ..kvcache import KVCache
        from ..model import kv_cache_dtype

        n, w = self.n_virtual, self.model.embed_tokens.weight
        device = device or w.device
        dtype = dtype or kv_cache_dtype(w.dtype, device)
        cache = KVCache(self.base.config, batch_size, (max_len or self.config.max_seq_len) + n, dtype=dtype,
                        device=device, floor=n)
        pk, pv = self._prefix_kv(dtype)  # (L, 1, K, n, Dh): the same for every row
        cache.k[:, :, :, :n] = pk
        cache.v[:, :, :, :n] = pv
        return cache

    # ---- forward --------------------------------------------------------------------------

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) of the REAL tokens (virtual positions dropped).

        Args:
            input_ids: (B, T) ids, or `inputs_embeds` (B, T, D).
            positions: (B, T) rotary positions counted over real tokens; shifted by n here.
            attention_mask: (B, S) over the real keys (cached + new), 1 = real; n ones are prepended.
            cache: a KVCache allocated for the real tokens; the virtual prefix is handled here.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        n = self.n_virtual
        self.base.inv_freq = self.inv_freq
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)  # (B, n + S)
        if positions is not None:
            positions = positions + n
        if cache is not None:
            if getattr(cache, "floor", None) != n:
                raise LmsmithError(f"this cache has no room for the {n} virtual tokens; make it with "
                                   f"model.make_cache(...)")
            return self.base.hidden_states(inputs_embeds=x, positions=positions, attention_mask=attention_mask,
                                           cache=cache)
        if self.prefix_kv is not None:
            return self._deep_hidden_states(x, positions, attention_mask)
        prefix = self.virtual_embeddings().to(x.dtype)[None].expand(B, n, -1)  # (B, n, D)
        x = torch.cat([prefix, x], dim=1)  # (B, n + T, D)
        if positions is not None:
            virt = torch.arange(n, device=positions.device, dtype=positions.dtype)[None].expand(B, n)
            positions = torch.cat([virt, positions], dim=1)
        h = self.base.hidden_states(inputs_embeds=x, positions=positions, attention_mask=attention_mask)
        return h[:, n:]

    def _deep_hidden_states(self, x, positions, attention_mask) -> torch.Tensor:
        """Deep prompt without a cache (training, scoring): the real tokens (B, T, D) attend to the
        trained keys/values in every layer, then to each other."""
        kv = self.prefix_kv.to(x.dtype)[:, :, None].expand(-1, -1, x.shape[0], -1, -1, -1)  # (L, 2, B, K, n, Dh)
        return self.base.hidden_states(inputs_embeds=x, positions=positions, attention_mask=attention_mask,
                                       cache=_PrefixKV(kv[:, 0], kv[:, 1]))

    def forward(self, input_ids: torch.Tensor | None = None, *, labels: torch.Tensor | None = None,
                reduction: str = "sum", last_only: bool = False, **kwargs) -> torch.Tensor:
        """Logits (B, T, V) for the real tokens, or (B, 1, V) with `last_only`; with `labels`, the
        loss as `Transformer.forward` gives it (through the head with the trained token rows)."""
        h = self.hidden_states(input_ids, **kwargs)
        if labels is not None:
            from ..loss import plain_head_weight, target_loss

            weight = self.output_weight() if plain_head_weight(self.lm_head) is not None else None
            return target_loss(h, labels, self.logits, weight, reduction)
        if last_only:
            from ..model import last_positions

            h = last_positions(h, kwargs.get("cache"))
        return self.logits(h)


class _PrefixKV:
    """A KVCache stand-in for a forward without cache: layer l's keys/values are prefix k[l], v[l]
    (B, K, n, Dh) followed by the new ones. Concatenated, never written in place, so autograd
    reaches the prefix (a KVCache's shared buffer would be overwritten layer after layer)."""

    ragged = False

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (L, B, K, n, Dh)

    def begin(self, T: int) -> list[int]:
        return [self.k.shape[3]] * self.k.shape[1]

    def end(self, T: int) -> None:
        pass

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.k[layer].to(k.dtype), k], dim=2), torch.cat([self.v[layer].to(v.dtype), v], dim=2))


# ---- building -------------------------------------------------------------------------


def _initial_table(model, config: PromptTuningConfig, tokenizer) -> torch.Tensor:
    emb = model.model.embed_tokens.weight.detach()
    n = config.n_virtual_tokens
    if config.init_text is not None:
        if tokenizer is None:
            raise LmsmithError("PromptTuningConfig.init_text needs the tokenizer: apply_prompt_tuning(model, config, "
                               "tokenizer)")
        ids = tokenizer.encode(config.init_text)
        if not ids:
            raise LmsmithError(f"init_text {config.init_text!r} encodes to no tokens")
        ids = (ids * (n // len(ids) + 1))[:n]  # repeated / truncated to n, as peft does
        return emb[torch.tensor(ids, device=emb.device)].clone()
    # Random rows of the vocabulary: the right scale for the model (Lester et al. 2021).
    rows = torch.randint(0, emb.shape[0], (n,), device=emb.device)
    return emb[rows].clone()


def apply_prompt_tuning(model, config: PromptTuningConfig, tokenizer=None) -> PromptTunedModel:
    """Freeze `model` and wrap it with a soft prompt.

    Args:
        model: a Transformer.
        config: PromptTuningConfig.
        tokenizer: needed when `config.init_text` is set.

    Returns:
        The PromptTunedModel; `trainable_parameters(wrapper)` (or `wrapper.prompt_parameters()`)
        lists what to train.
    """
    if isinstance(model, PromptTunedModel):
        raise LmsmithError("the model already has a soft prompt; apply prompt tuning to the base model")
    for p in model.parameters():
        p.requires_grad_(False)
    return PromptTunedModel(model, config, _initial_table(model, config, tokenizer))


def save_prompt_tuning(model: PromptTunedModel, path, base_model_name_or_path: str | None = None) -> Path:
    """Write the soft prompt in peft's PROMPT_TUNING format (deep: PREFIX_TUNING), atomically.

    adapter_model.safetensors holds `prompt_embeddings`: the virtual tokens after the encoder,
    (n, D), or for a deep prompt every layer's keys and values as peft lays them out,
    (n, L * 2 * K * Dh) with (layer, key/value, head, dim) flattened. With an encoder, our table
    and encoder weights ride under `lmsmith.*` keys so training can resume; so do token rows.
    """

    if not isinstance(model, PromptTunedModel):
        raise LmsmithError("save_prompt_tuning needs the PromptTunedModel returned by apply_prompt_tuning")
    pc, cfg = model.prompt_config, model.base.config
    if pc.deep:
        return _save_prefix(model, path, base_model_name_or_path)
    meta = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": pc.n_virtual_tokens,
        "token_dim": cfg.dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_heads,
        "num_layers": cfg.n_layers,
        # RANDOM: the trained weights are in the file; "TEXT" would make peft fetch a tokenizer.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "inference_mode": True,
        "revision": None,
    }
    ours = {"init_text": pc.init_text, "encoder_hidden": pc.encoder_hidden,
            "encoder_activation": pc.encoder_activation, "train_tokens": list(pc.train_tokens)}
    with torch.no_grad():
        tensors = {"prompt_embeddings": model.virtual_embeddings().detach()}
        if model.prompt_encoder is not None:
            tensors[_TABLE_KEY] = model.prompt_embeddings.weight.detach()
            for k, v in model.prompt_encoder.state_dict().items():
                tensors[_ENCODER_PREFIX + k] = v.detach()
    return _write(model, path, meta, ours, tensors)


def _save_prefix(model: PromptTunedModel, path, base_model_name_or_path: str | None) -> Path:
    pc, cfg = model.prompt_config, model.base.config
    kv_dim = cfg.n_kv_heads * cfg.head_dim  # peft sizes a GQA prefix by the K/V heads
    meta = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": pc.n_virtual_tokens,
        "token_dim": kv_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_kv_heads,
        "num_layers": cfg.n_layers,
        "encoder_hidden_size": kv_dim,
        "prefix_projection": False,
        "inference_mode": True,
        "revision": None,
    }
    ours = {"init_text": pc.init_text, "train_tokens": list(pc.train_tokens)}
    # (L, 2, K, n, Dh) -> (n, L, 2, K, Dh) -> (n, L * 2 * K * Dh): peft views it as (n, 2L, K, Dh).
    flat = model.prefix_kv.detach().permute(3, 0, 1, 2, 4).reshape(pc.n_virtual_tokens, -1)
    return _write(model, path, meta, ours, {"prompt_embeddings": flat})


def _write(model: PromptTunedModel, path, meta: dict, ours: dict, tensors: dict) -> Path:
    from ..fileio import atomic_dir, write_safetensors

    if model.token_ids is not None:
        tensors[_TOKEN_IDS_KEY] = model.token_ids
        tensors[_TOKEN_EMB_KEY] = model.token_embeddings.detach()
        if model.token_head is not None:
            tensors[_TOKEN_HEAD_KEY] = model.token_head.detach()
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # Our settings ride in the safetensors metadata: peft validates adapter_config.json's keys.
        write_safetensors(tensors, tmp / ADAPTER_WEIGHTS_NAME, metadata={"lmsmith": json.dumps(ours)})
    return path


def _our_settings(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path / ADAPTER_WEIGHTS_NAME), "pt") as f:
            raw = (f.metadata() or {}).get("lmsmith")
    except Exception:  # noqa: BLE001 - unreadable files are reported by read_adapter_weights
        return {}
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


@torch.no_grad()
def load_prompt_tuning(model, path) -> PromptTunedModel:
    """Wrap `model` with the soft prompt saved at `path` (by us or by peft's save_pretrained):
    PROMPT_TUNING, or PREFIX_TUNING (a deep prompt).

    Returns:
        A PromptTunedModel with the base frozen; with our encoder weights present the encoder
        is restored (trainable again), else the table holds `prompt_embeddings`.
    """
    path = Path(path)
    raw = read_adapter_config(path)
    where = path / ADAPTER_CONFIG_NAME
    kind = raw.get("peft_type")
    if kind not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise LmsmithError(f"{where}: peft_type {kind!r} is not PROMPT_TUNING or PREFIX_TUNING")
    if int(raw.get("num_transformer_submodules") or 1) != 1:
        raise LmsmithError(f"{where}: num_transformer_submodules must be 1 for a decoder-only model")
    tensors = read_adapter_weights(path)
    if "prompt_embeddings" not in tensors:
        raise LmsmithError(f"{path / ADAPTER_WEIGHTS_NAME}: no 'prompt_embeddings' tensor")
    virt = tensors["prompt_embeddings"]
    n = int(raw.get("num_virtual_tokens") or virt.shape[0])
    if kind == "PREFIX_TUNING":
        return _load_prefix(model, path, n, virt, tensors)
    D = model.config.dim
    if tuple(virt.shape) != (n, D) or int(raw.get("token_dim") or D) != D:
        raise LmsmithError(f"{path}: prompt_embeddings has shape {tuple(virt.shape)}, this model needs ({n}, {D}); "
                           f"the adapter is for a model of another width")
    ours = _our_settings(path)
    encoder = ours.get("encoder_hidden") if _TABLE_KEY in tensors else None
    token_ids = tensors[_TOKEN_IDS_KEY].tolist() if _TOKEN_IDS_KEY in tensors else []
    config = PromptTuningConfig(n_virtual_tokens=n, init_text=ours.get("init_text"), encoder_hidden=encoder,
                                encoder_activation=ours.get("encoder_activation") or "relu",
                                train_tokens=tuple(token_ids))
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = PromptTunedModel(model, config, init=(tensors[_TABLE_KEY] if encoder else virt))
    if token_ids:
        _load_token_rows(wrapped, tensors, path)
    if encoder:
        sd = {k[len(_ENCODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(_ENCODER_PREFIX)}
        try:
            wrapped.prompt_encoder.load_state_dict(sd)
        except RuntimeError as e:
            raise LmsmithError(f"{path}: prompt encoder weights do not fit ({str(e).splitlines()[0]})") from None
    return wrapped


def _load_token_rows(wrapped: PromptTunedModel, tensors: dict, path: Path) -> None:
    k, D = len(wrapped.prompt_config.train_tokens), wrapped.base.config.dim
    if tensors[_TOKEN_IDS_KEY].tolist() != list(wrapped.prompt_config.train_tokens):
        raise LmsmithError(f"{path / ADAPTER_WEIGHTS_NAME}: {_TOKEN_IDS_KEY} must hold sorted, distinct ids")
    for key, param in ((_TOKEN_EMB_KEY, wrapped.token_embeddings), (_TOKEN_HEAD_KEY, wrapped.token_head)):
        if param is None:
            continue
        if key not in tensors or tuple(tensors[key].shape) != (k, D):
            got = tuple(tensors[key].shape) if key in tensors else "missing"
            raise LmsmithError(f"{path / ADAPTER_WEIGHTS_NAME}: {key} is {got}, this model needs ({k}, {D}) "
                               f"(an adapter for a model with a tied or untied head differently?)")
        param.copy_(tensors[key])


@torch.no_grad()
def _load_prefix(model, path: Path, n: int, flat: torch.Tensor, tensors: dict) -> PromptTunedModel:
    cfg = model.config
    L, K, Dh = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    if tuple(flat.shape) != (n, L * 2 * K * Dh):
        raise LmsmithError(f"{path / ADAPTER_WEIGHTS_NAME}: prompt_embeddings has shape {tuple(flat.shape)}, "
                           f"a prefix for this model is ({n}, {L * 2 * K * Dh}) = (tokens, layers {L} x 2 x "
                           f"kv heads {K} x head dim {Dh}); the adapter is for another model (or was saved with "
                           f"prefix_projection and not in inference mode)")
    ours = _our_settings(path)
    token_ids = tensors[_TOKEN_IDS_KEY].tolist() if _TOKEN_IDS_KEY in tensors else []
    config = PromptTuningConfig(n_virtual_tokens=n, init_text=ours.get("init_text"), train_tokens=tuple(token_ids),
                                deep=True)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = PromptTunedModel(model, config)
    wrapped.prefix_kv.copy_(flat.view(n, L, 2, K, Dh).permute(1, 2, 3, 0, 4))
    if token_ids:
        _load_token_rows(wrapped, tensors, path)
    return wrapped
