"""Stage 4 (training): speed options the recipe applies to a model before training (see docs/speed.md).

Each lever is a plain function with a config switch in TrainConfig; none changes which tokens are trained:

- `cast_frozen_weights`: keep the frozen base in bf16 while trainable weights (LoRA adapters) stay fp32. Autocast
  alone keeps fp32 copies and re-casts every frozen weight at every op; a bf16 base halves the bytes every
  elementwise op moves, and every matmul runs on the CPU's bf16 units.
- `keep_adapter_outputs_fp32`: under autocast, an adapted layer's output stays fp32. The frozen layer's bf16 output
  is exact on the bf16 grid, so adding an adapter update smaller than half a bf16 step gives back the same number:
  early in training most of the adapter's effect is rounded away and the loss falls more slowly (+1.4% mean loss
  over 10 steps of SmolLM2, TRL's bf16 included). This is about accuracy, not speed; it costs some speed.
- `use_packed_attention`: attention per packed example (a causal kernel on each segment) instead of one dense
  block-diagonal mask over the whole packed row, whose cost grows with the square of the row length.
- `trained_token_loss`: logits only where a label is trained (prompt positions never reach the 49k-column
  lm_head), and the fp32 log-softmax recomputed per chunk in the backward pass instead of kept.
- `fuse_lora_add`: outside autocast, each LoRA layer adds its adapter's output into the frozen layer's output with
  one addmm instead of a product, a scaled copy and a sum over the whole output (three passes, one more backward).
- `set_threads`: one intra-op thread per core this process may use.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.config.schema import RunConfig

IGNORE = -100
PACKED_ATTENTION = "sdpa_packed"  # the name registered with transformers' AttentionInterface


# ------------------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class SpeedPlan:
    """Which levers a run uses, after checking each against the device, precision, method and data layout."""

    threads: int | None = None  # intra-op CPU threads; None leaves torch's choice
    bf16_frozen_base: bool = False
    fp32_adapter_output: bool = False
    packed_attention: bool = False
    sparse_logits: bool = False
    fast_dropout: bool = False
    fused_lora: bool = False

    def describe(self) -> str:
        on = [f"{self.threads} threads" if self.threads else None,
              "bf16 frozen base" if self.bf16_frozen_base else None,
              "fp32 adapter outputs" if self.fp32_adapter_output else None,
              "per-example attention" if self.packed_attention else None,
              "logits only on trained tokens" if self.sparse_logits else None,
              "fast LoRA dropout" if self.fast_dropout else None,
              "fused LoRA add" if self.fused_lora else None]
        return "speed: " + (", ".join(x for x in on if x) or "no options")


def plan_speed(cfg: RunConfig, device: str, autocast: str | None, packing: bool, processes: int = 1) -> SpeedPlan:
    """Resolve TrainConfig's speed switches for this run (a RunConfig); options that cannot apply are off.

    `processes`: training processes sharing this machine's cores (each gets its share of threads).
    """
    from tunelab.methods import get_method

    t = cfg.train
    adapters = get_method(cfg.method.name).lora_layers  # LoRA layers beside a frozen, unquantized base
    sharded = bool(t.deepspeed or t.fsdp)  # the wrappers own parameter dtypes
    return SpeedPlan(
        threads=cpu_threads(t.threads, processes) if device == "cpu" else None,
        bf16_frozen_base=t.bf16_frozen_base and autocast == "bf16" and adapters and not sharded,
        fp32_adapter_output=t.fp32_adapter_output and autocast is not None and adapters,
        packed_attention=t.packed_attention and packing and cfg.model.attn_implementation == "sdpa",
        sparse_logits=t.sparse_logits,
        fast_dropout=t.fast_dropout and device == "cpu" and adapters,
        fused_lora=t.fused_lora and autocast is None and adapters,
    )


def apply_speed(model, plan: SpeedPlan, undo: ExitStack, longest: int | None = None) -> SpeedPlan:
    """Apply the model-level levers of `plan` to a model ready to train (after the method); returns what applied.

    Hooks, swapped modules and switches of peft layers are undone when `undo` closes (after training).

    `longest` is the longest example (cutoff_len): a sliding window at least that long never cuts an example.
    `sparse_logits` is applied by the trainer's loss (trained_token_loss), and only where the model's forward
    accepts `logits_to_keep`; threads are set before loading (set_threads).
    """
    if plan.bf16_frozen_base:
        cast_frozen_weights(model, torch.bfloat16)
        keep_lora_inputs_in_compute_dtype(model, undo)
    fp32_out = plan.fp32_adapter_output and keep_adapter_outputs_fp32(model, undo) > 0
    packed = plan.packed_attention and use_packed_attention(model, longest)
    dropout = plan.fast_dropout and use_fast_dropout(model, undo) > 0
    sparse = plan.sparse_logits and accepts_logits_to_keep(model)
    fused = plan.fused_lora and fuse_lora_add(model, undo) > 0
    return SpeedPlan(plan.threads, plan.bf16_frozen_base, fp32_out, packed, sparse, dropout, fused)


def accepts_logits_to_keep(model) -> bool:
    """Causal LMs of transformers 5 take `logits_to_keep` (an index tensor or a boolean mask) in forward."""
    return "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters


# ---------------------------------------------------------------------------------------------------------- threads
def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_threads(wanted: int | None, processes: int = 1) -> int | None:
    """Threads for one training process: `wanted` when given; None (torch's choice) when OMP_NUM_THREADS is set, as
    torchrun does; otherwise the usable cores shared out between the processes."""
    if wanted:
        return wanted
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, usable_cores() // max(1, processes))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None or 0: one per usable core); returns the count in force."""
    n = threads or usable_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------------------- frozen dtype
def cast_frozen_weights(model, dtype: torch.dtype) -> int:
    """Cast every frozen floating-point parameter and buffer to `dtype`; trainable ones keep theirs.

    Returns the number of parameters cast. Norm weights are cast too: transformers' RMSNorm computes in fp32 and
    casts back, so only the storage changes. Buffers such as rotary inverse frequencies stay fp32 (they are
    recomputed from, and must keep, full precision).
    """
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += param.numel()
    return cast


# ------------------------------------------------------------------------------------------------------- LoRA path
def keep_lora_inputs_in_compute_dtype(model, undo: ExitStack) -> int:
    """Let LoRA layers take their input as it comes (bf16 under autocast) instead of casting it to the fp32 of the
    adapter weights first; autocast then runs the adapter matmuls in bf16 while the fp32 master weights get fp32
    gradients. Saves two full-size activation copies per adapted layer, forward and backward. Returns the count.

    Only valid under autocast (without it a bf16 input meets an fp32 weight). peft's own switch
    (`disable_input_dtype_casting`, patches.peft_layers), in force until `undo` closes.
    """
    from tunelab.patches.peft_layers import disable_input_casting

    return disable_input_casting(model, undo)


def keep_adapter_outputs_fp32(model, undo: ExitStack) -> int:
    """Make the frozen layer inside every LoRA/DoRA layer return fp32 (a forward hook, patches.peft_layers, removed
    when `undo` closes), so that peft adds the adapter's output to it in fp32 and the sum stays fp32 (peft casts the
    sum back to the frozen output's dtype). The next matmul still runs in bf16 under autocast; what changes is that a
    small adapter update survives into it (see the module docstring). Returns the number of layers."""
    from tunelab.patches.peft_layers import keep_adapter_outputs_fp32 as hook_outputs

    return hook_outputs(model, undo)


class _MaskedScale(torch.autograd.Function):
    """y = x * keep / (1 - p) (no scaling when `scale` is None), saving the 1-byte keep mask (F.dropout saves a
    mask in the input's dtype)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        kept = torch.where(keep, x, 0)
        return kept if scale is None else kept.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        kept = torch.where(keep, grad, 0)
        return (kept if ctx.scale is None else kept.mul_(ctx.scale)), None, None


def keep_mask(shape, p: float, device) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask drawn 16 bits at a time: one 64-bit draw of the CPU generator gives four
    uniform int16 lanes, so the mask costs a quarter of the generator calls of Tensor.bernoulli_ (which draws one
    per element and dominated LoRA dropout on CPU). p is resolved to 1/65536; seeding and RNG state (resume) work
    as for any torch random op."""
    n = 1
    for d in shape:
        n *= d
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes >= -32768 + round(p * 65536)


class FastDropout(torch.nn.Module):
    """Drop-in for nn.Dropout with a faster mask on CPU (see keep_mask); plain dropout elsewhere."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":  # GPU generators are already fast (Philox, in parallel)
            return F.dropout(x, self.p, True)
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p, x.device), 1.0 / (1.0 - self.p))

    def split_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with the dropped elements zeroed, 1 / (1 - p)): the same mask as forward draws, the scale left to the
        caller, which folds it into a later product (the fused LoRA add's alpha) instead of a pass over x."""
        if not self.training or self.p == 0:
            return x, 1.0
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True), 1.0
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p, x.device), None), 1.0 / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model, undo: ExitStack) -> int:
    """Swap the nn.Dropout modules of LoRA adapters (peft's `lora_dropout`) for FastDropout until `undo` closes
    (patches.peft_layers); returns the count."""
    from tunelab.patches.peft_layers import swap_lora_dropout

    return swap_lora_dropout(model, FastDropout, undo)


