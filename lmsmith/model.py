"""The decoder: a Llama-family transformer, read top to bottom.

token ids -> embedding -> N x [RMSNorm -> attention (RoPE, GQA, SDPA) -> +residual,
RMSNorm -> SwiGLU MLP -> +residual] -> RMSNorm -> LM head -> logits.

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...)
so a Llama/Qwen2/Mistral state dict loads without renaming and peft adapters
target the same module names. The model knows nothing about training tricks:
LoRA, quantized linears, compile, checkpointing are applied from outside.

Shapes: B batch, T new tokens, S keys (cached + new), D dim, H query heads,
K kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kvcache import KVCache
from .loss import plain_head_weight, target_loss

__all__ = ["KVCache", "Transformer", "build_model"]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 as HF does, then cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (Dh/2,) of the rotary embedding, with Llama-3 scaling if configured."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the middle band blended.
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and signed sin, each (B, 1, T, Dh), for integer positions (B, T) (HF's half-split layout).

    The sin's first half is negated so that `apply_rope` needs one roll instead of
    HF's `rotate_half` (a negation and a concatenation): the same products, exactly.
    """
    freqs = positions[..., None].float() * inv_freq  # (B, T, Dh/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype)[:, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, Dh) by position: x*cos + rotate_half(x)*sin, pairs (i, i + Dh/2) as in HF."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.window = cfg.attention_window  # a query sees itself and the window - 1 keys before it

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts from the projections' outputs: under tensor parallelism a rank holds H/tp heads.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, q.shape[-1] // self.head_dim, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, k.shape[-1] // self.head_dim, self.head_dim).transpose(1, 2)  # (B, K, T, Dh)
        v = v.view(B, T, v.shape[-1] // self.head_dim, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if getattr(cache, "packed", False):  # several rows' tokens in one sequence: attend per segment
            y = _packed_attention(cache, layer, q, k, v, self.window, self.n_kv_heads != self.n_heads)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, q.shape[1] * self.head_dim))
        dtype = q.dtype
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, Dh)
            # Attention runs in the cache's dtype (fp32 on CPU for half-precision weights: see
            # `kv_cache_dtype`; FSDP2 gathers bf16 weights over fp32 ones): only the queries are cast.
            q = q.to(k.dtype)
            # Rows that end in the same column: only the last `window` keys (a ragged mask has the window).
            if T == 1 and self.window is not None and not cache.ragged and k.shape[2] > self.window:
                k, v = k[:, :, -self.window:], v[:, :, -self.window:]
                mask = mask[..., -self.window:] if mask is not None else None
        S = k.shape[2]
        windowed = self.window is not None and self.window < S
        if mask is None and T > 1:  # causal, the T new tokens after S - T earlier keys
            if torch.is_grad_enabled() and _fits(B, q.shape[1], T, S):
                y = _causal_attention(q, k, v, self.window)
                return self.o_proj(y.transpose(1, 2).reshape(B, T, q.shape[1] * self.head_dim))
            if S > T or windowed:  # SDPA's is_causal aligns the triangle top-left: spell the offset out
                mask = _causal_keep(T, S, self.window, x.device)
        # enable_gqa lets SDPA share each K/V head across its query group without
        # materialising repeat_interleave copies (same result, less memory traffic).
        # mask None: plain causal attention over T == S (flash kernels).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.to(dtype).transpose(1, 2).reshape(B, T, q.shape[1] * self.head_dim))


def _packed_attention(step, layer: int, q, k, v, window: int | None, gqa: bool) -> torch.Tensor:
    """Attention for a `PackedStep`: q (1, H, N, Dh), k/v (1, K, N, Dh) -> (1, H, N, Dh), each
    segment's queries against its own row's cached keys and its new ones (causal, windowed)."""
    out = []
    for i, (start, (_, n)) in enumerate(zip(step.starts, step.segments)):
        keys, values = step.write(layer, i, k[0, :, start:start + n], v[0, :, start:start + n])  # (K, S, Dh)
        S = keys.shape[1]
        mask = None
        if n > 1 or (window is not None and window < S):
            mask = _causal_keep(n, S, window, q.device)
        out.append(F.scaled_dot_product_attention(q[:, :, start:start + n].to(keys.dtype), keys[None], values[None],
                                                  attn_mask=mask, enable_gqa=gqa).to(q.dtype))
    return torch.cat(out, dim=2)


