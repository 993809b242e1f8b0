"""Memory and step time of a training job per device, for every parallel layout (`lmsmith plan`).

Pure arithmetic on a ModelConfig; every constant is an assumption the report prints. Per device:

    model state   weights + gradients + optimizer state (+ fp32 master weights under mixed precision),
                  divided by the ranks that shard them: dp_shard x tp x pp (DDP replicas hold it all)
    FSDP buffers  the all-gathered weights of the block in use and the next (prefetch), and one
                  block's unsharded gradients before their reduce-scatter
    activations   what backward keeps per layer and micro-batch (or, with activation checkpointing,
                  each layer's input plus one layer recomputed), for the layers of one pipeline stage
    KV cache      for inference: 2 x layers x kv_heads x head_dim x context x batch x 2 bytes

The step time is the FLOPs of the global batch over (devices x peak x MFU); data-parallel traffic
(FSDP all-gathers and reduce-scatters, DDP all-reduces) overlaps it, as FSDP2 and DDP arrange, so
only what exceeds the compute counts; tensor-parallel all-reduces sit on the critical path and add
up; the pipeline bubble adds (pp - 1) / micro-batches of the compute. An estimate, not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from .layout import Layout

# Bytes per parameter of (weights, gradients, optimizer state, fp32 master copy) by precision, for
# full training. "bf16": everything in bf16 (Hugging Face's rule of thumb, 2 bytes each for weights,
# gradients and the two AdamW moments); "mixed": bf16 weights and gradients, fp32 master weights and
# fp32 moments (ZeRO's 16 bytes per parameter); "fp32": everything fp32 (what CPU training does here).
PRECISIONS = {"bf16": (2, 2, 2, 0), "mixed": (2, 2, 4, 4), "fp32": (4, 4, 4, 0)}
# Optimizer state in units of the precision's state bytes: AdamW keeps two moments, 8-bit AdamW two
# 1-byte moments, SGD without momentum none.
OPTIMIZERS = {"adamw": 2.0, "adamw8bit": None, "sgd": 0.0}
QLORA_BITS = 4.127  # NF4 with double-quantised block scales (QLoRA paper: 0.127 bits/param of constants)
METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class Job:
    """What is trained, how, and on what (the planner's inputs)."""

    config: ModelConfig
    method: str = "full"
    precision: str = "mixed"
    optimizer: str = "adamw"
    seq_len: int = 4096
    batch: int = 1  # sequences per micro-batch per data-parallel rank
    micro_batches: int = 8  # per step (gradient accumulation; the pipeline's micro-batches)
    activation_checkpointing: bool = False
    lora_r: int = 16
    eager_attention: bool = False  # attention that stores its (T x T) probabilities (CPU); else flash


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    nodes: int = 1
    memory: float = 80e9  # bytes per device
    peak_flops: float = 989e12  # dense bf16 FLOP/s of one device (H100 SXM)
    mfu: float = 0.40  # the fraction of the peak a well-tuned run reaches
    intra_bw: float = 450e9  # bytes/s per device inside a node (NVLink, one direction)
    inter_bw: float = 50e9  # bytes/s per device between nodes (400 Gb/s InfiniBand)

    @property
    def devices(self) -> int:
        return self.gpus_per_node * self.nodes


# ---- parameter counts ------------------------------------------------------------------------


def lora_params(cfg: ModelConfig, r: int) -> int:
    """LoRA on every linear of every block (q, k, v, o, gate, up, down): r x (in + out) each."""
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.hidden_dim
    per_layer = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    return per_layer * cfg.n_layers


def block_params(cfg: ModelConfig) -> int:
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.hidden_dim
    return d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d


# ---- memory --------------------------------------------------------------------------------------


def state_bytes(job: Job) -> dict[str, float]:
    """Bytes of the whole model's training state (unsharded): weights, gradients, optimizer, master."""
    cfg = job.config
    w, g, s, m = PRECISIONS[job.precision]
    n = cfg.num_params()
    moments = OPTIMIZERS[job.optimizer]
    opt_per_param = 2.0 if moments is None else moments * s  # 8-bit AdamW: two 1-byte moments
    if job.method == "full":
        return {"weights": n * w, "gradients": n * g, "optimizer": n * opt_per_param, "master weights": n * m}
    trained = lora_params(cfg, job.lora_r)
    if job.method == "lora":
        base = n * w
    else:  # QLoRA: block linears in 4-bit NF4; embedding, head and norms stay in bf16
        linear = block_params(cfg) * cfg.n_layers - 2 * cfg.dim * cfg.n_layers
        base = linear * QLORA_BITS / 8 + (n - linear) * 2
    return {"weights": base + trained * w, "gradients": trained * g, "optimizer": trained * opt_per_param,
            "master weights": trained * m}


def activation_bytes(job: Job, layout: Layout) -> float:
    """What backward keeps for one micro-batch on one device (the layers of one pipeline stage).

    Per layer and token, in the compute dtype: the two norms' inputs and outputs and the attention
    input/output (about 6 x dim, fp32 residuals counted twice), q/k/v, and the MLP's gate, up, their
    SwiGLU product and the down projection's input (4 x hidden); tensor parallelism splits the head
    and MLP parts, sequence parallelism the rest. Eager attention also keeps its softmax (heads x T).
    With activation checkpointing each layer keeps only its input, and one layer is recomputed.
    """
    cfg = job.config
    act = 4 if job.precision == "fp32" else 2
    tokens = job.batch * job.seq_len
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_token = (8 * cfg.dim) / layout.tp * act + (2 * q + 2 * kv + 4 * cfg.hidden_dim) / layout.tp * act
    if job.eager_attention:
        per_token += cfg.n_heads * job.seq_len / layout.tp * act * 2  # scores and probabilities
    if job.method != "full":
        per_token += 7 * job.lora_r * act  # the adapters' low-rank intermediates
    layers = math.ceil(cfg.n_layers / layout.pp)
    if job.activation_checkpointing:
        stored = layers * cfg.dim * 4 / layout.tp + per_token  # fp32 layer inputs + one live layer
    else:
        stored = layers * per_token
    head = 2 * cfg.dim * 4  # the final norm's input and output (fp32); the fused loss chunks the logits
    return tokens * (stored + head)


def memory_per_device(job: Job, layout: Layout) -> dict[str, float]:
    """Bytes per device by kind (see the module docstring)."""
    cfg = job.config
    total = state_bytes(job)
    shard = layout.tp * layout.pp * layout.dp_shard  # DDP replicas hold full copies
    out = {k: v / shard for k, v in total.items()}
    w, g, _, _ = PRECISIONS[job.precision]
    if layout.dp_shard > 1:
        block = block_params(cfg) / layout.tp
        grads = g if job.method == "full" else 0
        out["FSDP buffers"] = block * (2 * w + grads)  # gathered block + prefetched next + its gradients
    out["activations"] = activation_bytes(job, layout)
    return out


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, bytes_per_element: int = 2) -> float:
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * batch * bytes_per_element