def fuse_lora_add(model, undo: ExitStack) -> int:
    """Let every plain LoRA Linear add its adapter's output with one addmm into the frozen layer's output
    (patches.peft_layers.fuse_lora_linear) until `undo` closes; returns the count. Only outside autocast: each layer
    checks at every call and takes peft's own path otherwise (DoRA, several adapters, mixed dtypes)."""
    from tunelab.patches.peft_layers import fuse_lora_linear

    return fuse_lora_linear(model, undo)


# ------------------------------------------------------------------------------------------------ packed attention
def packed_segments(position_ids: torch.Tensor, cu_seq_lens: torch.Tensor | None = None) -> list[tuple[int, int]] | None:
    """(start, end) of each example in a single packed row, or None when the row holds one sequence.

    The boundaries the packing collator gives (`cu_seq_lens`, flash-attention's cumulative lengths) when present;
    otherwise an example starts wherever the position does not follow the previous one (the rule transformers uses).
    """
    if cu_seq_lens is not None and position_ids is not None and position_ids.shape[0] == 1:
        bounds = [int(b) for b in cu_seq_lens.tolist()]
        if bounds[-1] == position_ids.shape[1]:  # else not this row's boundaries: infer them instead
            return list(itertools.pairwise(bounds)) if len(bounds) > 2 else None
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    row = position_ids[0]
    starts = (torch.diff(row) != 1).nonzero().flatten().add_(1).tolist()
    if not starts:
        return None
    bounds = [0, *starts, row.shape[0]]
    return list(itertools.pairwise(bounds))


