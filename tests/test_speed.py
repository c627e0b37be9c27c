"""Speed options (tunelab.training.speed) on tiny models: each one computes what the plain path computes.

No timing here (timings live in bench/train.py): these tests check that per-example attention equals the dense
packed mask, that the trained-token loss equals transformers' loss, that the fast dropout is a dropout, and that a
bf16 frozen base stays close to fp32.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch

from tunelab.training import speed

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(path, attn: str = "sdpa", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    return model


def with_lora(model, dropout: float = 0.0, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
                        init_lora_weights=False)  # random B too, so the adapters change the output
    return get_peft_model(model, config)


def packed_batch(lengths, seed: int = 0, vocab: int = 4000) -> dict:
    """One packed row: ids, position_ids restarting per example, labels on the second half of each example."""
    g = torch.Generator().manual_seed(seed)
    ids, labels, positions = [], [], []
    for n in lengths:
        x = torch.randint(10, vocab, (n,), generator=g).tolist()
        ids += x
        labels += [-100] * (n - n // 2) + x[n - n // 2:]
        positions += range(n)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# ------------------------------------------------------------------------------------------------ packed attention
def test_packed_segments():
    assert speed.packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [(0, 3), (3, 5), (5, 6)]
    assert speed.packed_segments(torch.tensor([[0, 1, 2, 3]])) is None  # one sequence: plain causal
    assert speed.packed_segments(torch.tensor([[0, 1], [0, 1]])) is None  # several rows are not a packed row
    assert speed.packed_segments(None) is None


@pytest.mark.parametrize("lengths", [[7, 30, 3, 12], [5, 400, 9]])  # short (matmul path) and long (sdpa path)
def test_packed_attention_equals_the_dense_packed_mask(tiny_llama, lengths):
    batch = packed_batch(lengths)
    dense, packed = with_lora(load(tiny_llama)), with_lora(load(tiny_llama))
    assert speed.use_packed_attention(packed)
    assert packed.get_base_model().config._attn_implementation == speed.PACKED_ATTENTION
    out_dense, out_packed = dense(**batch), packed(**batch)
    torch.testing.assert_close(out_packed.logits, out_dense.logits, rtol=1e-4, atol=1e-4)
    out_dense.loss.backward()
    out_packed.loss.backward()
    expected = lora_grads(dense)
    for name, grad in lora_grads(packed).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5)


def test_packed_attention_under_bf16_autocast_stays_close(tiny_llama):
    batch = packed_batch([20, 50, 8])
    dense, packed = load(tiny_llama), load(tiny_llama)
    speed.use_packed_attention(packed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = dense(**batch).loss.float(), packed(**batch).loss.float()
    assert abs(a - b) / a < 1e-2


def test_packed_attention_leaves_padding_and_generation_alone(tiny_llama, tmp_path):
    plain, packed = load(tiny_llama), load(tiny_llama)
    speed.use_packed_attention(packed)
    ids = torch.randint(10, 4000, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    for model in (plain, packed):
        model.config.use_cache = True
        model.generation_config.pad_token_id = 0
    greedy = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False}
    assert torch.equal(packed.generate(ids, **greedy), plain.generate(ids, **greedy))
    speed.restore_attention(packed)
    assert packed.config._attn_implementation == "sdpa"
    packed.save_pretrained(tmp_path / "saved")
    assert speed.PACKED_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()


def test_packed_attention_only_where_every_layer_is_plain_causal(tiny_models):
    from transformers import AutoConfig

    assert speed.plain_causal_attention(AutoConfig.from_pretrained(tiny_models["qwen2"]))
    gemma = AutoConfig.from_pretrained(tiny_models["gemma"])
    assert not speed.plain_causal_attention(gemma)  # sliding-window layers
    assert not speed.use_packed_attention(load(tiny_models["gemma"]))
    mistral = AutoConfig.from_pretrained(tiny_models["mistral"])
    assert speed.plain_causal_attention(mistral, longest=mistral.sliding_window)
    assert not speed.plain_causal_attention(mistral, longest=mistral.sliding_window + 1)
    assert not speed.use_packed_attention(load(tiny_models["llama"], attn="eager"))


# ------------------------------------------------------------------------------------------------------------ loss
def test_trained_token_loss_equals_the_model_loss(tiny_llama):
    batch = packed_batch([9, 25, 4, 14], seed=3)
    ref_model, our_model = with_lora(load(tiny_llama)), with_lora(load(tiny_llama))
    our_model.eval()  # the path that keeps logits (evaluation; and every bf16 or non-plain-head training)
    reference = ref_model(**batch).loss
    ours, outputs = speed.trained_token_loss(our_model, batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert outputs.logits.shape[-2:] == (n, our_model.config.vocab_size)  # logits only where a token is trained
    assert_same_loss_and_lora_grads(ours, reference, our_model, ref_model)


def assert_same_loss_and_lora_grads(ours, reference, our_model, ref_model, grad_atol: float = 1e-6) -> None:
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    reference.backward()
    ours.backward()
    expected = lora_grads(ref_model)
    grads = lora_grads(our_model)
    assert grads.keys() == expected.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=grad_atol)


def test_trained_token_loss_divides_by_the_accumulated_count(tiny_llama):
    batch = packed_batch([10, 12], seed=4)
    model = load(tiny_llama)
    mean, _ = speed.trained_token_loss(model, batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    total, _ = speed.trained_token_loss(model, batch, num_items_in_batch=torch.tensor(3 * n))
    torch.testing.assert_close(total * 3, mean)


def test_fused_head_loss_equals_the_model_loss_in_training(tiny_llama):
    batch = packed_batch([9, 25, 4, 14], seed=3)
    ref_model, our_model = with_lora(load(tiny_llama)), with_lora(load(tiny_llama))
    ref_model.train(), our_model.train()
    assert speed.fused_head(our_model) is our_model.get_base_model().lm_head
    reference = ref_model(**batch).loss
    ours, outputs = speed.trained_token_loss(our_model, batch, chunk=7)  # several chunks
    assert outputs.logits is None  # the fused path keeps no logits
    assert_same_loss_and_lora_grads(ours, reference, our_model, ref_model)


def test_fused_head_only_in_plain_fp32_training(tiny_models):
    model = load(tiny_models["llama"])
    assert speed.fused_head(model) is None  # eval mode: evaluation wants the logits
    model.train()
    assert speed.fused_head(model) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert speed.fused_head(model) is None  # the bf16 path keeps the model's own head
    with torch.no_grad():
        assert speed.fused_head(model) is None
    gemma = load(tiny_models["gemma"]).train()
    assert speed.fused_head(gemma) is None  # soft-capped logits: not a plain head
    from peft import PrefixTuningConfig, get_peft_model

    prefix = get_peft_model(load(tiny_models["llama"]), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert speed.fused_head(prefix.train()) is None  # peft's forward must run: it adds the prefix


def test_linear_cross_entropy_equals_cross_entropy_of_the_logits():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 16, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 50, (13,), generator=g)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    fused = speed.linear_cross_entropy(hidden, weight, targets, chunk=4)
    torch.testing.assert_close(fused, reference)
    expected = torch.autograd.grad(2 * reference, (hidden, weight))
    for ours, theirs in zip(torch.autograd.grad(2 * fused, (hidden, weight)), expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradcheck(lambda h, w: speed.linear_cross_entropy(h, w, targets[:6], 5),
                                    (hidden[:6].detach().requires_grad_(), weight.detach().requires_grad_()))


def test_chunked_cross_entropy_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 50, generator=g, dtype=torch.float64).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50, (11,), generator=g)
    one = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    chunked = speed.chunked_cross_entropy(logits, targets, chunk=3)
    torch.testing.assert_close(chunked, one)
    (grad_one,) = torch.autograd.grad(one, logits)
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(grad_chunked, grad_one)


# ------------------------------------------------------------------------------------------------ fused LoRA add
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_add_equals_peft_forward_and_gradients(tiny_llama, dropout):
    """The one-addmm LoRA add computes peft's loss and LoRA gradients (with the fast dropout: the same masks, its
    1 / (1 - p) folded into the addmm), leaves the state dict's names alone and is undone with the ExitStack."""
    batch = packed_batch([9, 25, 4, 14], seed=5)
    ref_model, our_model = with_lora(load(tiny_llama), dropout), with_lora(load(tiny_llama), dropout)
    ref_model.train(), our_model.train()
    names = list(our_model.state_dict())
    with ExitStack() as undo:
        speed.use_fast_dropout(ref_model, undo), speed.use_fast_dropout(our_model, undo)
        fused = speed.fuse_lora_add(our_model, undo)
        assert fused == 7 * our_model.config.num_hidden_layers
        assert list(our_model.state_dict()) == names
        torch.manual_seed(1)
        reference = ref_model(**batch).loss
        torch.manual_seed(1)
        ours = our_model(**batch).loss
        # with dropout the scale is applied after the matmul instead of before: rounding differs (~2e-6)
        assert_same_loss_and_lora_grads(ours, reference, our_model, ref_model, grad_atol=1e-5)
    from peft.tuners.lora.layer import Linear

    assert {type(m) for m in our_model.modules() if isinstance(m, Linear)} == {Linear}  # undone