# ---- time ------------------------------------------------------------------------------------------


def step_seconds(job: Job, layout: Layout, hw: Hardware) -> dict[str, float]:
    """Compute, data-parallel traffic (overlapped), tensor-parallel traffic and bubble of one step."""
    cfg = job.config
    dp = layout.dp_replicate * layout.dp_shard
    tokens = dp * job.batch * job.micro_batches * job.seq_len
    flops = tokens * cfg.flops_per_token(job.seq_len)
    if job.method != "full":
        flops *= 2 / 3  # frozen weights need no weight gradients
    if job.activation_checkpointing:
        flops *= 4 / 3  # the forward once more
    compute = flops / (layout.size * hw.peak_flops * hw.mfu)
    w = PRECISIONS[job.precision][0]
    in_node = layout.tp * layout.dp_shard <= hw.gpus_per_node
    bw_dp = hw.intra_bw if in_node else hw.inter_bw
    comm = tp_comm = 0.0
    shard_bytes = cfg.num_params() * w / (layout.tp * layout.pp)
    if layout.dp_shard > 1:  # all-gather in forward and backward, reduce-scatter of the gradients
        comm += 3 * shard_bytes * (layout.dp_shard - 1) / layout.dp_shard / bw_dp * job.micro_batches
    if layout.dp_replicate > 1:
        trained = shard_bytes if job.method == "full" else lora_params(cfg, job.lora_r) * w
        comm += 2 * trained / max(layout.dp_shard, 1) * (layout.dp_replicate - 1) / layout.dp_replicate / hw.inter_bw
    if layout.tp > 1:  # 2 all-reduces in forward, 2 in backward, per layer, of (tokens x dim)
        per = job.batch * job.seq_len * cfg.dim * w * 2 * (layout.tp - 1) / layout.tp
        tp_comm += 4 * math.ceil(cfg.n_layers / layout.pp) * per / hw.intra_bw * job.micro_batches
    bubble = compute * (layout.pp - 1) / job.micro_batches if layout.pp > 1 else 0.0
    return {"compute": compute, "data-parallel traffic": comm, "tensor-parallel traffic": tp_comm,
            "pipeline bubble": bubble, "tokens": tokens}