# the signature is transformers' attention-function interface (AttentionInterface), hence its 9 parameters
# (tests/test_architecture.py allows it by name)
def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          position_ids=None, **kwargs):
    """transformers attention function: causal sdpa per packed example; plain sdpa for everything else.

    Shapes follow transformers' convention: query/key/value (batch, heads, seq, head_dim) in, (batch, seq, heads,
    head_dim) out. Falls back to sdpa whenever a mask is given (padding, prefix tuning, generation with a cache).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = None
    if attention_mask is None and query.shape[2] == key.shape[2]:
        segments = packed_segments(position_ids, kwargs.get("cu_seq_lens_q"))
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    window = kwargs.get("sliding_window")
    if window is not None and max(e - s for s, e in segments) > window:  # use_packed_attention checks this first
        raise RuntimeError(f"a packed example is longer than the sliding window ({window}); use sdpa attention")
    # torch.split, not slicing: the backward of n slices writes each gradient into its own zero tensor of the
    # whole row and sums them (n full-size fills and adds per q, k, v and layer, 7% of an fp32 step); the
    # backward of one split is one cat
    sizes = [e - s for s, e in segments]
    parts = zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2), strict=True)
    outputs = [_causal_attention(q, k, v, scaling, dropout) for q, k, v in parts]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


MATMUL_ATTENTION_MAX = 384  # longer examples go to sdpa: the explicit form's (heads x n x n) scores grow as n^2


def _causal_attention(query, key, value, scale, dropout: float):
    """Causal attention of one example.

    Short examples on CPU use the explicit form (scores, softmax, weighted sum): torch's CPU flash kernel has a
    slow backward pass (3-5x its forward) at these lengths, and the explicit form measured 1.3-2.5x faster for
    fwd+bwd up to ~300 tokens (docs/speed.md). Scores are computed and normalized in fp32, as the flash kernel
    does, so its error matches sdpa's.
    """
    n = query.shape[2]
    if query.device.type != "cpu" or dropout or n > MATMUL_ATTENTION_MAX or query.shape[0] != 1:
        return F.scaled_dot_product_attention(query, key, value, scale=scale, dropout_p=dropout, is_causal=True,
                                              enable_gqa=query.shape[1] != key.shape[1])
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    group = heads // kv_heads  # query heads sharing one key/value head, adjacent as in transformers' repeat_kv
    with torch.autocast("cpu", enabled=False):  # autocast would run this bmm in bf16 and round the scores
        q = query.reshape(kv_heads, group * n, dim).float()
        # scale and causal mask fused into the matmul (one pass over the scores instead of three)
        scores = torch.baddbmm(_causal_bias(n, group, query.device), q, key[0].transpose(1, 2).float(),
                               alpha=scale if scale is not None else dim**-0.5)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.bmm(probs, value[0]).view(1, heads, n, dim)


@functools.lru_cache(maxsize=32)  # every layer of a step sees the same example lengths: built once per length
def _causal_bias(n: int, group: int, device: torch.device) -> torch.Tensor:
    """(group * n, n) additive causal mask: 0 on and below the diagonal, -inf above, repeated for `group` heads."""
    future = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1).repeat(group, 1)
    return torch.zeros(future.shape, device=device).masked_fill_(future, float("-inf"))


def register_packed_attention() -> str | None:
    """Register `sdpa_packed` with transformers (idempotent, patches.attention) and return its name; None when the
    installed transformers is outside the versions the registration was checked against."""
    from tunelab.patches.attention import register_attention

    return PACKED_ATTENTION if register_attention(PACKED_ATTENTION, packed_sdpa_attention) else None


def plain_causal_attention(config, longest: int | None = None) -> bool:
    """True when every layer attends causally to the whole example: no sliding window shorter than the longest
    example (`longest`, None: any length), no soft-capped attention scores. Only then is per-example causal
    attention exactly what the model computes."""
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "attn_logit_softcapping", None):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return longest is not None and longest <= window
    return True


def use_packed_attention(model, longest: int | None = None) -> bool:
    """Switch a model that runs sdpa to per-example attention (examples up to `longest` tokens); False, leaving the
    model unchanged, for other attention implementations and for layers that are not plain causal."""
    config = _base_config(model)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not plain_causal_attention(config, longest):
        return False
    name = register_packed_attention()
    if name is None:
        return False
    _base_model(model).set_attn_implementation(name)
    return True


def restore_attention(model, name: str = "sdpa") -> None:
    """Back to a standard implementation, e.g. before saving (a saved config must not name our function)."""
    if getattr(_base_config(model), "_attn_implementation", None) == PACKED_ATTENTION:
        _base_model(model).set_attn_implementation(name)


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_config(model):
    return getattr(_base_model(model), "config", None)


# ------------------------------------------------------------------------------------------------------------ loss
def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): a (batch, seq) bool mask of positions whose NEXT token is trained, and those tokens.

    Position t predicts labels[t + 1]; the last position predicts nothing.
    """
    shifted = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = shifted != IGNORE
    return keep, shifted[shifted != IGNORE]


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Sum of fp32 cross-entropy over rows of `logits` (n, vocab), one chunk at a time.

    With more than one chunk, each chunk's fp32 copy and log-softmax are recomputed in the backward pass
    (activation checkpointing), so memory holds the logits in their own dtype plus one chunk in fp32, not
    n x vocab fp32 values twice. A single chunk is computed directly (no recompute, no slicing).
    """
    from torch.utils.checkpoint import checkpoint

    if logits.shape[0] <= chunk:
        return _ce_sum(logits, targets)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], chunk):
        part = logits[start:start + chunk]
        want = targets[start:start + chunk]
        if logits.requires_grad:
            total = total + checkpoint(_ce_sum, part, want, use_reentrant=False)
        else:
            total = total + _ce_sum(part, want)
    return total


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def trained_token_loss(model, inputs: dict, num_items_in_batch=None, chunk: int = 1024):
    """The causal-LM loss computed from logits at trained positions only; returns (loss, outputs).

    Equal to transformers' ForCausalLMLoss: a sum over trained tokens divided by `num_items_in_batch` when given
    (the Trainer counts the whole accumulated batch), else by this batch's trained tokens. In fp32 training of a
    model with a plain lm_head (see fused_head), the lm_head and the loss are one fused op that never keeps the
    logits (`outputs.logits` is then None); otherwise the model's own lm_head runs on the trained positions.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep, targets = trained_positions(labels)
    head = fused_head(model)
    if head is not None:
        outputs = _base_model(model).get_decoder()(**inputs)
        hidden = outputs.last_hidden_state[keep]
        total = linear_cross_entropy(hidden, head.weight, targets.to(hidden.device), chunk)
        outputs = CausalLMOutput(logits=None)
    else:
        outputs = model(**inputs, logits_to_keep=keep)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        total = chunked_cross_entropy(logits, targets.to(logits.device), chunk)
    count = num_items_in_batch if num_items_in_batch is not None else max(int(targets.numel()), 1)
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count, outputs


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None


