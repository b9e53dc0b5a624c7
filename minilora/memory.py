"""The memory plan of a QLoRA + AdaLoRA run: bytes by component, and the predicted peak.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3) stores the frozen base in 4 bits and trains adapters
in 16/32 bits; what is left is adapters, their gradients, the optimizer states and the activations. This module
counts each of them from the model's config alone, for a Llama-architecture model, so a 7B run can be planned
on a laptop without its weights.
"""

import math
from dataclasses import dataclass, field

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_TABLE_BYTES = 16 * 4
DYNAMIC_MAP_BYTES = 256 * 4
DQ_BLOCKSIZE = 256


@dataclass
class RunSettings:
    """What the training run looks like, besides the model."""

    batch_size: int = 1
    seq_len: int = 512
    target_modules: tuple = LLAMA_PROJECTIONS
    init_r: int = 12
    blocksize: int = 64
    double_quant: bool = True
    compute_bytes: int = 4  # 4: float32 compute (CPU); 2: bfloat16 (GPU)
    base_bytes: int = 4  # embeddings, head and norms that stay unquantized
    adapter_bytes: int = 4  # adapters, their gradients and AdamW states are float32
    gradient_checkpointing: bool = True
    optimizer_resident_bytes: int | None = None  # PagedAdamW budget; None keeps every state resident
    page_bytes: int | None = None  # PagedAdamW's page: each parameter's states fill whole pages; None: no rounding
    device: str = "cpu"  # "cpu": PagedAdamW's page pool shares the RAM with the rest, so the peak counts it


@dataclass
class MemoryPlan:
    """Rows of (component, bytes, note); `peak` is the predicted high-water mark of one training step: the
    components that persist, plus the larger of the two transient moments (see plan_memory), so it is less than
    the sum of the rows."""

    rows: list = field(default_factory=list)
    peak: int = 0

    def bytes_of(self, component):
        return dict((name, size) for name, size, _ in self.rows)[component]

    def __str__(self):
        lines = [f"{'component':<34}{'bytes':>16}{'GiB':>9}  note"]
        for name, size, note in [*self.rows, ("predicted peak", self.peak, "resident at the worst moment")]:
            lines.append(f"{name:<34}{size:>16,}{size / 2**30:>9.3f}  {note}")
        return "\n".join(lines)


def linear_shapes(config):
    """(name, out_features, in_features) of the seven projections of one Llama decoder layer."""
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    return [("q_proj", hidden, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden), ("o_proj", hidden, hidden),
            ("gate_proj", mlp, hidden), ("up_proj", mlp, hidden), ("down_proj", hidden, mlp)]


def nf4_bytes(numel, blocksize, double_quant):
    """(packed 4-bit codes, quantization constants and tables) of one NF4 tensor, as minilora.nf4 stores it."""
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / DQ_BLOCKSIZE) + 4 + DYNAMIC_MAP_BYTES
    else:
        constants = 4 * blocks
    return math.ceil(numel / 2), constants + NF4_TABLE_BYTES


def layer_activation_elements(config, settings):
    """Elements one Llama decoder layer saves for backward, per token, as eager PyTorch runs it with SDPA attention
    and SVD adapters (counted with torch.autograd.graph.saved_tensors_hooks): 6 hidden-sized vectors (the layer
    input, its RMSNorm output and its flattened copy, q after rotary embedding, the attention output and the
    normed residual), k and v (2 key/value vectors), 4 MLP vectors (gate, up, SiLU(gate), their product), r per
    adapter (x·Qᵀ), and the attention's log-sum-exp (one per head)."""
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    adapters = sum(1 for name, _, _ in linear_shapes(config) if name in settings.target_modules)
    return 6 * hidden + 2 * kv + 4 * mlp + adapters * settings.init_r + config.num_attention_heads


def activation_elements(config, settings):
    """Elements saved for backward per token at the worst moment of the backward pass.

    Without checkpointing every layer keeps its full set (layer_activation_elements). With checkpointing each
    layer keeps only its input, and one layer's full set is rebuilt during its backward pass.
    """
    per_layer, layers = layer_activation_elements(config, settings), config.num_hidden_layers
    if settings.gradient_checkpointing:
        return layers * config.hidden_size + per_layer
    return layers * per_layer


