"""The training recipe end to end on tiny models: run folder, monitoring, determinism, packing, NaN guard,
memory estimate, every method's final artifact, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.training.sft import train

WORDS = ["apple", "river", "stone", "cloud", "green", "piano", "tiger", "lemon", "ocean", "paper", "smile", "train"]
ZH = ["苹果", "河流", "石头", "白云", "钢琴", "老虎", "柠檬", "海洋"]


def write_data(folder: Path, n: int = 24) -> Path:
    """Word-reversal records in Alpaca format, a quarter of them in Chinese."""
    rows = []
    for i in range(n):
        vocab = ZH if i % 4 == 3 else WORDS
        words = [vocab[(i * 3 + k * 5) % len(vocab)] for k in range(2 + i % 3)] + [str(i)]  # all distinct
        instruction = "把这些词倒序：" if vocab is ZH else "Reverse the order of these words: "
        rows.append({"instruction": instruction + " ".join(words), "input": "", "output": " ".join(words[::-1])})
    path = folder / "reverse.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_config(model: Path, tmp_path: Path, *overrides: str):
    data = write_data(tmp_path) if not (tmp_path / "reverse.jsonl").exists() else tmp_path / "reverse.jsonl"
    base = [
        f"model.name={model}", f"data.datasets=[{{path: {data}}}]", "data.cutoff_len=64",
        f"train.output_dir={tmp_path / 'runs'}", "train.run_name=run", "train.max_steps=6", "train.batch_size=4",
        "train.logging_steps=1", "train.save_steps=2", "train.lr=2e-3", "train.scheduler=constant",
        "method.r=4", "method.dropout=0.0",
    ]
    return load_config(None, base + list(overrides))


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


class CaptureLogits(TrainerCallback):
    """Logits of the trained model on a fixed input, taken when training ends (before the final save)."""

    def __init__(self):
        self.logits = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=torch.arange(10, 30).reshape(1, -1)).logits.float()
        model.train(was_training)


def reload_final(final: Path, base: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if (final / "adapter_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, final)
    return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)


@torch.no_grad()
def fixed_logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=torch.arange(10, 30).reshape(1, -1)).logits.float()


# ------------------------------------------------------------------------------------------------ run folder
def test_lora_run_writes_the_documented_run_folder(tiny_llama, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoTokenizer

    result = train(make_config(tiny_llama, tmp_path))
    run = result.run_dir
    assert run == tmp_path / "runs" / "run" and result.final_dir == run / "final"
    for name in ("config.yaml", "run.json", "env.json", "data.json", "chat_template.jinja", "metrics.jsonl",
                 "loss.png"):
        assert (run / name).is_file(), name
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed" and status["method"] == "lora" and status["metrics"]["global_step"] == 6
    assert status["max_steps"] == 6 and status["last_checkpoint"] == "checkpoint-6" and status["final_dir"]
    assert "model_source" in status and status["model_source"] is None  # a plain folder; the default GGUF says Q4_1
    assert status["metrics"]["tokens_per_s"] > 0 and status["metrics"]["final_loss"] == losses(run)[-1]
    assert status["data_fingerprint"] == json.loads((run / "data.json").read_text())["fingerprint"]
    env = json.loads((run / "env.json").read_text())
    assert {"python", "torch", "transformers", "peft", "tunelab", "device"} <= set(env)
    assert load_config(run / "config.yaml").train.run_name == "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and "lr" in r and "elapsed_s" in r for r in steps)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]  # no debris
    assert (run / "final" / "adapter_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.chat_template == (run / "chat_template.jinja").read_text(encoding="utf-8")
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "memory estimate:" in out and "trainable params:" in out
    assert "step 6/6" in out and "tok/s" in out and "ETA" in out


def test_same_config_and_seed_give_the_same_losses(tiny_llama, tmp_path):
    common = ["train.max_steps=3", "method.dropout=0.1"]
    first = train(make_config(tiny_llama, tmp_path, "train.run_name=a", *common), echo=False)
    second = train(make_config(tiny_llama, tmp_path, "train.run_name=b", *common), echo=False)
    assert losses(first.run_dir) == losses(second.run_dir)
    other = train(make_config(tiny_llama, tmp_path, "train.run_name=c", "train.seed=7", *common), echo=False)
    assert losses(other.run_dir) != losses(first.run_dir)


def test_packing_gives_the_padded_loss(tiny_llama, tmp_path):
    common = ["train.max_steps=1", "train.group_by_length=false", "train.mixed_precision=no"]
    packed = train(make_config(tiny_llama, tmp_path, "train.run_name=p", "data.packing=true", *common), echo=False)
    padded = train(make_config(tiny_llama, tmp_path, "train.run_name=q", "data.packing=false", *common), echo=False)
    assert losses(packed.run_dir)[0] == pytest.approx(losses(padded.run_dir)[0], rel=1e-5)


def test_validation_and_early_stopping(tiny_llama, tmp_path):
    """A learning rate far too high makes the validation loss rise; patience 1 stops the run and keeps the best."""
    cfg = make_config(tiny_llama, tmp_path, "data.val_size=4", "train.eval_steps=1", "train.max_steps=8",
                      "train.early_stopping_patience=1", "train.lr=0.5", "train.max_grad_norm=0")
    result = train(cfg, echo=False)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert 2 <= len(evals) < 8 and result.metrics["global_step"] < 8  # stopped early
    assert evals[-1] > min(evals)
    state = json.loads((result.run_dir / "checkpoints" / f"checkpoint-{result.metrics['global_step']}" /
                        "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.parent == result.run_dir / "checkpoints" and best.is_dir()  # the best survived the rotation


def test_existing_run_needs_resume_or_a_new_name(tiny_llama, tmp_path):
    train(make_config(tiny_llama, tmp_path, "train.max_steps=2"), echo=False)
    with pytest.raises(TunelabError, match="--resume"):
        train(make_config(tiny_llama, tmp_path, "train.max_steps=2"), echo=False)


# ------------------------------------------------------------------------------------------------ guards
class PoisonWeights(TrainerCallback):
    """Turn one trainable weight into NaN after `step`, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path):
    cfg = make_config(tiny_llama, tmp_path, "train.max_steps=8")
    with pytest.raises(TunelabError) as e:
        train(cfg, callbacks=[PoisonWeights(step=3)], echo=False)
    run = tmp_path / "runs" / "run"
    assert "loss became nan at step 4" in str(e.value)
    assert str(run / "checkpoints" / "checkpoint-2") in str(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["checkpoint-2"]
    assert not (run / "final").exists()
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and status["last_good_checkpoint"].endswith("checkpoint-2")
    assert all(math.isfinite(x) for x in losses(run))


def test_memory_estimate_fails_early_and_scales(tiny_llama, tmp_path):
    from tunelab.training.memory import estimate_for_run

    cfg = make_config(tiny_llama, tmp_path, "train.max_memory_gb=0.01")
    with pytest.raises(TunelabError, match=r"(?s)memory estimate: .* GB \(weights .*exceeds train.max_memory_gb"):
        train(cfg, echo=False)
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made

    def total(*overrides, tokens=256):
        c = make_config(tiny_llama, tmp_path, *overrides)
        return estimate_for_run(c, tiny_llama, device="cpu", dtype=torch.float32, mixed_precision=None,
                                tokens_per_step=tokens)

    lora = total()
    assert total(tokens=1024).activations == pytest.approx(4 * lora.activations)
    assert total("method={name: full}").optimizer > 50 * lora.optimizer
    assert total("train.gradient_checkpointing=true").activations < lora.activations
    assert lora.trainable_params == 8192 and lora.total_params == 6373696 + 8192  # meta-device count, exact


def test_memory_estimate_matches_measured_runs():
    """SmolLM2-135M on this CPU. LoRA r=8 all-linear, fp32, 8 x 512 padded tokens: 12.4 GB peak RSS (pitfalls.md #7).
    The demo (LoRA r=16, bf16 autocast, packed, longest micro-batch 880 tokens): 4.5 GB peak RSS over 60 steps."""
    from transformers import AutoConfig

    from tunelab.training.memory import GB, ParameterBytes, StepShape, estimate_memory

    config = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
    padded = estimate_memory(config, ParameterBytes(2_442_240, 134_515_008 + 2_442_240, weight_bytes=4,
                                                    trainable_bytes=4), StepShape(tokens=8 * 512, act_bytes=4))
    assert 0.8 * 12.4 < padded.total / GB < 1.25 * 12.4
    demo = estimate_memory(config, ParameterBytes(4_884_480, 134_515_008 + 4_884_480, weight_bytes=4,
                                                  trainable_bytes=4), StepShape(tokens=880, act_bytes=4, autocast=True))
    assert 0.8 * 4.5 < demo.total / GB < 1.25 * 4.5


# ------------------------------------------------------------------------------------------------ methods
METHOD_OVERRIDES = {
    "lora": [],
    "dora": ["method.name=dora"],
    "full": ["method={name: full}", "train.lr=1e-4"],
    "freeze": ["method={name: freeze, trainable_layers: 1, trainable_modules: [lm_head]}", "train.lr=1e-4"],
    "prefix": ["method={name: prefix, num_virtual_tokens: 4, projection: true}", "data.packing=true"],
    "qlora": ["method.name=qlora"],
}


@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_every_method_trains_and_its_final_artifact_reloads(method, tiny_llama, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    capture = CaptureLogits()
    # no autocast: accelerate wraps the model's forward in it, which would also change the captured logits
    cfg = make_config(tiny_llama, tmp_path, "train.max_steps=3", "train.save_steps=100", "train.mixed_precision=no",
                      *METHOD_OVERRIDES[method])
    result = train(cfg, callbacks=[capture], echo=False)
    step_losses = losses(result.run_dir)
    assert len(step_losses) == 3 and all(math.isfinite(x) for x in step_losses)
    if method == "qlora":  # the 4-bit base reloads with the training kernel for an exact comparison
        from peft import PeftModel

        from tunelab.methods import method_load_kwargs
        from tunelab.methods.qlora import keep_cpu_weights_trainable
        from tunelab.models.load import load_model

        base = load_model(cfg.model, dtype=torch.float32, **method_load_kwargs(cfg.method, "cpu"))
        keep_cpu_weights_trainable(base)
        reloaded = PeftModel.from_pretrained(base, result.final_dir)
    else:
        reloaded = reload_final(result.final_dir, tiny_llama)
    torch.testing.assert_close(fixed_logits(reloaded), capture.logits, rtol=1e-4, atol=1e-4)
    base_logits = fixed_logits(reload_final(tiny_llama, tiny_llama))
    assert not torch.allclose(base_logits, capture.logits, atol=1e-5), "training changed nothing"
    if method in ("full", "freeze"):
        saved = json.loads((result.final_dir / "config.json").read_text())
        assert saved.get("use_cache", True) is True  # generation must not run without its KV cache


def test_prefix_trains_padded_even_when_packing_is_asked(tiny_llama, tmp_path):
    from tunelab.training.sft import uses_packing

    cfg = make_config(tiny_llama, tmp_path, *METHOD_OVERRIDES["prefix"])
    assert cfg.data.packing and not uses_packing(cfg)
    assert uses_packing(make_config(tiny_llama, tmp_path))


def test_impossible_combinations_fail_before_loading(tiny_llama, tmp_path):
    with pytest.raises(TunelabError, match="gradient_checkpointing"):
        train(make_config(tiny_llama, tmp_path, *METHOD_OVERRIDES["prefix"], "train.gradient_checkpointing=true"))
    with pytest.raises(TunelabError, match="fp16 needs a CUDA GPU"):
        train(make_config(tiny_llama, tmp_path, "train.mixed_precision=fp16", "model.device=cpu"))
    assert not (tmp_path / "runs").exists()


def test_init_from_starts_a_new_run_from_an_adapter(tiny_llama, tmp_path):
    first = train(make_config(tiny_llama, tmp_path, "train.run_name=first", "train.max_steps=3"), echo=False)
    capture = CaptureLogits()
    second = make_config(tiny_llama, tmp_path, "train.run_name=second", "train.max_steps=1", "train.lr=1e-9",
                         "train.mixed_precision=no",
                         f"method.init_from={first.final_dir}")
    train(second, callbacks=[capture], echo=False)
    torch.testing.assert_close(capture.logits, fixed_logits(reload_final(first.final_dir, tiny_llama)),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_train_prints_where_the_result_is_and_what_next(tiny_llama, tmp_path, capsys):
    from tunelab.cli.main import main

    cfg = make_config(tiny_llama, tmp_path, "train.max_steps=2")
    path = tmp_path / "cfg.yaml"
    from tunelab.config import dump_config

    path.write_text(dump_config(cfg), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "run"
    assert f"adapter: {run / 'final'}" in out
    assert f"tunelab chat {run}" in out and f"tunelab eval {run}" in out
    assert main(["train", str(path), "train.report_to=[nosuch]"]) == 2
    assert "unknown tracker 'nosuch'" in capsys.readouterr().err


class BreakWeights(TrainerCallback):
    """Every trainable weight becomes NaN at the end of `step`, before that step's checkpoint is saved: what a
    too-large update does (train.lr=1e30 on SmolLM2)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))


def checkpoint_loss(base: Path, checkpoint: Path, batch: dict) -> float:
    """Loss of the adapter saved in `checkpoint` (reloaded from disk onto the base model) on `batch`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), checkpoint)
    model.eval()
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


def test_nan_guard_names_the_checkpoint_whose_weights_give_a_finite_loss(tiny_llama, tmp_path):
    """The update of step 3 breaks the weights (as train.lr=1e30 does on SmolLM2) and checkpoint-3 saves them; the
    loss of step 4 is NaN. The guard must keep and name checkpoint-2, whose reloaded weights still give a finite
    loss, even with save_total_limit=1, and set checkpoint-3 aside so that --resume does not pick it."""
    from transformers import AutoTokenizer

    from tunelab.runs.rundir import latest_checkpoint

    cfg = make_config(tiny_llama, tmp_path, "train.save_steps=1", "train.save_total_limit=1", "train.max_steps=8")
    with pytest.raises(TunelabError) as e:
        train(cfg, callbacks=[BreakWeights(step=3)], echo=False)
    run = tmp_path / "runs" / "run"
    status = json.loads((run / "run.json").read_text())
    assert "loss became nan at step 4" in str(e.value)
    good = run / "checkpoints" / "checkpoint-2"
    assert status["last_good_checkpoint"] == str(good) and str(good) in str(e.value)
    assert status["last_checkpoint"] == "checkpoint-2"
    assert latest_checkpoint(run / "checkpoints") == good  # --resume continues from the good weights
    bad = run / "checkpoints" / "nonfinite-checkpoint-3"
    assert bad.is_dir() and "nonfinite-checkpoint-3" in str(e.value)

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer("Reverse the order of these words: apple river", return_tensors="pt").input_ids
    batch = {"input_ids": ids, "labels": ids}
    assert math.isfinite(checkpoint_loss(tiny_llama, good, batch))
    assert not math.isfinite(checkpoint_loss(tiny_llama, bad, batch))


CHILD = """
import json, signal, sys, time
from pathlib import Path
run = Path(sys.argv[1])
def stop(signum, frame):
    (run / "run.json").write_text(json.dumps({"status": "stopped"}))
    sys.exit(1)  # torchrun reports its workers' failure as a non-zero code
signal.signal(signal.SIGTERM, stop)
(run / "ready").write_text("1")
time.sleep(60)
"""
DRIVER = """
import os, sys
from pathlib import Path
from tunelab.cli.train import run_workers
sys.exit(run_workers([sys.executable, sys.argv[1], sys.argv[2]], dict(os.environ), Path(sys.argv[2])))
"""


def test_nproc_launcher_passes_sigterm_on_and_exits_130(tmp_path):
    """`tunelab train --nproc N` waits on torchrun: a SIGTERM to tunelab reaches the workers (which save and stop)
    and tunelab exits 130, not 143 with the workers left running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "child.py"), str(tmp_path)],
                            env={**os.environ})
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "stopped"
