"""bitsandbytes inference (model.quantize / --quantize int8|nf4) for chat, eval and serve, and its refusal in training.

The references are the same tiny models loaded in full precision: greedy next-token choices are compared position by
position (teacher forced, so one early difference does not shift every later position).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from test_inference_support import make_run_dir

from tunelab.cli.main import main
from tunelab.config.schema import ModelConfig, RunConfig
from tunelab.errors import TunelabError
from tunelab.inference.engine import EngineOptions, GenerationParams
from tunelab.inference.hf import load_engine
from tunelab.models.quantized import INFERENCE_ONLY, inference_quantization, quantized_layers

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'tunelab[quant]')")

LAYER = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}
# teacher-forced greedy agreement with the fp32 model on the tiny random llama (hidden 64: every row is one or two
# quantization blocks, so this is harsher than a real model); measured 1.00 (int8) and 0.84 (nf4)
MIN_AGREEMENT = {"int8": 0.95, "nf4": 0.75}


def quantized(model: str | Path, quantize: str, **options):
    return load_engine(str(model), None, EngineOptions(quantize=quantize, **options))


def greedy_agreement(reference, model, seed: int = 0) -> float:
    """Share of positions where both models' most likely next token is the same, on random token sequences."""
    torch.manual_seed(seed)
    ids = torch.randint(100, 40000, (4, 48))
    with torch.no_grad():
        want = reference(ids).logits.argmax(-1)
        got = model(ids).logits.argmax(-1)
    return (want == got).float().mean().item()


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_base_loads_quantized_and_answers(quantize, tiny_llama):
    engine = quantized(tiny_llama, quantize)
    layers = quantized_layers(engine.model)
    # every decoder projection (2 layers x 7) is a bitsandbytes layer; lm_head stays in full precision
    assert layers == {LAYER[quantize]: 14}
    assert type(engine.model.lm_head).__name__ == "Linear"
    assert inference_quantization(engine.model) == quantize
    assert engine.artifact.model_cfg.quantize == quantize
    [answer] = engine.generate([engine.render([{"role": "user", "content": "hi"}])], GenerationParams(max_new_tokens=6))
    assert answer.completion_tokens > 0
    full = load_engine(str(tiny_llama))
    assert engine.model.get_memory_footprint() < full.model.get_memory_footprint()


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_greedy_tokens_agree_with_full_precision(quantize, tiny_llama, capsys):
    full = load_engine(str(tiny_llama))
    engine = quantized(tiny_llama, quantize)
    agreement = greedy_agreement(full.model, engine.model)
    with capsys.disabled():
        print(f"\n{quantize}: teacher-forced greedy agreement with fp32 {agreement:.3f}")
    assert agreement >= MIN_AGREEMENT[quantize]


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_run_adapter_is_applied_on_the_quantized_base(quantize, tiny_llama, tmp_path):
    run = make_run_dir(tiny_llama, tmp_path, "lora")
    full = load_engine(str(run))
    engine = quantized(run, quantize)
    assert hasattr(engine.model, "peft_config")  # the adapter wraps the quantized layers
    lora_bases = {type(m.base_layer).__name__ for m in engine.model.modules() if hasattr(m, "lora_A")}
    assert lora_bases == {LAYER[quantize]}
    assert inference_quantization(engine.model) == quantize
    assert greedy_agreement(full.model, engine.model) >= MIN_AGREEMENT[quantize]
    base_only = quantized(tiny_llama, quantize)
    assert greedy_agreement(base_only.model, engine.model) < 0.9  # the adapter changes the answers


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_prefix_tuning_run_on_a_quantized_base(quantize, tiny_llama, tmp_path):
    run = make_run_dir(tiny_llama, tmp_path, "prefix")
    full = load_engine(str(run))
    engine = quantized(run, quantize)
    [answer] = engine.generate([engine.render([{"role": "user", "content": "hi"}])], GenerationParams(max_new_tokens=4))
    assert answer.completion_tokens > 0
    # the test prefix is scaled up 20x (it must visibly change the outputs), which magnifies NF4's error: measured
    # 0.97 (int8) and 0.66 (nf4) against the fp32 prefix model, 0.0 against the quantized base without the prefix
    assert greedy_agreement(full.model, engine.model) >= {"int8": 0.95, "nf4": 0.6}[quantize]
    assert greedy_agreement(quantized(tiny_llama, quantize).model, engine.model) < 0.5


def test_merge_folds_the_adapter_into_the_quantized_base(tiny_llama, tmp_path):
    run = make_run_dir(tiny_llama, tmp_path, "lora")
    adapter = quantized(run, "int8")
    merged = quantized(run, "int8", merge=True)
    assert not hasattr(merged.model, "peft_config")
    assert quantized_layers(merged.model) == {"Linear8bitLt": 14}
    # the merged weights are re-quantized to int8 (peft warns of rounding): measured 0.92 against the unmerged model
    assert greedy_agreement(adapter.model, merged.model) >= 0.85