def kv_cache_dtype(weight_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype of a KV cache for weights of `weight_dtype`: their own, except fp32 on CPU for bf16/fp16.

    torch's CPU attention kernel is several times slower in half precision for the few queries of a
    decode step (measured on AVX512-BF16: 135 against 25 us for one row of `base`, 2.2 ms against 0.3 ms
    for 16 masked rows), so there the cache holds fp32 (twice the memory) and the queries are cast.
    """
    if torch.device(device).type == "cpu" and weight_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight_dtype


# Training at short context: explicit attention beats the CPU flash kernel (~15% of a
# `small` step) but materialises (B, H, T, S) scores, so it is used only below this size.
_EXPLICIT_ATTENTION_MAX_BYTES = 256 * 2**20


def _fits(B: int, H: int, T: int, S: int) -> bool:
    return B * H * T * S * 4 <= _EXPLICIT_ATTENTION_MAX_BYTES


_CAUSAL_BIAS: dict[tuple, torch.Tensor] = {}


def _causal_keep(T: int, S: int, window: int | None, device) -> torch.Tensor:
    """(T, S) boolean: query t (absolute position S - T + t) may see key s (s <= its position, and
    within the last `window` positions when a sliding window is set)."""
    keep = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
    if window is not None:
        keep &= ~torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T - window)
    return keep


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + causal) v for q (B, H, T, Dh), k/v (B, K, S, Dh) -> (B, H, T, Dh).

    The T queries are the last T of the S keys (S > T: a prefix or earlier chunk every query sees);
    with a sliding `window` each sees only the last `window` positions up to its own.
    Each K/V head serves its group of H/K query heads through one batched matmul,
    without repeating K/V: q is viewed as (B, K, H/K * T, Dh).
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    rep = H // K
    key = (T, S, window, q.device, q.dtype)
    if key not in _CAUSAL_BIAS:
        keep = _causal_keep(T, S, window, q.device)
        _CAUSAL_BIAS[key] = torch.zeros(T, S, device=q.device).masked_fill(~keep, float("-inf")).to(q.dtype)
    k, v = k.to(q.dtype), v.to(q.dtype)
    q = q * D**-0.5  # scale the (T, Dh) queries rather than the (T, S) scores
    scores = (q.reshape(B, K, rep * T, D) @ k.transpose(-1, -2)).view(B, K, rep, T, S)
    probs = torch.softmax(scores + _CAUSAL_BIAS[key], dim=-1)
    return (probs.view(B, K, rep * T, S) @ v).view(B, H, T, D)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype inside autocast, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, blocks and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    """A decoder-only language model. Build with `build_model`, not directly, for meta-device init."""

    # Sequence parallelism (distributed.parallelize.apply_tp) sets this to the TP degree: the hidden
    # states between blocks then hold T / sequence_shards positions per rank.
    sequence_shards = 1

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the embedding when the config says so (call after loading)."""
        if self.config.tie_embeddings and isinstance(self.lm_head, nn.Linear):  # packed heads share bytes instead
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, D).

        Args:
            input_ids: (B, T) token ids, or give `inputs_embeds` (B, T, D) instead.
            positions: (B, T) rotary positions; default each row's cache columns
                (`cache.lengths[b] + arange(T)`).
            attention_mask: (B, S) with 1 for real tokens and 0 for padding over all
                keys (cached + new); None means no padding.
            cache: a KVCache to read and extend (each row's length advances by T).
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, _, _ = x.shape
        # The sequence length of the ids: with sequence parallelism x holds only this rank's T/tp positions.
        # A later pipeline stage gets the previous stage's hidden states (B, T/tp, D) as `input_ids`.
        T = input_ids.shape[1] if inputs_embeds is None else x.shape[1]
        if inputs_embeds is None and input_ids.is_floating_point():
            T *= self.sequence_shards
        if getattr(cache, "packed", False):  # a PackedStep: positions per segment, attention per segment
            cos, sin = rope_cos_sin(self.inv_freq, cache.positions(x.device), _compute_dtype(x))
            for i, block in enumerate(self.model.layers):
                x = block(x, cos, sin, None, cache, i)
            cache.end()
            return self.model.norm(x)
        # (B may be 0: a data-parallel rank's share of a short last evaluation batch.)
        past = cache.begin(T) if cache is not None else [0] * max(B, 1)
        if positions is None:
            if min(past) == max(past):
                positions = torch.arange(past[0], past[0] + T, device=x.device).expand(B, T)
            else:
                positions = torch.tensor(past, device=x.device)[:, None] + torch.arange(T, device=x.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, _compute_dtype(x))
        mask = _attention_mask(attention_mask, B, T, past, x.device, self.config.attention_window)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.end(T)
        return self.model.norm(x)

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        """An empty KVCache for this model: `max_len` tokens per row (default the context).

        Wrappers that keep state in the cache (prompt tuning) override this; callers should
        make caches here rather than with `KVCache(...)` directly. `dtype` defaults to
        `kv_cache_dtype` of the weights.
        """
        w = self.model.norm.weight  # always a float tensor, also when the embedding is packed
        device = device or w.device
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len,
                       dtype=dtype or kv_cache_dtype(w.dtype, device), device=device)

    def forward(self, input_ids: torch.Tensor | None = None, *, labels: torch.Tensor | None = None,
                reduction: str = "sum", last_only: bool = False, temperature: float = 1.0,
                **kwargs) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with `last_only` (prefill needs only the last row).

        With `labels` (B, T) (shifted targets, -100 where ignored) the next-token cross-entropy
        instead: summed to a scalar, or per token (B, T) with `reduction="none"` (`loss.target_loss`).
        `temperature` divides the logits (so a loss is that of the tempered distribution a sampler
        drew from: RL on samples taken at that temperature). Keyword arguments are those of
        `hidden_states`. With a `PackedStep` as the cache, `last_only` gives each segment's last
        token: (1, segments, V).
        """
        h = self.hidden_states(input_ids, **kwargs)
        if temperature != 1.0:
            h = h / temperature  # = logits / temperature: the head is linear without a bias
        if labels is not None:
            if hasattr(h, "placements"):
                # A DTensor (sequence-parallel norm): the tensor-parallel head gives this rank's vocabulary
                # slice of the logits, and the loss is computed on the slices (loss parallelism).
                from .distributed.loss_parallel import vocab_sharded

                logits, cross_entropy = vocab_sharded(self.lm_head(h))
                return target_loss(logits, labels, _identity, None, reduction, cross_entropy)
            return target_loss(h, labels, self.lm_head, plain_head_weight(self.lm_head), reduction)
        if last_only:
            h = last_positions(h, kwargs.get("cache"))
        logits = self.lm_head(h)
        return logits.full_tensor() if hasattr(logits, "full_tensor") else logits  # TP: gathered by vocabulary

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 style init (`init_parameter_`), every parameter in `named_parameters` order."""
        for name, p in self.named_parameters():
            init_parameter_(name, p, self.config, generator)
        self.inv_freq = rope_inv_freq(self.config, device=self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # .to(bf16) / .half() would round the rotary frequencies too; they stay fp32 on the new device.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config, device=self.inv_freq.device)
        return self

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after materialising from the meta device)."""
        self.inv_freq = rope_inv_freq(self.config, device=self.model.norm.weight.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


@torch.no_grad()
def init_parameter_(name: str, p: torch.Tensor, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
    """Fill parameter `name` in place: norms 1, biases 0, residual outputs (o_proj, down_proj)
    N(0, std / sqrt(2L)), everything else N(0, std). Draws from `generator` only for the normal ones."""
    if name.endswith("norm.weight") or "layernorm" in name:
        p.fill_(1.0)
    elif name.endswith(".bias"):
        p.zero_()
    elif name.endswith(("o_proj.weight", "down_proj.weight")):
        p.normal_(0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers), generator=generator)
    else:
        p.normal_(0.0, cfg.init_std, generator=generator)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def last_positions(h: torch.Tensor, cache) -> torch.Tensor:
    """h (B, T, D) -> (B, 1, D) at the last position, or (1, segments, D) at each packed segment's end."""
    return h[:, cache.ends] if getattr(cache, "packed", False) else h[:, -1:]