# model types whose causal-LM forward is exactly lm_head(decoder(...).last_hidden_state): no logit scaling or
# soft-capping (Gemma, Cohere, Granite have them), no bias
PLAIN_HEAD_MODELS = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


def fused_head(model):
    """The lm_head to fuse with the loss, or None where the fused path does not apply: under autocast (the bf16 path
    keeps the model's own head), outside training with gradients (evaluation wants logits), behind a wrapper whose
    forward must run (DDP, peft's prompt learning), and for model types outside PLAIN_HEAD_MODELS or a head that is not a plain Linear."""
    if hasattr(model, "module") or not (model.training and torch.is_grad_enabled()):
        return None
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return None
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None  # P-Tuning v2: peft's forward adds the prefix; calling the decoder directly would drop it
    base = _base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if getattr(base.config, "model_type", None) not in PLAIN_HEAD_MODELS or type(head) is not torch.nn.Linear:
        return None
    if head.bias is not None or head.weight.dtype != torch.float32:
        return None
    return head


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), fp32, without keeping the logits: each chunk's
    logits are computed, reduced to their log-sum-exp, and recomputed in the backward pass, where the softmax is
    formed in place (one (chunk, vocab) buffer, no log_softmax and no stored logits; 15% of an fp32 step before)."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        lse = hidden.new_empty(hidden.shape[0])
        total = hidden.new_zeros(())
        for start in range(0, hidden.shape[0], chunk):
            logits = hidden[start:start + chunk] @ weight.t()
            picked = logits.gather(1, targets[start:start + chunk, None]).squeeze(1)
            # log-sum-exp in place (torch.logsumexp writes logits - max into a second (chunk, vocab) buffer)
            top = logits.amax(dim=-1, keepdim=True)
            lse[start:start + chunk] = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))
            total += (lse[start:start + chunk] - picked).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = hidden[start:start + ctx.chunk]
            probs = (part @ weight.t()).sub_(lse[start:start + ctx.chunk, None]).exp_()  # softmax, in place
            rows = torch.arange(part.shape[0], device=part.device)
            probs[rows, targets[start:start + ctx.chunk]] -= 1  # d(lse - logit[target]) / d logits
            probs.mul_(grad)
            if grad_hidden is not None:
                torch.mm(probs, weight, out=grad_hidden[start:start + ctx.chunk])
            if grad_weight is not None:
                grad_weight.addmm_(probs.t(), part)
        return grad_hidden, grad_weight, None, None