def optimizer_pages(shapes, settings, layers):
    """Bytes of AdamW's two states as PagedAdamW stores them: each parameter (P, λ, Q of every adapter) owns whole
    pages of settings.page_bytes for each state (no rounding when page_bytes is None)."""
    sizes = [settings.adapter_bytes * n for _, out_f, in_f in shapes
             for n in (out_f * settings.init_r, settings.init_r, settings.init_r * in_f)]
    page = settings.page_bytes
    return 2 * layers * sum(size if page is None else math.ceil(size / page) * page for size in sizes)


def plan_memory(config, settings=None):
    """Bytes by component for a QLoRA + AdaLoRA training step of a Llama-architecture `config`."""
    s = settings or RunSettings()
    layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    shapes = [shape for shape in linear_shapes(config) if shape[0] in s.target_modules]
    kept = [shape for shape in linear_shapes(config) if shape[0] not in s.target_modules]
    codes = constants = 0
    for _, out_f, in_f in shapes:
        c, k = nf4_bytes(out_f * in_f, s.blocksize, s.double_quant)
        codes, constants = codes + layers * c, constants + layers * k
    heads = 1 if getattr(config, "tie_word_embeddings", False) else 2
    unquantized = (heads * vocab * hidden + layers * (2 * hidden + sum(o * i for _, o, i in kept)) + hidden)
    adapter_params = layers * sum(s.init_r * (out_f + in_f + 1) for _, out_f, in_f in shapes)
    adapters = adapter_params * s.adapter_bytes
    states = optimizer_pages(shapes, s, layers)
    resident = states if s.optimizer_resident_bytes is None else min(states, s.optimizer_resident_bytes)
    tokens = s.batch_size * s.seq_len
    activations = tokens * activation_elements(config, s) * s.compute_bytes
    # What is alive besides the model at the two worst moments of a step, whichever is larger:
    # 1. the loss's backward: the log-softmax of the logits (float32, as transformers computes the loss), its
    #    gradient and the logits' gradient, with what the layers saved (with checkpointing: only their inputs);
    # 2. a layer's backward: its saved activations, the largest dequantized weight (it lives only inside one
    #    layer's forward or backward) and the gradients flowing through the layer (about two MLP- and two
    #    hidden-sized vectors per token).
    logits = 3 * tokens * vocab * 4
    dequantized = max((o * i for _, o, i in shapes), default=0) * s.compute_bytes
    flowing = tokens * (2 * config.intermediate_size + 2 * hidden) * s.compute_bytes
    rebuilt = tokens * layer_activation_elements(config, s) * s.compute_bytes if s.gradient_checkpointing else 0
    pool = "counted: on a CPU it is the same RAM" if s.device == "cpu" else "host memory, not on the GPU"
    plan = MemoryPlan(rows=[
        ("quantized weights (NF4 codes)", codes, f"{len(shapes) * layers} matrices, 4 bits each"),
        ("quantization constants", constants, "double-quantized" if s.double_quant else "float32 absmax"),
        ("embeddings, head and norms", unquantized * s.base_bytes, "not quantized"),
        ("adapters", adapters, f"{adapter_params:,} trainable parameters"),
        ("gradients", adapters, "adapters only: the base is frozen"),
        ("importance scores", 3 * adapters, "AdaLoRA: sensitivity, its average and its uncertainty"),
        ("optimizer states (resident)", resident, "AdamW: two moments per parameter, in pages"),
        ("optimizer states (paged out)", states - resident, "host memory, not on the compute device"),
        ("optimizer page pool", states, "PagedAdamW's home copy of every page; " + pool),
        ("activations", activations, "with gradient checkpointing" if s.gradient_checkpointing else "all kept"),
        ("logits and loss", logits, "transient: log-softmax, its gradient, the logits' gradient"),
        ("dequantized weight (transient)", dequantized, "largest target matrix in the compute dtype"),
        ("gradients through a layer", flowing, "transient, during one layer's backward"),
    ])
    steady = sum(size for name, size, _ in plan.rows[:7]) + (states if s.device == "cpu" else 0)
    loss_moment = logits + activations - rebuilt
    layer_moment = activations + dequantized + flowing
    plan.peak = steady + max(loss_moment, layer_moment)
    return plan