def _attention_mask(attention_mask, B, T, past: list[int], device, window: int | None = None) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask for SDPA, or None when plain causal attention suffices.

    `past` is each row's cache length before this forward. Positions are cache columns, padding
    included, as in transformers (so is the sliding window). Rows of different lengths (ragged)
    each get their own causal edge; columns past a row's end are hidden.
    """
    S = max(past) + T
    if min(past) == max(past) and attention_mask is None:
        return None  # plain causal: the attention applies it (with the offset of `past` cached keys)
    query = torch.tensor(past, device=device)[:, None] + torch.arange(T, device=device)  # (B, T) columns
    if min(past) == max(past):
        mask = _causal_keep(T, S, window, device)[None, None]  # (1, 1, T, S)
    else:
        col = torch.arange(S, device=device)  # (S,)
        mask = col <= query[..., None]  # (B, T, S)
        if window is not None:
            mask &= col > query[..., None] - window
        mask = mask[:, None]  # (B, 1, T, S)
    if attention_mask is None:
        return mask
    mask = attention_mask[:, None, None, :S].bool() & mask
    # A fully masked row (a padding query) would give NaN; let it see itself instead.
    diag = torch.zeros(B, 1, T, S, dtype=torch.bool, device=device)
    diag.scatter_(-1, query[:, None, :, None], True)
    return mask | (~mask.any(-1, keepdim=True) & diag)


def build_model(cfg: ModelConfig, device: torch.device | str | None = "cpu", dtype: torch.dtype | None = None,
                seed: int | None = None, init: bool = True, cls: type[Transformer] = Transformer) -> Transformer:
    """Build on the meta device, then materialise on `device`.

    With `init=False` the parameters stay on the meta device (no memory used) so a
    loader can assign real tensors; with `device=None` likewise. `cls`: a Transformer subclass
    with another head (`reward_model.RewardModel`).
    """
    with torch.device("meta"):
        model = cls(cfg)
    if not init or device is None:
        return model
    if dtype is not None:
        model.to(dtype)  # still on meta: the weights are then allocated once, in their final dtype
    model.to_empty(device=device)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.init_weights(generator=gen)
    return model
