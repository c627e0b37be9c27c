"""Alignment stages (dpo, orpo, simpo, kto, rm) on TRL through tunelab's recipe, on tiny models.

The preference data is a small TRL-shaped JSONL file read by tunelab's data stage (data/preference.py); the ids TRL
trains on are checked against tunelab's SFT encoder (prompt ids = the conversation rendered up to where the reply's
trained span starts, completion ids = exactly the tokens SFT trains on for that reply).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tunelab.config import load_config
from tunelab.errors import TunelabError

PAIRS = [  # (question, chosen: short and right, rejected: long-winded and wrong)
    ("What colour is the sky?", "Blue.", "Well, let me think about it for a while, it might be green or red."),
    ("How many legs has a cat?", "Four.", "Cats are animals and animals vary a great deal, perhaps seven?"),
    ("What is two plus two?", "Four.", "Arithmetic is a deep subject and the answer could be five."),
    ("天空是什么颜色？", "蓝色。", "嗯，让我想一想，这个问题很复杂，也许是绿色或者红色吧。"),
    ("Name a fruit.", "An apple.", "There are so many fruits in the world that naming one is hard: a chair."),
    ("What is the capital of France?", "Paris.", "France has many cities and towns, so maybe it is Berlin."),
    ("一周有几天？", "七天。", "这要看情况，不同的人有不同的看法，大概是十天左右吧。"),
    ("What do bees make?", "Honey.", "Bees are insects that do many things during the day, like cheese."),
]


# ------------------------------------------------------------------------------------------ data
def encode_reply(conv_messages, reply, template, tokenizer, cutoff_len):
    """(prompt ids, reply ids) with tunelab's encoder: the reply ids are the trained span of the last turn."""
    from tunelab.data.encode import encode_conversation
    from tunelab.data.types import Conversation, Message

    conv = Conversation([*conv_messages, Message("assistant", reply)])
    encoded = encode_conversation(conv, template, tokenizer, cutoff_len, "last_assistant")
    first = next(i for i, label in enumerate(encoded["labels"]) if label != -100)
    return encoded["input_ids"][:first], encoded["input_ids"][first:]


def make_config(model: Path, tmp_path: Path, stage: str, *overrides: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": q, "chosen": c, "rejected": r}, ensure_ascii=False) for q, c, r in PAIRS]
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")  # TRL's explicit-prompt shape
    base = [
        f"stage={stage}", f"model.name={model}", f"data.datasets=[{{path: {tmp_path / 'prefs.jsonl'}}}]",
        "data.cutoff_len=64", f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'runs'}", f"train.run_name={stage}",
        "train.max_steps=6", "train.batch_size=4", "train.logging_steps=1", "train.save_steps=3",
        "train.lr=5e-3", "train.scheduler=constant", "method.r=8", "method.dropout=0.0", "train.report_to=[]",
    ]
    return load_config(None, base + list(overrides))


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def run_stage(cfg, **kwargs):
    from tunelab.training.stages import get_stage

    return get_stage(cfg.stage).run(cfg, echo=False, **kwargs)


# ----------------------------------------------------------------------------------------------- config
def test_stage_and_align_fields_are_validated(tiny_llama, tmp_path):
    with pytest.raises(Exception, match="unknown stage 'dpoo'.*known stages: dpo, kto, orpo, rm, sft, simpo"):
        make_config(tiny_llama, tmp_path, "dpoo")
    with pytest.raises(Exception, match="bta"):
        make_config(tiny_llama, tmp_path, "dpo", "align.bta=0.2")
    with pytest.raises(Exception, match="loss_type"):
        make_config(tiny_llama, tmp_path, "dpo", "align.loss_type=sigmoidd")
    cfg = make_config(tiny_llama, tmp_path, "dpo", "align.beta=0.2", "align.loss_type=ipo")
    assert (cfg.align.beta, cfg.align.loss_type) == (0.2, "ipo")


