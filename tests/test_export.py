"""Export: merged == unmerged, quantized-base refusal and the right path, template preservation, prefix/full runs."""

from __future__ import annotations

import json

import pytest
import torch
from test_inference_support import CUSTOM_TEMPLATE, make_adapter, make_run_dir

from tunelab.config.schema import ExportConfig
from tunelab.errors import TunelabError
from tunelab.export.merge import QuantizedBaseError, refuse_quantized
from tunelab.export.pipeline import export_model
from tunelab.export.verify import SAMPLE_CONVERSATIONS
from tunelab.inference.engine import EngineOptions, GenerationParams
from tunelab.inference.hf import load_engine

GREEDY = GenerationParams(max_new_tokens=12)
QUESTIONS = ["Hi", "What is the capital of France?", "你好，今天天气怎么样？"]


def answers(engine) -> list[str]:
    prompts = [engine.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    return [c.text for c in engine.generate(prompts, GREEDY)]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_equals_unmerged(tiny_models, tmp_path, kind):
    adapter = make_adapter(tiny_models["llama"], tmp_path / kind, kind=kind)
    result = export_model(str(adapter), ExportConfig(), out=tmp_path / "out")
    assert result.kind == "merged" and not (tmp_path / "out" / "adapter_config.json").exists()
    assert any(p.suffix == ".safetensors" for p, _ in result.files())
    merged = load_engine(str(result.out_dir))
    assert answers(merged) == answers(load_engine(str(adapter)))
    assert answers(merged) != answers(load_engine(str(tiny_models["llama"])))  # the adapter mattered


def test_16bit_export_and_shards(tiny_models, tmp_path):
    adapter = make_adapter(tiny_models["qwen2"], tmp_path / "lora")
    cfg = ExportConfig(dtype="bfloat16", max_shard_size="5MB")
    result = export_model(str(adapter), cfg, out=tmp_path / "out")
    shards = sorted(p.name for p in result.out_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (result.out_dir / "model.safetensors.index.json").is_file()
    assert json.loads((result.out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    engine = load_engine(str(result.out_dir), options=EngineOptions(dtype="bfloat16"))
    assert next(engine.model.parameters()).dtype == torch.bfloat16 and all(answers(engine))


def test_template_is_preserved(tiny_models, tmp_path):
    run = make_run_dir(tiny_models["llama"], tmp_path, "lora", template=CUSTOM_TEMPLATE)
    result = export_model(str(run))
    assert result.out_dir == run / "export" and result.template_problems == []
    config = json.loads((result.out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CUSTOM_TEMPLATE
    assert (result.out_dir / "chat_template.jinja").read_text(encoding="utf-8") == CUSTOM_TEMPLATE
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(result.out_dir)
    training = AutoTokenizer.from_pretrained(run / "final")
    for conv in SAMPLE_CONVERSATIONS:
        assert exported.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
            training.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    generation = json.loads((result.out_dir / "generation_config.json").read_text())
    eot = exported.convert_tokens_to_ids("<|eot_id|>")
    assert eot in (generation["eos_token_id"] if isinstance(generation["eos_token_id"], list)
                   else [generation["eos_token_id"]])
    assert exported.eos_token == "<|eot_id|>"
    assert answers(load_engine(str(result.out_dir))) == answers(load_engine(str(run)))


def test_thinking_setting_of_training_is_baked_in(tiny_models, tmp_path):
    run = make_run_dir(tiny_models["qwen3"], tmp_path, "lora")
    config = run / "config.yaml"
    config.write_text(config.read_text() + "data:\n  enable_thinking: false\n")
    result = export_model(str(run))
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(result.out_dir).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert load_engine(str(run)).render([{"role": "user", "content": "hi"}]) == prompt


def test_quantized_base_is_refused_with_the_right_path(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"],
                                                quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(QuantizedBaseError) as e:
        refuse_quantized(model)
    message = str(e.value)
    assert "4-bit" in message and "reload the base model unquantized" in message and "then quantize" in message


def test_prequantized_base_folder_is_refused(tiny_models, tmp_path):
    import shutil

    base = tmp_path / "base-bnb-4bit"
    shutil.copytree(tiny_models["llama"], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(tiny_models["llama"], tmp_path / "lora")
    with pytest.raises(QuantizedBaseError, match="no 16-bit weights"):
        export_model(str(base), adapter=str(adapter), out=tmp_path / "out")


def test_qlora_run_is_merged_into_an_unquantized_base(tiny_models, tmp_path):
    """The right path, implemented: reload the run's base without quantization, merge, (then quantize)."""
    run = make_run_dir(tiny_models["llama"], tmp_path, "qlora")
    result = export_model(str(run))
    assert result.kind == "merged"
    assert "quantization_config" not in json.loads((result.out_dir / "config.json").read_text())
    assert answers(load_engine(str(result.out_dir))) == answers(load_engine(str(run)))


def test_prefix_run_exports_base_plus_adapter(tiny_models, tmp_path):
    run = make_run_dir(tiny_models["qwen2"], tmp_path, "prefix")
    result = export_model(str(run))
    assert result.kind == "prefix" and any("cannot be folded" in n for n in result.notes)
    assert (result.out_dir / "prefix_adapter" / "adapter_config.json").is_file()
    exported = load_engine(str(result.out_dir))
    assert exported.artifact.adapter_path == result.out_dir / "prefix_adapter"
    assert answers(exported) == answers(load_engine(str(run)))
    with pytest.raises(TunelabError, match="prefix tuning"):
        export_model(str(run), ExportConfig(gguf=["f16"]), out=tmp_path / "gguf-out")


def test_full_run_exports_the_model_itself(tiny_models, tmp_path):
    run = make_run_dir(tiny_models["gemma"], tmp_path, "full", template=None)
    result = export_model(str(run), out=tmp_path / "out")
    assert result.kind == "full" and result.template_problems == []
    assert answers(load_engine(str(result.out_dir))) == answers(load_engine(str(run)))


def test_post_merge_int8_quantization(tiny_models, tmp_path):
    pytest.importorskip("torchao")
    adapter = make_adapter(tiny_models["llama"], tmp_path / "lora")
    result = export_model(str(adapter), ExportConfig(quantize="int8"), out=tmp_path / "out")
    info = result.quantized
    assert info["method"] == "int8" and info["size_bytes"] > 0 and info["tokens_per_s"] > 0
    folder = tmp_path / "out" / "int8"
    assert json.loads((folder / "tunelab_export.json").read_text())["kind"] == "quantized"
    engine = load_engine(str(folder))
    assert (folder / "chat_template.jinja").read_text() == (tmp_path / "out" / "chat_template.jinja").read_text()
    assert all(c.completion_tokens == 12 for c in engine.generate([engine.render([{"role": "user", "content": "hi"}])],
                                                                   GREEDY))