def test_fused_lora_add_falls_back_to_peft_where_it_does_not_apply(tiny_llama):
    """Under autocast, with the adapter disabled and for DoRA, the fused layers run peft's own forward."""
    from peft import LoraConfig, get_peft_model

    batch = packed_batch([12, 20], seed=6)
    plain, fused = with_lora(load(tiny_llama)), with_lora(load(tiny_llama))
    undo = ExitStack()
    speed.fuse_lora_add(fused, undo)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fused(**batch).loss, plain(**batch).loss)
    with fused.disable_adapter(), plain.disable_adapter():
        torch.testing.assert_close(fused(**batch).loss, plain(**batch).loss)
    torch.manual_seed(0)
    dora_config = LoraConfig(r=4, target_modules=LORA_TARGETS, use_dora=True, init_lora_weights=False)
    dora = get_peft_model(load(tiny_llama), dora_config)
    expected = dora(**batch).loss
    speed.fuse_lora_add(dora, undo)
    torch.testing.assert_close(dora(**batch).loss, expected)
    undo.close()


# --------------------------------------------------------------------------------------------------------- dropout
def test_fast_dropout_is_a_dropout():
    layer = speed.FastDropout(0.1)
    x = torch.ones(400, 500)
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased
    torch.manual_seed(0)
    assert torch.equal(layer(x), y)  # seeded like any torch random op
    layer.eval()
    assert layer(x) is x
    layer.train()
    x = torch.randn(30, 40, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.9)


