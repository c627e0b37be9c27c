"""tunelab.patches: each patch of a library's internals still finds what it relies on, behaving as assumed.

One test (or more) per patch, written to FAIL when the library changes under the patch: a private method renamed or
its signature changed, an attribute gone, a behaviour the patch corrects fixed upstream (then the patch can go).
Plus: the version gates, nothing patched at import time, and everything undone when the caller's ExitStack closes.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from contextlib import ExitStack

import pytest
import torch

from tunelab import patches
from tunelab.errors import TunelabError
from tunelab.patches import Checked, in_checked_range, require_checked

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(path, use_cache: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = use_cache
    return model


def with_lora(model, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM", init_lora_weights=False))


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


# ------------------------------------------------------------------------------------------------- version gates
def test_version_gate_bounds():
    gate = Checked("somelib", "5.0", "6.0", "5.24.0")
    assert in_checked_range(gate, "5.0") and in_checked_range(gate, "5.24.0.dev0")
    assert in_checked_range(gate, "5.99.1+cpu")
    assert not in_checked_range(gate, "4.57.1") and not in_checked_range(gate, "6.0.0rc1")
    assert not in_checked_range(gate)  # not installed


def test_require_checked_names_the_versions():
    with pytest.raises(TunelabError, match=r"somelib>=1.0,<2.0 \(tested with 1.2.3\); installed: not installed"):
        require_checked(Checked("somelib", "1.0", "2.0", "1.2.3"), "a patch")


@pytest.mark.parametrize("gate", [patches.TRANSFORMERS, patches.PEFT, patches.BITSANDBYTES])
def test_installed_libraries_are_in_the_checked_ranges(gate):
    """Fails when an upgrade leaves a checked range: re-run this file, then move the gate and pyproject's bound."""
    if gate.package == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    assert in_checked_range(gate), f"{gate.package} {patches.installed_version(gate.package)} vs {gate.describe()}"


def test_pyproject_bounds_match_the_gates():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    for gate in (patches.TRANSFORMERS, patches.PEFT, patches.BITSANDBYTES):
        assert any(d.startswith(gate.package) and f"<{gate.high}" in d for d in declared), gate.package