def test_chat_flag_and_override(tiny_llama, capsys, monkeypatch):
    loaded = []
    real = load_engine

    def spy(model, *args, **kwargs):
        engine = real(model, *args, **kwargs)
        loaded.append(quantized_layers(engine.model))
        return engine

    monkeypatch.setattr("tunelab.inference.hf.load_engine", spy)
    assert main(["chat", str(tiny_llama), "-p", "hi", "--max-new-tokens", "4", "--quantize", "nf4"]) == 0
    assert main(["chat", str(tiny_llama), "model.quantize=int8", "-p", "hi", "--max-new-tokens", "4"]) == 0
    assert loaded == [{"Linear4bit": 14}, {"Linear8bitLt": 14}]
    with pytest.raises(SystemExit):
        main(["chat", str(tiny_llama), "-p", "hi", "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_eval_flag_records_the_quantization(tiny_llama, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n"
                            for q, a in [("Name a colour.", "blue"), ("2 + 3?", "5")]), encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_llama), "--data", str(data), "--max-new-tokens", "4", "--quantize", "int8",
                 "--metrics", "loss,exact_match", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["info"]["quantize"] == "int8"
    assert metrics["metrics"]["loss"] > 0


def test_serve_flag_loads_the_quantized_engine(tiny_llama, monkeypatch):
    from tunelab.inference.engine import get_engine

    served = {}

    def fake_serve(model, adapter=None, cfg=None, options=None):
        options = dataclasses.replace(options, max_batch_size=cfg.max_batch_size)
        served["engine"] = get_engine(cfg.engine).load(model, adapter, options)

    monkeypatch.setattr("tunelab.serving.server.serve", fake_serve)
    assert main(["serve", str(tiny_llama), "--quantize", "nf4", "--port", "0"]) == 0
    assert quantized_layers(served["engine"].model) == {"Linear4bit": 14}


def test_serve_refuses_quantize_with_another_engine(tiny_llama, capsys):
    assert main(["serve", str(tiny_llama), "--quantize", "nf4", "--engine", "vllm"]) == 2
    assert "bitsandbytes in the hf engine" in capsys.readouterr().err


def test_missing_bitsandbytes_is_refused_before_loading(tiny_llama, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(TunelabError, match=r"needs bitsandbytes, which is not installed: pip install 'tunelab\[quant\]'"):
        quantized(tiny_llama, "int8")


# ------------------------------------------------------------------------------------------ never for training
def test_trainer_refuses_an_inference_quantized_model(tiny_llama, tmp_path):
    from transformers import TrainingArguments

    from tunelab.training.trainer import TunelabTrainer

    engine = quantized(tiny_llama, "nf4")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TunelabError, match=r"model.quantize=nf4 for inference only.*docs/pitfalls.md #2.*qlora"):
        TunelabTrainer(model=engine.model, args=args)
    with pytest.raises(TunelabError, match="for inference only"):  # positional, and through a PEFT wrapper
        TunelabTrainer(quantized(make_run_dir(tiny_llama, tmp_path, "lora"), "int8").model, args)


def test_training_configs_with_quantize_are_refused_before_loading(tiny_llama):
    from tunelab.training.align import check_alignment
    from tunelab.training.sft import check_combination
    from tunelab.training.stages import get_stage

    cfg = RunConfig(model={"name": str(tiny_llama), "quantize": "int8"})
    with pytest.raises(TunelabError, match=r"model.quantize=int8 is for inference only.*method.name: qlora"):
        check_combination(cfg)
    with pytest.raises(TunelabError, match="model.quantize=int8 is for inference only"):
        check_alignment(cfg.model_copy(update={"stage": "dpo"}), get_stage("dpo"))


def test_qlora_training_quantization_cannot_be_mixed_with_inference_quantize(tiny_llama):
    from tunelab.methods.qlora import qlora_load_kwargs
    from tunelab.models.load import load_model

    cfg = ModelConfig(name=str(tiny_llama), quantize="nf4")
    with pytest.raises(TunelabError, match="cannot be combined with a training quantization"):
        load_model(cfg, tiny_llama, **qlora_load_kwargs(RunConfig(method={"name": "qlora"}).method, "cpu"))


def test_full_precision_models_are_not_marked(tiny_llama):
    engine = load_engine(str(tiny_llama))
    assert inference_quantization(engine.model) is None
    assert not hasattr(engine.model, INFERENCE_ONLY)


def test_int8_cast_notice_is_logged_once_not_per_matmul(tiny_llama, caplog):
    engine = quantized(tiny_llama, "int8")
    with caplog.at_level(logging.WARNING):
        engine.generate([engine.render([{"role": "user", "content": "hi"}])], GenerationParams(max_new_tokens=4))
    assert not [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