def test_keep_mask_lanes_are_uniform():
    torch.manual_seed(1)
    keep = speed.keep_mask((4, 250_000), 0.25, "cpu")
    lanes = keep.view(-1, 4).float().mean(0)  # the four 16-bit lanes of each 64-bit draw
    assert torch.all((lanes - 0.75).abs() < 0.005), lanes


def test_use_fast_dropout_swaps_every_lora_dropout(tiny_llama):
    model = with_lora(load(tiny_llama), dropout=0.05)
    assert speed.use_fast_dropout(model, ExitStack()) == 2 * len(LORA_TARGETS)  # 2 layers x 7 adapted modules
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    model(**packed_batch([5, 6])).loss.backward()
    assert speed.use_fast_dropout(with_lora(load(tiny_llama), dropout=0.0), ExitStack()) == 0


# --------------------------------------------------------------------------------------------------- bf16 frozen base
def test_bf16_frozen_base_keeps_adapters_fp32_and_the_loss_close(tiny_llama):
    batch = packed_batch([12, 30, 7], seed=5)
    fp32, mixed = with_lora(load(tiny_llama)), with_lora(load(tiny_llama))
    cast = speed.cast_frozen_weights(mixed, torch.bfloat16)
    assert cast > 0
    undo = ExitStack()  # kept open: closing it would turn peft's input casting back on
    assert speed.keep_lora_inputs_in_compute_dtype(mixed, undo) > 0
    for name, param in mixed.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    reference = fp32(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mixed(**batch).loss
    assert abs(loss.item() - reference.item()) / reference.item() < 1e-2
    loss.backward()
    grads = lora_grads(mixed)
    assert grads and all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())