def test_stage_registry_lists_each_stage_with_its_data_kind():
    from tunelab.training.stages import get_stage, known_stages

    assert known_stages() == ["dpo", "kto", "orpo", "rm", "sft", "simpo"]
    assert get_stage("dpo").data == "paired" and get_stage("dpo").needs_reference
    assert get_stage("kto").data == "unpaired"
    assert not get_stage("orpo").needs_reference and not get_stage("simpo").needs_reference
    assert "rewards/accuracies" in get_stage("dpo").metric_keys
    with pytest.raises(TunelabError, match="unknown stage 'ppo'; known: dpo, kto, orpo, rm, sft, simpo"):
        get_stage("ppo")


def test_combinations_refused_before_loading(tiny_llama, tmp_path):
    with pytest.raises(TunelabError, match="batch_size must be at least 2"):
        run_stage(make_config(tiny_llama, tmp_path, "kto", "train.batch_size=1"))
    with pytest.raises(TunelabError, match="dpo only"):
        run_stage(make_config(tiny_llama, tmp_path, "orpo", "align.loss_type=ipo"))
    with pytest.raises(TunelabError, match="prefix is not supported"):
        run_stage(make_config(tiny_llama, tmp_path, "dpo", "method={name: prefix}"))


# ------------------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("stage,extra", [
    ("dpo", ()), ("dpo", ("align.loss_type=ipo", "train.max_steps=4")),
    ("dpo", ("align.loss_type=hinge", "train.max_steps=4")),
    ("dpo", ("align.loss_type=robust", "align.label_smoothing=0.1", "train.max_steps=4")), ("orpo", ()),
    ("simpo", ()), ("kto", ()), ("rm", ()),
])
def test_each_stage_learns_the_toy_preferences(tiny_llama, tmp_path, stage, extra):
    cfg = make_config(tiny_llama, tmp_path, stage, *extra)
    result = run_stage(cfg)
    logged = records(result.run_dir)
    losses = [r["loss"] for r in logged]
    assert len(losses) == cfg.train.max_steps and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    assert logged[-1]["rewards/margins"] > 0  # the chosen replies now score above the rejected ones
    assert logged[-1]["tokens_per_s"] > 0  # every stage counts its tokens (orpo/simpo have no input_ids)
    if stage != "kto":  # KTO has no pairs, so no pairwise accuracy
        assert logged[-1]["rewards/accuracies"] >= 0.5
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["stage"] == stage
    assert "rewards/margins" in run["metrics"]
    assert (result.final_dir / "adapter_config.json").is_file()
    assert not (result.final_dir / "ref").exists()  # only the trained adapter is saved


# -------------------------------------------------------------------------------------------- the reference
@pytest.fixture()
def captured(monkeypatch):
    """The trainer each run builds, kept for inspection after training."""
    from tunelab.training import align_trainers

    built = []
    original = align_trainers.build_align_trainer

    def build(setup):
        built.append(original(setup))
        return built[-1]

    monkeypatch.setattr(align_trainers, "build_align_trainer", build)
    return built


def sequence_logps(model, rows, collator) -> torch.Tensor:
    """Summed log-probs of the chosen then rejected replies, computed independently of TRL."""
    batch = collator(rows)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (per_token * mask).sum(-1)


def reference_logps(trainer, rows) -> torch.Tensor:
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(rows))
    return torch.cat([chosen, rejected]).float()


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_data_reaches_trl_as_tunelab_encoded_it(tiny_llama, tmp_path, captured):
    """TRL's own tokenization (its chat template) is skipped: the ids TRL trains on are tunelab's SFT encoding."""
    from tunelab.data.templates import resolve_template
    from tunelab.models.load import load_tokenizer

    cfg = make_config(tiny_llama, tmp_path, "dpo", "train.max_steps=1")
    run_stage(cfg)
    trainer = captured[0]
    tokenizer = load_tokenizer(cfg.model)
    template = resolve_template("auto", tokenizer)
    from tunelab.data.types import Message

    prompt, chosen = encode_reply([Message("user", PAIRS[0][0])], PAIRS[0][1], template, tokenizer, 64)
    row = next(r for r in trainer.train_dataset if r["prompt_ids"] == prompt)
    assert row["chosen_ids"] == chosen
    batch = trainer.data_collator([row])
    assert batch["input_ids"][0, : len(prompt) + len(chosen)].tolist() == prompt + chosen
    assert tokenizer.decode(chosen).startswith("Blue.")