def test_nothing_is_patched_at_import_time():
    code = ("import tunelab.patches, tunelab.patches.attention, tunelab.patches.peft_layers, tunelab.patches.packing\n"
            "import tunelab.training.speed, tunelab.training.trainer, tunelab.data.collate\n"
            "from transformers import AttentionInterface\n"
            "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
            "assert 'sdpa_packed' not in AttentionInterface(), 'registered at import'\n"
            "assert 'sdpa_packed' not in ALL_MASK_ATTENTION_FUNCTIONS, 'registered at import'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------- trainer_checkpoint, trainer_loss
def test_trainer_private_checkpoint_methods_are_as_assumed():
    from transformers import Trainer

    assert params(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert params(Trainer._get_output_dir) == ["self", "trial"]
    # the redirect works only if _save_checkpoint asks _get_output_dir where to write
    assert "self._get_output_dir(" in inspect.getsource(Trainer._save_checkpoint)


def make_trainer(tiny_llama, tmp_path, cls):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), use_cpu=True, report_to="none",
                             save_strategy="steps", save_steps=1, max_steps=1)
    trainer = cls(model=load(tiny_llama), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    return trainer


def test_staged_checkpoint_is_written_where_the_mixin_says(tiny_llama, tmp_path):
    from transformers import Trainer

    from tunelab.patches.trainer_checkpoint import StagedCheckpointMixin

    class Staged(StagedCheckpointMixin, Trainer):
        def save_checkpoint(self, model, trial):
            self.write_checkpoint_into(tmp_path / "staging", model, trial)

    trainer = make_trainer(tiny_llama, tmp_path, Staged)
    trainer.state.global_step = 3
    trainer._save_checkpoint(trainer.model, None)  # what Trainer._maybe_log_save_evaluate calls
    written = tmp_path / "staging" / "checkpoint-3"
    assert (written / "trainer_state.json").is_file() and (written / "optimizer.pt").is_file()
    assert (written / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoints" / "checkpoint-3").exists()
    assert trainer._get_output_dir(None) == str(tmp_path / "checkpoints")  # redirect only during the save


def test_trainer_attributes_read_by_the_loss(tiny_llama, tmp_path):
    from transformers import Trainer

    from tunelab.patches.trainer_loss import loss_divisor, own_loss_allowed

    assert params(Trainer.compute_loss)[:5] == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    trainer = make_trainer(tiny_llama, tmp_path, Trainer)
    for name in ("label_smoother", "compute_loss_func", "compute_metrics", "model_accepts_loss_kwargs"):
        assert hasattr(trainer, name), name
    assert trainer.model_accepts_loss_kwargs  # llama's forward takes num_items_in_batch
    assert own_loss_allowed(trainer, {"labels": None}) and not own_loss_allowed(trainer, {})
    assert loss_divisor(trainer, 7) == 7
    trainer.compute_metrics = lambda _: {}
    assert not own_loss_allowed(trainer, {"labels": None})


# ----------------------------------------------------------------------------------------------------- attention
def test_sdpa_mask_and_the_mask_builder_signature():
    from transformers.masking_utils import sdpa_mask

    assert {"q_length", "kv_length", "q_offset", "kv_offset", "attention_mask"} <= set(params(sdpa_mask))


def test_attention_functions_get_the_packed_boundaries(tiny_llama):
    """transformers passes position_ids and the collator's cu_seq_lens_q down to a registered attention function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tunelab.data.collate import packing_collator
    from tunelab.patches.attention import register_attention

    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    assert register_attention("tunelab_probe", probe)
    model = load(tiny_llama)
    model.set_attn_implementation("tunelab_probe")
    batch = packing_collator()([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    model(**batch)
    mask, position_ids, cu = seen[0]
    assert mask is None  # the mask builder answered "no mask": the attention function sees the packing itself
    assert position_ids.tolist() == [[0, 1, 2, 0, 1]] and cu.tolist() == [0, 3, 5]


# ---------------------------------------------------------------------------------------------------- peft layers
def test_peft_casts_the_sum_back_to_the_base_layers_output_dtype(tiny_llama):
    """fp32 adapter outputs rely on it: peft's LoRA forward returns the dtype of base_layer's output."""
    model = with_lora(load(tiny_llama))
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    x = torch.randn(3, layer.in_features)
    handle = layer.get_base_layer().register_forward_hook(lambda _m, _i, out: out.double())
    try:
        assert layer(x).dtype == torch.float64
    finally:
        handle.remove()


def test_lora_dropout_is_a_table_of_dropouts_applied_to_the_input(tiny_llama):
    model = with_lora(load(tiny_llama), dropout=0.1)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_dropout, torch.nn.ModuleDict) and type(layer.lora_dropout["default"]) is torch.nn.Dropout
    calls = []

    class Count(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return x

    layer.lora_dropout["default"] = Count()
    layer(torch.randn(2, layer.in_features))
    assert calls == [(2, layer.in_features)]


def test_disable_input_dtype_casting_is_peft_public_switch(tiny_llama):
    from peft.helpers import disable_input_dtype_casting
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = with_lora(load(tiny_llama))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    with disable_input_dtype_casting(model):
        assert all(m.cast_input_dtype_enabled is False for m in layers)
    assert all(m.cast_input_dtype_enabled is True for m in layers)
    seen = []  # with casting off, lora_A gets the input in its own dtype
    layer = layers[0]
    layer.lora_A["default"].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    with disable_input_dtype_casting(model), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16))
    assert seen == [torch.bfloat16]


def test_speed_patches_are_undone_when_the_stack_closes(tiny_llama):
    from tunelab.patches.peft_layers import HOOKED
    from tunelab.training import speed

    model = with_lora(load(tiny_llama), dropout=0.1)
    bases = [m.get_base_layer() for m in model.modules() if hasattr(m, "lora_A")]
    with ExitStack() as undo:
        assert speed.keep_adapter_outputs_fp32(model, undo) == len(bases) > 0
        assert speed.use_fast_dropout(model, undo) == len(bases)
        assert speed.keep_lora_inputs_in_compute_dtype(model, undo) == len(bases)
        assert all(b._forward_hooks and getattr(b, HOOKED) for b in bases)
        assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert not any(b._forward_hooks or hasattr(b, HOOKED) for b in bases)
    assert not any(isinstance(m, speed.FastDropout) for m in model.modules())
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


# --------------------------------------------------------------------------------------------------- bitsandbytes
def test_bitsandbytes_cpu_repacking_flag_is_as_assumed():
    """The 4-bit layer has the flag, and an eval-mode no-grad forward repacks its weights only while it is on."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn.modules import has_avx512bf16

    from tunelab.patches.bitsandbytes import keep_cpu_weights_trainable

    def layer():
        torch.manual_seed(0)
        return torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4")).to("cpu").eval()

    x = torch.randn(2, 64)
    plain, kept = layer(), layer()
    assert hasattr(plain[0], "support_avx512bf16_for_cpu")
    assert keep_cpu_weights_trainable(kept) == (1 if has_avx512bf16() else 0)
    assert kept[0].support_avx512bf16_for_cpu is False
    with torch.no_grad():
        plain(x), kept(x)
    assert not getattr(kept[0].weight.quant_state, "packing_format_for_cpu", False)
    if has_avx512bf16():  # the behaviour the patch exists for
        assert getattr(plain[0].weight.quant_state, "packing_format_for_cpu", False)


# -------------------------------------------------------------------------------------------------------- packing
def per_token(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch).logits
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
    return losses[labels != -100]


def examples() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (7, 12, 5):
        ids = torch.randint(10, 4000, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return out


def test_transformers_still_skips_packed_detection_with_a_cache(tiny_llama, llama_tokenizer):
    """The pitfall the guard exists for. When this fails, transformers detects packing with a cache too (or no longer
    detects it at all): revisit tunelab.patches.packing."""
    from tunelab.data.collate import packing_collator, padding_collator

    model = load(tiny_llama, use_cache=True).eval()
    padded = per_token(model, padding_collator(llama_tokenizer)(examples()))
    packed = packing_collator()(examples())
    with_cache = per_token(model, packed)
    assert padded.shape == with_cache.shape
    assert not torch.allclose(with_cache, padded, atol=1e-3)  # examples attended to each other
    model.config.use_cache = False
    torch.testing.assert_close(per_token(model, packed), padded, atol=1e-5, rtol=1e-5)


def test_packed_batch_with_a_cache_is_refused_not_merged(tiny_llama, llama_tokenizer):
    from tunelab.data.collate import packing_collator, padding_collator
    from tunelab.patches.packing import PackedBatchError, refuse_packed_batches_with_cache

    model = with_lora(load(tiny_llama, use_cache=True)).eval()
    packed = packing_collator()(examples())
    padded_batch = padding_collator(llama_tokenizer)(examples())
    with ExitStack() as undo:
        refuse_packed_batches_with_cache(model, undo)
        with pytest.raises(PackedBatchError, match="use_cache=False"):
            per_token(model, packed)  # the flag forgotten: an error, not cross-example attention
        with pytest.raises(PackedBatchError):
            per_token(model, {k: v for k, v in packed.items() if not k.startswith(("cu_", "max_"))})
        padded = per_token(model, padded_batch)  # padded batches and generation keep their cache
        model.generate(input_ids=padded_batch["input_ids"][:1, :4], max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
        torch.testing.assert_close(per_token(model, {**packed, "use_cache": False}), padded, atol=1e-5, rtol=1e-5)
        model.get_base_model().config.use_cache = False
        torch.testing.assert_close(per_token(model, packed), padded, atol=1e-5, rtol=1e-5)
        model.get_base_model().config.use_cache = True
    per_token(model, packed)  # the guard is gone once the stack closed


def test_packed_batch_guard_sees_the_fused_loss_path(tiny_llama):
    """trained_token_loss calls the decoder directly: the guard sits on the decoder, so it sees that call too."""
    from tunelab.data.collate import packing_collator
    from tunelab.patches.packing import PackedBatchError, refuse_packed_batches_with_cache
    from tunelab.training.speed import fused_head, trained_token_loss

    model = load(tiny_llama, use_cache=True).train()
    assert fused_head(model) is not None
    with ExitStack() as undo:
        refuse_packed_batches_with_cache(model, undo)
        with pytest.raises(PackedBatchError):
            trained_token_loss(model, packing_collator()(examples()))


@pytest.fixture()
def llama_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)