# ---------------------------------------------------------------------------------------------- fp32 adapter output
def test_small_adapter_updates_survive_bf16_autocast(tiny_llama):
    """A bf16 frozen output is exact on the bf16 grid: an adapter update under half a bf16 step vanishes in the sum,
    unless the sum is kept in fp32."""
    model = with_lora(load(tiny_llama))
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    torch.manual_seed(1)
    x = torch.randn(64, layer.in_features)
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(1e-4)  # an adapter a few steps into training: tiny next to the base
        wanted = (layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base, rounded = layer.base_layer(x), layer(x)
            assert (rounded == base).float().mean() > 0.5  # most of the update is lost
            undo = ExitStack()
            assert speed.keep_adapter_outputs_fp32(model, undo) > 0
            assert speed.keep_adapter_outputs_fp32(model, undo) > 0  # idempotent: one hook per layer
            kept = layer(x)
    assert kept.dtype == torch.float32
    torch.testing.assert_close(kept - base.float(), wanted, rtol=0.05, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------ plan
def run_config(tmp_path, method: str = "lora", **train):
    from tunelab.config.schema import RunConfig

    return RunConfig.model_validate({"data": {"datasets": [{"path": str(tmp_path / "x.json")}]},
                                     "method": {"name": method}, "train": train})


def test_plan_speed_turns_off_what_cannot_apply(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = run_config(tmp_path)
    cpu = speed.plan_speed(cfg, "cpu", "bf16", packing=True)
    assert cpu.bf16_frozen_base and cpu.packed_attention and cpu.sparse_logits and cpu.fast_dropout
    assert cpu.fp32_adapter_output and not speed.plan_speed(cfg, "cpu", None, packing=True).fp32_adapter_output
    assert speed.plan_speed(cfg, "cpu", None, packing=True).fused_lora and not cpu.fused_lora  # fp32 only
    assert cpu.threads == speed.usable_cores()
    assert not speed.plan_speed(cfg, "cpu", None, packing=True).bf16_frozen_base  # no bf16 autocast
    assert not speed.plan_speed(cfg, "cpu", "bf16", packing=False).packed_attention  # padded batches
    gpu = speed.plan_speed(cfg, "cuda", "bf16", packing=True)
    assert gpu.threads is None and not gpu.fast_dropout
    prefix = speed.plan_speed(run_config(tmp_path, method="prefix"), "cpu", "bf16", packing=False)
    assert not (prefix.bf16_frozen_base or prefix.fast_dropout or prefix.packed_attention or
                prefix.fp32_adapter_output)
    off = run_config(tmp_path, bf16_frozen_base=False, packed_attention=False, sparse_logits=False,
                     fast_dropout=False, fp32_adapter_output=False, threads=1)
    assert speed.plan_speed(off, "cpu", "bf16", True) == speed.SpeedPlan(threads=1)
    assert "bf16 frozen base" in cpu.describe()
    assert speed.plan_speed(cfg, "cpu", "bf16", True, processes=2).threads == max(1, speed.usable_cores() // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torchrun's setting wins over tunelab's default
    assert speed.plan_speed(cfg, "cpu", "bf16", True).threads is None


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert speed.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert speed.set_threads(None) == speed.usable_cores()
    finally:
        torch.set_num_threads(before)


def test_apply_speed_reports_what_applied(tiny_models):
    model = with_lora(load(tiny_models["gemma"]), dropout=0.1)
    plan = speed.SpeedPlan(threads=None, bf16_frozen_base=False, packed_attention=True, sparse_logits=True,
                           fast_dropout=True)
    undo = ExitStack()
    applied = speed.apply_speed(model, plan, undo, longest=64)
    assert not applied.packed_attention  # gemma's sliding-window layers keep the dense mask
    assert applied.fast_dropout and applied.sparse_logits
    json.dumps(applied.__dict__)


# ---------------------------------------------------------------------------------------------------- the recipe
SPEED_OFF = ["train.bf16_frozen_base=false", "train.packed_attention=false", "train.sparse_logits=false",
             "train.fast_dropout=false", "train.fused_lora=false"]


def test_the_recipe_trains_the_same_with_the_speed_options(tiny_llama, tmp_path):
    """Same curve with every option on as with every option off (fp32: exactly; bf16 base: within bf16 error), the
    options that applied recorded in env.json, and final/ loading in a fresh model with a standard attention."""
    from test_train import losses, make_config

    from tunelab.training.sft import train

    common = ["train.max_steps=4", "train.group_by_length=false"]
    on = train(make_config(tiny_llama, tmp_path, "train.run_name=fast", "train.mixed_precision=no", *common),
               echo=False)
    off = train(make_config(tiny_llama, tmp_path, "train.run_name=plain", "train.mixed_precision=no", *common,
                            *SPEED_OFF), echo=False)
    assert losses(on.run_dir) == pytest.approx(losses(off.run_dir), rel=1e-5)
    applied = json.loads((on.run_dir / "env.json").read_text())["speed"]
    assert applied["packed_attention"] and applied["sparse_logits"] and not applied["bf16_frozen_base"]
    assert applied["fused_lora"]
    assert not any(json.loads((off.run_dir / "env.json").read_text())["speed"][k]
                   for k in ("packed_attention", "sparse_logits", "bf16_frozen_base", "fast_dropout", "fused_lora"))

    bf16 = train(make_config(tiny_llama, tmp_path, "train.run_name=bf16", "train.mixed_precision=bf16", *common),
                 echo=False)
    assert json.loads((bf16.run_dir / "env.json").read_text())["speed"]["bf16_frozen_base"]
    assert losses(bf16.run_dir) == pytest.approx(losses(off.run_dir), rel=3e-2)

    from safetensors import safe_open

    saved = [p for p in bf16.run_dir.rglob("*.json")]
    assert saved and not [p for p in saved if speed.PACKED_ATTENTION in p.read_text(encoding="utf-8")]
    with safe_open(str(bf16.final_dir / "adapter_model.safetensors"), "pt") as f:  # adapters saved in fp32
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118 - safe_open is not iterable


def test_the_recipe_with_fast_dropout_and_gradient_accumulation(tiny_llama, tmp_path):
    """LoRA dropout on (the fast mask), accumulation over 2 micro-batches, checkpointing: the run is deterministic
    and its loss matches the options-off run at the first step (dropout masks differ after the first draw)."""
    from test_train import losses, make_config

    from tunelab.training.sft import train

    common = ["train.max_steps=3", "method.dropout=0.1", "train.grad_accum=2", "train.gradient_checkpointing=true",
              "train.mixed_precision=no"]
    a = train(make_config(tiny_llama, tmp_path, "train.run_name=a", *common), echo=False)
    b = train(make_config(tiny_llama, tmp_path, "train.run_name=b", *common), echo=False)
    assert losses(a.run_dir) == losses(b.run_dir)
    assert json.loads((a.run_dir / "env.json").read_text())["speed"]["fast_dropout"]
    off = train(make_config(tiny_llama, tmp_path, "train.run_name=plain", *common, *SPEED_OFF), echo=False)
    assert losses(a.run_dir)[0] == pytest.approx(losses(off.run_dir)[0], rel=0.1)