def test_reference_is_the_base_with_the_adapter_disabled(tiny_llama, tmp_path, captured):
    cfg = make_config(tiny_llama, tmp_path, "dpo", "train.max_steps=3")
    result = run_stage(cfg)
    trainer = captured[0]
    assert json.loads((result.run_dir / "run.json").read_text())["reference"] == "disabled-adapter"
    assert trainer.ref_model is None  # no second model
    assert set(trainer.model.peft_config) == {"default"}  # and no copy of the adapter either
    rows = [trainer.train_dataset[i] for i in range(3)]
    expected = sequence_logps(load_base(tiny_llama), rows, trainer.data_collator)
    assert torch.allclose(reference_logps(trainer, rows), expected, atol=2e-2, rtol=1e-3)
    trained = sequence_logps(trainer.model, rows, trainer.data_collator)
    assert not torch.allclose(trained, expected, atol=1e-2)  # the policy itself moved


def test_frozen_base_weights_stay_frozen(tiny_llama, tmp_path, captured):
    run_stage(make_config(tiny_llama, tmp_path, "dpo", "train.max_steps=2", "train.mixed_precision=no"))
    model = captured[0].model
    base = dict(load_base(tiny_llama).named_parameters())
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param.detach().float(), base[key].detach().float()), name
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and any(p.abs().sum() > 0 for p in b)  # the adapter did train (B starts at 0)


@pytest.mark.parametrize("method", ["freeze", "full", "dora"])
def test_methods_compose_with_dpo(method, tiny_llama, tmp_path, captured):
    section = {"freeze": "method={name: freeze, trainable_layers: 1}", "full": "method={name: full}",
               "dora": "method={name: dora, r: 4, dropout: 0.0}"}[method]
    result = run_stage(make_config(tiny_llama, tmp_path, "dpo", "train.max_steps=2", "train.mixed_precision=no",
                                   section))
    trainer = captured[0]
    base = dict(load_base(tiny_llama).named_parameters())
    if method == "dora":
        assert trainer.ref_model is None and (result.final_dir / "adapter_config.json").is_file()
        return
    assert trainer.ref_model is not None  # full/freeze: the reference is a frozen second copy
    assert json.loads((result.run_dir / "run.json").read_text())["reference"] == "separate-model"
    for name, param in trainer.ref_model.named_parameters():
        assert torch.equal(param, base[name]) and not param.requires_grad
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), base[n])}
    if method == "freeze":
        assert changed and all(".layers.1." in n for n in changed), changed  # only the last layer trained
    else:
        assert any("layers.0" in n for n in changed)
    assert (result.final_dir / "model.safetensors").is_file()


def write_sft_data(folder: Path) -> Path:
    rows = [{"instruction": q, "input": "", "output": c} for q, c, _ in PAIRS]
    path = folder / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


class ProbeReference(TrainerCallback):
    """Reference log-probs of the first rows, computed by the running trainer after its last step."""

    def __init__(self, built: list):
        self.built, self.rows, self.logps = built, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            trainer = self.built[0]
            self.rows = [trainer.train_dataset[i] for i in range(3)]
            self.logps = reference_logps(trainer, self.rows)


def test_init_from_an_sft_run_keeps_the_sft_model_as_reference(tiny_llama, tmp_path, captured):
    from peft import PeftModel

    from tunelab.training.sft import train

    sft_cfg = load_config(None, [
        f"model.name={tiny_llama}", f"data.datasets=[{{path: {write_sft_data(tmp_path)}}}]", "data.cutoff_len=64",
        f"train.output_dir={tmp_path / 'runs'}", "train.run_name=sft", "train.max_steps=3", "train.batch_size=4",
        "train.lr=5e-3", "method.r=8", "method.dropout=0.0", "train.report_to=[]"])
    sft = train(sft_cfg, echo=False)
    probe = ProbeReference(captured)
    cfg = make_config(tiny_llama, tmp_path, "dpo", "train.max_steps=3", f"method.init_from={sft.run_dir}")
    result = run_stage(cfg, callbacks=[probe])
    trainer = captured[0]
    sft_model = PeftModel.from_pretrained(load_base(tiny_llama), str(sft.final_dir))
    expected = sequence_logps(sft_model, probe.rows, trainer.data_collator)
    base = sequence_logps(load_base(tiny_llama), probe.rows, trainer.data_collator)
    assert not torch.allclose(expected, base, atol=1e-1)  # the SFT adapter matters...
    assert torch.allclose(probe.logps, expected, atol=2e-2, rtol=1e-3)  # ...and the reference IS the SFT model
    trained = PeftModel.from_pretrained(load_base(tiny_llama), str(result.final_dir))
    assert not torch.allclose(sequence_logps(trained, probe.rows, trainer.data_collator), expected, atol=1e-3)
    assert "ref" not in trainer.accelerator.unwrap_model(trainer.model).peft_config  # dropped before final/
    assert not (result.final_dir / "ref").exists()
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["init_from"] == str(sft.run_dir) and run["reference"] == "frozen-adapter"