# ---- layouts ---------------------------------------------------------------------------------------


def layouts(cfg: ModelConfig, hw: Hardware) -> list[Layout]:
    """Every layout of the devices: TP inside a node (dividing both head counts), PP dividing the layers'
    stages, the rest data-parallel, either sharded (FSDP; HSDP across nodes) or replicated (DDP)."""
    n = hw.devices
    found = []
    for tp in _divisors(min(n, hw.gpus_per_node)):
        if cfg.n_heads % tp or cfg.n_kv_heads % tp:
            continue
        for pp in _divisors(n // tp):
            if pp > cfg.n_layers:
                continue
            dp = n // (tp * pp)
            options = {Layout(1, dp, tp, pp), Layout(dp, 1, tp, pp)}
            if hw.nodes > 1 and dp % hw.nodes == 0 and dp > hw.nodes:
                options.add(Layout(hw.nodes, dp // hw.nodes, tp, pp))
            found += sorted(options, key=lambda x: x.dp_replicate)
    return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Option:
    layout: Layout
    memory: dict[str, float]
    time: dict[str, float]

    @property
    def peak(self) -> float:
        return sum(self.memory.values())

    @property
    def seconds(self) -> float:
        t = self.time
        return max(t["compute"], t["data-parallel traffic"]) + t["tensor-parallel traffic"] + t["pipeline bubble"]

    @property
    def tokens_per_s(self) -> float:
        return self.time["tokens"] / self.seconds


def plan(job: Job, hw: Hardware, usable: float = 0.9) -> list[Option]:
    """The layouts whose per-device peak fits in `usable` x the device memory, fastest first."""
    out = []
    for layout in layouts(job.config, hw):
        option = Option(layout, memory_per_device(job, layout), step_seconds(job, layout, hw))
        if option.peak <= usable * hw.memory:
            out.append(option)
    return sorted(out, key=lambda o: (-o.tokens_per_s, o.peak))


def rule_of_thumb(cfg: ModelConfig) -> dict[str, float]:
    """The quoted per-method totals (weights and training state only, no activations):

    full bf16 AdamW at 2 bytes each for weights, gradients and both moments (8 bytes/param, Hugging
    Face's Llama 3.1 table); full mixed-precision AdamW (16 bytes/param); LoRA (bf16 base, 2 bytes/param)
    and QLoRA (4-bit base, 0.5 bytes/param), both without the adapters' small state.
    """
    n = cfg.num_params()
    return {"full (bf16 AdamW, 8 B/param)": 8 * n, "full (mixed-precision AdamW, 16 B/param)": 16 * n,
            "LoRA (bf16 base, 2 B/param)": 2 * n, "QLoRA (4-bit base, 0.5 B/param)": 0.5 * n}


# Hugging Face's Llama 3.1 launch post ("Inference memory requirements" / "Training memory requirements"
# tables), for comparison: bytes of full fine-tuning, LoRA and QLoRA.
HF_QUOTED = {"llama-3.1-8b": (60e9, 16e9, 6e9),
             "llama-3.1-405b": (3.25e12, 950e9, 250e9)}
