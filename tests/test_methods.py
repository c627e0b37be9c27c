"""Tuning methods on tiny models: the right parameters train, the rest stay frozen, the saved artifact reloads
with the same logits; unavailable methods fail before loading."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tunelab.config.schema import DoraConfig, FreezeConfig, FullConfig, LoraConfig, PrefixConfig, QLoraConfig
from tunelab.errors import MethodUnavailableError, TunelabError
from tunelab.methods import (
    Method,
    apply_method,
    check_method_available,
    count_parameters,
    get_method,
    known_methods,
    method_load_kwargs,
    register_method,
)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    model.config.use_cache = False
    return model


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 2000, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row: prefix tuning must extend the mask itself
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batch(step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    inputs = batch(99)
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def changed(before, after, names) -> set[str]:
    return {n for n in names if not torch.equal(before[n], after[n])}


PEFT_CASES = [
    LoraConfig(r=4, alpha=8, dropout=0.0),
    LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rslora=True, dropout=0.0),
    DoraConfig(r=4, dropout=0.0),
    PrefixConfig(num_virtual_tokens=4, projection=True, encoder_hidden_size=32),
    PrefixConfig(num_virtual_tokens=4, projection=False),
]


@pytest.mark.parametrize("cfg", PEFT_CASES, ids=lambda c: f"{c.name}-{getattr(c, 'projection', '')}")
def test_peft_methods_train_only_their_parameters_and_reload(cfg, tiny_llama, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = apply_method(load(tiny_llama), cfg)
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = set(before) - trainable
    assert trainable and frozen
    train_steps(model)
    after = snapshot(model)
    assert changed(before, after, frozen) == set(), "a frozen base weight moved"
    assert changed(before, after, trainable), "no trainable parameter moved"
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load(tiny_llama), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    base_logits = logits(load(tiny_llama))
    assert not torch.allclose(base_logits, expected, atol=1e-4), "the adapter changes nothing"


def test_lora_targets_and_rslora(tiny_llama):
    model = apply_method(load(tiny_llama), LoraConfig(r=4, alpha=8, target_modules=["q_proj"], rslora=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("q_proj" in n for n in names)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # alpha / sqrt(r)
    all_linear = apply_method(load(tiny_llama), LoraConfig(r=4))
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in all_linear.named_parameters() if p.requires_grad}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_bad_target_is_a_clear_error(tiny_llama):
    with pytest.raises(TunelabError, match="target_modules"):
        apply_method(load(tiny_llama), LoraConfig(target_modules=["no_such_proj"]))


def test_init_from_continues_an_existing_adapter(tiny_llama, tmp_path):
    first = apply_method(load(tiny_llama), LoraConfig(r=4, dropout=0.0))
    train_steps(first)
    first.save_pretrained(tmp_path / "a")
    expected = logits(first)
    second = apply_method(load(tiny_llama), LoraConfig(r=4, init_from=str(tmp_path / "a")))
    torch.testing.assert_close(logits(second), expected)
    assert any(p.requires_grad for p in second.parameters())
    with pytest.raises(TunelabError, match="adapter_config.json"):
        apply_method(load(tiny_llama), LoraConfig(init_from=str(tmp_path)))


@pytest.mark.parametrize("cfg", [FullConfig(), FreezeConfig(trainable_layers=1, trainable_modules=["lm_head"])],
                         ids=["full", "freeze"])
def test_full_and_freeze_train_the_chosen_weights_and_reload(cfg, tiny_llama, tmp_path):
    model = apply_method(load(tiny_llama), cfg)
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if cfg.name == "freeze":
        assert all(n.startswith(("model.layers.1.", "lm_head")) for n in trainable)
        assert any(n.startswith("lm_head") for n in trainable) and any("layers.1." in n for n in trainable)
    else:
        assert trainable == set(before)
    train_steps(model, lr=1e-3)
    after = snapshot(model)
    assert changed(before, after, set(before) - trainable) == set()
    assert changed(before, after, trainable) == trainable
    expected = logits(model)
    model.save_pretrained(tmp_path / "model")
    torch.testing.assert_close(logits(load(tmp_path / "model")), expected)


def test_freeze_errors_name_the_field(tiny_llama):
    with pytest.raises(TunelabError, match="trainable_modules.*no_such"):
        apply_method(load(tiny_llama), FreezeConfig(trainable_layers=1, trainable_modules=["no_such"]))
    with pytest.raises(TunelabError, match="more than the model's 2 layers"):
        apply_method(load(tiny_llama), FreezeConfig(trainable_layers=5))
    with pytest.raises(TunelabError, match="nothing trains"):
        apply_method(load(tiny_llama), FreezeConfig(trainable_layers=0))


def test_registry():
    assert set(known_methods()) == {"lora", "dora", "qlora", "full", "freeze", "prefix"}
    with pytest.raises(TunelabError, match="unknown method 'lorax'; known: lora, dora, qlora, full, freeze, prefix"):
        get_method("lorax")
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("lora", lambda m, c: m, LoraConfig))
    assert get_method("prefix").supports_packing is False
    assert get_method("lora").supports_packing is True


def test_builtin_entries_describe_what_was_hard_coded_by_name():
    """The flags reproduce the name lists that config/load.py, runs.py, speed.py, memory.py, sft.py held before."""
    flagged = {flag: {m for m in known_methods() if getattr(get_method(m), flag)} for flag in (
        "is_adapter", "mergeable", "quantized_base", "trains_base_weights", "lora_layers")}
    assert flagged == {"is_adapter": {"lora", "dora", "qlora", "prefix"}, "mergeable": {"lora", "dora", "qlora"},
                       "quantized_base": {"qlora"}, "trains_base_weights": {"full", "freeze"},
                       "lora_layers": {"lora", "dora"}}
    assert {m for m in known_methods() if not get_method(m).supports_gradient_checkpointing} == {"prefix"}
    assert {m: get_method(m).summary_keys for m in known_methods()} == {
        "lora": ("r", "alpha"), "dora": ("r", "alpha"), "qlora": ("r", "bits"), "freeze": ("trainable_layers",),
        "prefix": ("num_virtual_tokens",), "full": ()}
    assert get_method("qlora").base_weight_bytes(QLoraConfig(bits=4)) == pytest.approx(0.57)
    for name in known_methods():
        assert get_method(name).config.model_fields["name"].default == name


def test_count_parameters(tiny_llama):
    model = load(tiny_llama)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)
    peft_model = apply_method(model, LoraConfig(r=4))
    trainable, all_params = count_parameters(peft_model)
    assert 0 < trainable < all_params and all_params == total + trainable


def test_qlora_unavailable_fails_before_loading(monkeypatch):
    cfg = QLoraConfig()
    with pytest.raises(MethodUnavailableError, match="cannot run on device 'xpu'.*method.name: lora"):
        check_method_available(cfg, "xpu")  # no bitsandbytes backend (nor torch device) for it here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MethodUnavailableError, match="pip install"):
        check_method_available(cfg, "cpu")
    for other in (LoraConfig(), DoraConfig(), FullConfig(), FreezeConfig(), PrefixConfig()):
        check_method_available(other, "cpu")  # never need anything extra


def qlora_model(path, cfg, seed: int = 0):
    torch.manual_seed(seed)  # same adapter initialisation for every call
    return apply_method(load(path, **method_load_kwargs(cfg, "cpu")), cfg)


def adapter_grads(model) -> dict[str, torch.Tensor]:
    model.train()
    model(**batch(0)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_cpu_even_after_eval_and_reloads(bits, tiny_llama, tmp_path):
    """An eval forward before training must not change the gradients (4-bit CPU repacking, docs/pitfalls.md #2)."""
    from peft import PeftModel

    from tunelab.methods.qlora import keep_cpu_weights_trainable

    cfg = QLoraConfig(r=4, dropout=0.0, bits=bits)
    check_method_available(cfg, "cpu")
    reference = adapter_grads(qlora_model(tiny_llama, cfg))
    model = qlora_model(tiny_llama, cfg)
    logits(model)  # the eval-mode no-grad forward that used to repack the 4-bit weights
    grads = adapter_grads(model)
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, msg=f"gradient of {name} changed after an eval forward")
    before = snapshot(model)
    trainable = set(reference)
    train_steps(model)
    assert changed(before, snapshot(model), trainable) == trainable
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    base = load(tiny_llama, **method_load_kwargs(cfg, "cpu"))
    keep_cpu_weights_trainable(base)  # same 4-bit kernel as in training (the inference layout computes in bf16)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    trainable_count, total = count_parameters(model)
    assert total == sum(p.numel() for p in load(tiny_llama).parameters()) + trainable_count