# ------------------------------------------------------------------------------------------ runs and guards
class InterruptAt(TrainerCallback):
    """Ctrl-C (SIGINT to this process) during step `step`, as a user at the terminal would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_with_a_checkpoint_and_resume_gives_the_same_curve(tiny_llama, tmp_path):
    uninterrupted = records(run_stage(make_config(tiny_llama, tmp_path / "a", "dpo", "train.max_steps=4",
                                                  "train.save_steps=2")).run_dir)
    cfg = make_config(tiny_llama, tmp_path / "b", "dpo", "train.max_steps=4", "train.save_steps=2")
    stopped = run_stage(cfg, callbacks=[InterruptAt(2)])
    assert stopped.status == "stopped" and (stopped.run_dir / "checkpoints" / "checkpoint-2").is_dir()
    resumed = run_stage(cfg, resume=True)
    assert resumed.status == "completed"
    curve = records(resumed.run_dir)
    assert [r["step"] for r in curve] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margins", "rewards/chosen"):
        assert [r[key] for r in curve] == pytest.approx([r[key] for r in uninterrupted], rel=1e-4, abs=1e-6), key


class PoisonAdapter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))


def test_nan_guard_stops_an_alignment_run(tiny_llama, tmp_path):
    cfg = make_config(tiny_llama, tmp_path, "dpo", "train.max_steps=5", "train.save_steps=1")
    with pytest.raises(TunelabError, match="loss became nan at step 3"):
        run_stage(cfg, callbacks=[PoisonAdapter(step=2)])
    run = json.loads((tmp_path / "runs" / "dpo" / "run.json").read_text())
    assert run["status"] == "failed" and run["last_good_checkpoint"].endswith("checkpoint-1")


def test_memory_estimate_counts_the_reference_forward(tiny_llama, tmp_path, capsys):
    from tunelab.data.preference import prepare_preference_data
    from tunelab.training.align import AlignRun, check_alignment_memory, reference_model_needed
    from tunelab.training.sft import Precision
    from tunelab.training.stages import get_stage

    data_cfg = make_config(tiny_llama, tmp_path, "dpo").data

    class Data:
        train = prepare_preference_data(data_cfg, *_template(tiny_llama), paired=True).train.rename_columns(
            {"prompt_input_ids": "prompt_ids", "chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"})

    def estimate(stage, *extra):
        cfg = make_config(tiny_llama, tmp_path, stage, *extra)
        check_alignment_memory(AlignRun(cfg, get_stage(stage), tiny_llama, "cpu", Precision(torch.float32, None)), Data)
        return capsys.readouterr().out

    assert "reference" in estimate("dpo") and "reference" not in estimate("orpo")
    assert "reference" not in estimate("dpo", "align.reference_free=true")
    lora = float(estimate("dpo").split("reference ")[1].split(" ")[0].rstrip(";"))
    full = float(estimate("dpo", "method={name: full}").split("reference ")[1].split(" ")[0].rstrip(";"))
    assert full > lora  # full fine-tuning keeps a second copy of the weights for the reference
    assert reference_model_needed(make_config(tiny_llama, tmp_path, "dpo", "method={name: full}"))
    assert not reference_model_needed(make_config(tiny_llama, tmp_path, "dpo", "method={name: full}",
                                                  "align.precompute_ref_log_probs=true"))
    with pytest.raises(TunelabError, match="max_memory_gb"):
        estimate("dpo", "train.max_memory_gb=0.01")


def _template(model_dir: Path):
    from tunelab.config.schema import ModelConfig
    from tunelab.data.templates import resolve_template
    from tunelab.models.load import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name=str(model_dir)))
    return tokenizer, resolve_template("auto", tokenizer)


def test_reference_free_dpo_needs_no_reference(tiny_llama, tmp_path, captured):
    result = run_stage(make_config(tiny_llama, tmp_path, "dpo", "align.reference_free=true", "train.max_steps=2"))
    trainer = captured[0]
    assert trainer.ref_model is None and trainer.train_dataset["ref_chosen_logps"] == [0.0] * len(PAIRS)
    chosen = records(result.run_dir)[0]
    assert chosen["rewards/chosen"] == pytest.approx(0.1 * chosen["logps/chosen"], rel=1e-4)  # beta * policy logp


def test_cli_train_dispatches_on_the_stage(tiny_llama, tmp_path, capsys):
    import yaml

    from tunelab.cli.main import main

    cfg = make_config(tiny_llama, tmp_path, "orpo", "train.max_steps=2")
    path = tmp_path / "orpo.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "reward_acc" in out and "training done: 2 steps" in out
    assert json.loads((tmp_path / "runs" / "orpo" / "run.json").read_text())["stage"] == "orpo"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "orpo" / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/rewards/accuracies", "train/rewards/margins", "train/loss"} <= tags, tags


def test_completion_only_log_probs_give_the_same_curve(tiny_llama, tmp_path):
    """train.sparse_logits: TRL's fused lm_head skips prompt and padding positions on CPU too, same losses."""
    import trl.trainer.utils as trl_utils

    from tunelab.patches.trl_logprobs import completion_only_log_probs

    with completion_only_log_probs(True):
        assert trl_utils._use_triton(torch.device("cpu"))
    assert not trl_utils._use_triton(torch.device("cpu"))  # restored after the loss call
    curves = {}
    for sparse in ("true", "false"):
        cfg = make_config(tiny_llama, tmp_path / sparse, "dpo", "train.max_steps=3", f"train.sparse_logits={sparse}",
                          "train.mixed_precision=no")
        curves[sparse] = records(run_stage(cfg).run_dir)
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert [r[key] for r in curves["true"]] == pytest.approx([r[key] for r in curves["false"]], rel=1e-4,
                                                                 abs=1e-5), key


@pytest.mark.parametrize("stage,method", [
    ("rm", "freeze"), ("rm", "full"), ("rm", "dora"), ("kto", "full"), ("orpo", "freeze"), ("simpo", "full"),
    ("dpo", "qlora"), ("kto", "qlora"), ("rm", "qlora"),
])
def test_every_stage_composes_with_the_methods(stage, method, tiny_llama, tmp_path, captured):
    section = {"freeze": "method={name: freeze, trainable_layers: 1}", "full": "method={name: full}",
               "dora": "method={name: dora, r: 4, dropout: 0.0}", "qlora": "method={name: qlora, r: 4, dropout: 0.0}"}
    if method == "qlora":
        from tunelab.errors import MethodUnavailableError
        from tunelab.methods import check_method_available

        try:
            check_method_available(make_config(tiny_llama, tmp_path, stage, section[method]).method, "cpu")
        except MethodUnavailableError as e:
            pytest.skip(str(e))
    result = run_stage(make_config(tiny_llama, tmp_path, stage, "train.max_steps=2", section[method]))
    assert result.status == "completed"
    assert [r["step"] for r in records(result.run_dir)] == [1, 2]
    model = captured[0].accelerator.unwrap_model(captured[0].model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if stage == "rm":
        assert any("score" in n for n in trainable)  # the new value head always trains
    if method == "freeze":
        assert all(".layers.1." in n or "score" in n for n in trainable), trainable
    needs_copy = stage in ("dpo", "kto") and method in ("full", "freeze")
    assert (getattr(captured[0], "ref_model", None) is not None) == needs_copy


def test_reward_model_reloads_from_final_with_its_value_head(tiny_llama, tmp_path, captured):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = run_stage(make_config(tiny_llama, tmp_path, "rm"))
    trainer = captured[0]
    config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    live = trainer.accelerator.unwrap_model(trainer.model).eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = trainer.processing_class.pad_token_id
    reloaded = PeftModel.from_pretrained(base, str(result.final_dir)).eval()
    with torch.no_grad():
        expected = live(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(scores, expected, atol=2e-2)  # the live base was bf16 (train.bf16_frozen_base)
    chosen, rejected = scores.squeeze(-1).chunk(2)
    assert (chosen > rejected).float().mean() >= 0.75  # it learned to prefer the chosen replies


# ------------------------------------------------------------------------------------------- after alignment
def test_an_aligned_run_exports_chats_and_serves_like_an_sft_run(tiny_llama, tmp_path):
    """The DPO run's adapter merges (merged == unmerged answers, the training template carried) and an
    OpenAI-compatible server on that run answers like the run's own engine."""
    import openai
    from test_serve_support import live_server

    from tunelab.config.schema import ExportConfig, ServeConfig
    from tunelab.export.pipeline import export_model
    from tunelab.inference.engine import GenerationParams
    from tunelab.inference.hf import load_engine
    from tunelab.serving.app import create_app

    result = run_stage(make_config(tiny_llama, tmp_path, "dpo", "train.max_steps=2"))
    greedy = GenerationParams(max_new_tokens=8)
    question = [{"role": "user", "content": PAIRS[0][0]}]
    run_engine = load_engine(str(result.run_dir))
    expected = run_engine.generate([run_engine.render(question)], greedy)[0].text
    exported = export_model(str(result.run_dir), ExportConfig(), out=tmp_path / "export")
    merged = load_engine(str(exported.out_dir))
    assert merged.render(question) == run_engine.render(question)  # the same template, carried
    assert merged.generate([merged.render(question)], greedy)[0].text == expected
    with live_server(create_app(run_engine, ServeConfig(model_name="dpo", max_new_tokens=8))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="dpo", messages=question, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected


def test_sft_weight_adds_the_chosen_replies_nll_to_the_dpo_loss(tiny_llama, tmp_path):
    """RPO: loss = DPO + w * mean NLL over the chosen tokens. At step 1 the policy is the reference (LoRA B = 0), so
    the sigmoid DPO term is exactly log 2; the NLL is computed here from the base model, independently of TRL."""
    import math

    from tunelab.data.templates import resolve_template
    from tunelab.data.types import Message
    from tunelab.models.load import load_tokenizer

    cfg = make_config(tiny_llama, tmp_path, "dpo", "align.sft_weight=0.5", "train.max_steps=1",
                      f"train.batch_size={len(PAIRS)}", "train.mixed_precision=no")
    loss = records(run_stage(cfg).run_dir)[0]["loss"]
    tokenizer = load_tokenizer(cfg.model)
    template, base = resolve_template("auto", tokenizer), load_base(tiny_llama).eval()
    total, count = 0.0, 0
    for question, chosen, _ in PAIRS:
        prompt, reply = encode_reply([Message("user", question)], chosen, template, tokenizer, 64)
        with torch.no_grad():
            logits = base(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1].float()
        total -= torch.log_softmax(logits, -1).gather(-1, torch.tensor(reply)[:, None]).sum().item()
        count += len(reply)
    assert loss == pytest.approx(math.log(2) + 0.5 * total / count, rel=2e-3)
    assert make_config(tiny_llama, tmp_path, "dpo").align.sft_weight == 0.0  # off unless asked for


def test_two_cpu_processes_follow_the_one_process_dpo_curve(tiny_llama, tmp_path):
    """`tunelab train --nproc 2` (torchrun, gloo) on a dpo stage: two processes of 2 pairs each follow one process
    of 4 pairs, step for step (the same global batches, gradients averaged across the two)."""
    from test_train_resume import train_in_two_processes

    common = ["train.max_steps=3", "train.mixed_precision=no", "train.save_steps=3"]
    one = run_stage(make_config(tiny_llama, tmp_path, "dpo", "train.run_name=one", *common))
    two, _ = train_in_two_processes(make_config(tiny_llama, tmp_path, "dpo", "train.run_name=two",
                                                "train.batch_size=2", *common), tmp_path)
    assert [r["loss"] for r in records(two)] == pytest.approx([r["loss"] for r in records(one.run_dir)], rel=1e-4)
    assert (two / "final" / "adapter_config.json").is_file()
