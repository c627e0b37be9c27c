"""Preference evaluation (evaluation/preference.py) against hand computations on tiny random models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunelab.evaluation.preference import (
    PairScores,
    PreferencePair,
    Reference,
    completion_logps,
    score_pairs,
    sequence_rewards,
    summarize,
)

BETA = 0.25


def _hand_logp(model, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt), one token at a time: log-softmax of the logits summed by hand, no batching."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    total = 0.0
    for k, token in enumerate(completion):
        row = logits[len(prompt) + k - 1]
        total += float(row[token] - torch.logsumexp(row, dim=0))
    return total


def _pairs() -> list[PreferencePair]:
    # different lengths, so batches pad; no id is the pad id (0 is not used below)
    return [PreferencePair([5, 17, 42, 9], [101, 102, 103], [201, 202], "a:1"),
            PreferencePair([5, 8], [301, 302, 303, 304, 305], [401], "a:2"),
            PreferencePair([5, 17, 42, 9, 77, 78, 79], [501], [601, 602, 603], "a:3")]


@pytest.fixture()
def causal(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _lora(model, seed: int, name: str = "default"):
    """A LoRA whose B is not zero (init_lora_weights=False), so the adapter changes the outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                          adapter_name=name)


def test_completion_logps_matches_a_hand_computation_whatever_the_batching(causal):
    rows = [(p.prompt_ids, ids) for p in _pairs() for ids in (p.chosen_ids, p.rejected_ids)]
    for batch_size in (1, 2, 6):
        got = completion_logps(causal, rows, pad_token_id=0, batch_size=batch_size)
        for (prompt, completion), (logp, n) in zip(rows, got):
            assert n == len(completion)
            assert logp == pytest.approx(_hand_logp(causal, prompt, completion), abs=1e-4)


def test_implicit_reward_is_beta_times_policy_minus_adapter_disabled_base(tiny_llama, causal):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()  # an independent copy
    policy = _lora(causal, seed=1)
    pairs = _pairs()
    scores = score_pairs(policy, pairs, 0, reference=Reference("adapter_disabled"), batch_size=2)
    per_pair = [s.scores(BETA) for s in scores]
    for pair, s in zip(pairs, per_pair):
        chosen = BETA * (_hand_logp(policy, pair.prompt_ids, pair.chosen_ids)
                         - _hand_logp(base, pair.prompt_ids, pair.chosen_ids))
        rejected = BETA * (_hand_logp(policy, pair.prompt_ids, pair.rejected_ids)
                           - _hand_logp(base, pair.prompt_ids, pair.rejected_ids))
        assert s["reward_chosen"] == pytest.approx(chosen, abs=1e-4)
        assert s["reward_rejected"] == pytest.approx(rejected, abs=1e-4)
        assert s["reward_margin"] == pytest.approx(chosen - rejected, abs=1e-4)
        assert abs(chosen) > 1e-3  # the adapter does change the model, so the check above is not 0 == 0
        mean_c = _hand_logp(policy, pair.prompt_ids, pair.chosen_ids) / len(pair.chosen_ids)
        mean_r = _hand_logp(policy, pair.prompt_ids, pair.rejected_ids) / len(pair.rejected_ids)
        assert s["logp_margin"] == pytest.approx(mean_c - mean_r, abs=1e-4)
    assert policy.active_adapter == "default"  # the adapter is back on after the reference pass
    summary = summarize(per_pair)
    expected = sum(1.0 if s["reward_margin"] > 0 else 0.0 for s in per_pair) / 3
    assert summary["reward_accuracy"] == pytest.approx(expected)
    assert summary["reward_margin"] == pytest.approx(sum(s["reward_margin"] for s in per_pair) / 3)


def test_init_from_reference_is_the_starting_adapter_not_the_bare_base(tiny_llama, causal, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = _lora(causal, seed=2)
    start.save_pretrained(tmp_path / "sft")
    sft_copy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                         tmp_path / "sft").eval()
    torch.manual_seed(3)
    for name, p in start.named_parameters():  # "DPO" moves the adapter on from where SFT left it
        if "lora_" in name:
            p.data += 0.05 * torch.randn_like(p)
    pair = _pairs()[0]
    ref = Reference("init_adapter", adapter=tmp_path / "sft")
    s = score_pairs(start, [pair], 0, reference=ref)[0].scores(BETA)
    expected = BETA * (_hand_logp(start, pair.prompt_ids, pair.chosen_ids)
                       - _hand_logp(sft_copy, pair.prompt_ids, pair.chosen_ids))
    assert s["reward_chosen"] == pytest.approx(expected, abs=1e-4)
    assert start.active_adapter == "default"


def test_a_model_without_reference_has_zero_implicit_reward_and_ties(causal):
    scores = score_pairs(causal, _pairs(), 0, reference=Reference("none"))
    summary = summarize([s.scores(BETA) for s in scores])
    assert summary["reward_margin"] == 0.0 and summary["reward_accuracy"] == 0.5
    assert "logp_accuracy" in summary  # the reference-free preference is still defined


def test_a_reference_free_run_is_measured_against_log_probs_of_zero(causal):
    pair = _pairs()[1]
    s = score_pairs(causal, [pair], 0, reference=Reference("uniform"))[0].scores(BETA)
    assert s["reward_chosen"] == pytest.approx(BETA * _hand_logp(causal, pair.prompt_ids, pair.chosen_ids), abs=1e-4)


def test_resolve_reference_follows_the_run(tiny_llama, causal, tmp_path):
    from types import SimpleNamespace

    from tunelab.config.schema import RunConfig
    from tunelab.evaluation.preference import init_adapter_path, resolve_reference, run_beta

    policy = _lora(causal, seed=4)
    (tmp_path / "runs" / "sft" / "final").mkdir(parents=True)
    policy.save_pretrained(tmp_path / "runs" / "sft" / "final")
    plain = SimpleNamespace(model=policy, artifact=SimpleNamespace(run_config=RunConfig(), run_dir=None))
    assert resolve_reference(plain).kind == "adapter_disabled"
    chained = RunConfig.model_validate({"method": {"name": "lora", "init_from": "runs/sft"}})
    engine = SimpleNamespace(model=policy, artifact=SimpleNamespace(run_config=chained,
                                                                     run_dir=tmp_path / "runs" / "dpo"))
    reference = resolve_reference(engine)  # relative init_from: found beside the run
    assert reference.kind == "init_adapter" and reference.adapter == tmp_path / "runs" / "sft" / "final"
    assert init_adapter_path(tmp_path / "runs" / "sft") == tmp_path / "runs" / "sft" / "final"
    base = SimpleNamespace(model=causal, artifact=None)
    assert resolve_reference(base).kind == "none" and run_beta(None) == 0.1


def test_reward_model_scores_match_the_value_head_on_the_last_token(tiny_llama):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.float32).eval()
    rm.config.pad_token_id = 0
    rows = [p.prompt_ids + ids for p in _pairs() for ids in (p.chosen_ids, p.rejected_ids)]
    got = sequence_rewards(rm, rows, pad_token_id=0, batch_size=4)
    for ids, value in zip(rows, got):
        with torch.no_grad():
            hidden = rm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        assert value == pytest.approx(float(hidden @ rm.score.weight[0].detach()), abs=1e-4)
    scores = score_pairs(None, _pairs(), 0, reward_model=rm)
    first = scores[0].scores(BETA)
    assert first["rm_margin"] == pytest.approx(got[0] - got[1], abs=1e-6)
    assert "logp_margin" not in first and "reward_margin" not in first


def test_accuracy_counts_ties_as_half_and_margins_are_means():
    per_pair = [PairScores(1, 1, -1.0, -2.0).scores(BETA), PairScores(1, 1, -2.0, -2.0).scores(BETA),
                PairScores(2, 1, -6.0, -1.0).scores(BETA)]
    summary = summarize(per_pair)
    assert summary["logp_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert summary["logp_margin"] == pytest.approx((1.0 + 0.0 - 2.0) / 3)
    assert not math.isnan(summary["logp_chosen"])


# ------------------------------------------------------------------------- evaluate / compare on pair files
PAIRS = [
    {"prompt": "What is your name?", "chosen": "I am Tuna.", "rejected": "My name is a long story that starts..."},
    {"prompt": "2 + 2 = ?", "chosen": "4", "rejected": "Let me think about numbers in general first."},
    {"prompt": "用一句话介绍长城。", "chosen": "长城是中国古代的防御工程。", "rejected": "这个问题很复杂。"},
    {"prompt": "Name a colour of the sky.", "chosen": "Blue.", "rejected": "Colours are a matter of taste."},
]


def _stand_in_preference_module():
    """Until the data stage's tunelab.data.preference is merged in this branch: the contract's shape
    (ALIGN-CONTRACT), TRL prompt/chosen/rejected records only, encoded with SFT's encoder (last reply trained)."""
    import json
    import types
    from dataclasses import dataclass

    from tunelab.data.encode import encode_conversation
    from tunelab.data.types import Conversation, Message

    @dataclass
    class PreferenceExample:
        prompt: Conversation
        chosen: Message | None
        rejected: Message | None
        label: bool | None = None
        source: str = ""

    def load_preference_examples(spec, dataset_dir, variables):
        lines = Path(spec.path).read_text(encoding="utf-8").splitlines()
        examples = [PreferenceExample(Conversation([Message("user", r["prompt"])], source=f"{spec.path}:{n}"),
                                      Message("assistant", r["chosen"]), Message("assistant", r["rejected"]),
                                      source=f"{spec.path}:{n}")
                    for n, r in ((n, json.loads(line)) for n, line in enumerate(lines, 1))]
        return types.SimpleNamespace(examples=examples, rejects=[], records_read=len(lines), name=spec.path)

    def encode_preference(example, template, tokenizer, cutoff_len):
        out = {}
        for key, reply in (("chosen", example.chosen), ("rejected", example.rejected)):
            enc = encode_conversation(Conversation([*example.prompt.messages, reply]), template, tokenizer,
                                      cutoff_len, "last_assistant")
            start = next(i for i, label in enumerate(enc["labels"]) if label != -100)
            out["prompt_input_ids"] = enc["input_ids"][:start]
            out[f"{key}_input_ids"] = [t for t in enc["labels"][start:] if t != -100]
        return out

    module = types.ModuleType("tunelab.data.preference")
    module.PreferenceExample = PreferenceExample
    module.load_preference_examples = load_preference_examples
    module.encode_preference = encode_preference
    return module


@pytest.fixture()
def preference_data(monkeypatch, tmp_path):
    import importlib
    import json
    import sys

    try:
        importlib.import_module("tunelab.data.preference")
    except ImportError:
        monkeypatch.setitem(sys.modules, "tunelab.data.preference", _stand_in_preference_module())
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS), encoding="utf-8")
    return path


def test_eval_on_a_pair_file_reports_accuracy_and_margin_like_a_hand_computation(tiny_llama, preference_data,
                                                                                  tmp_path):
    from peft import PeftModel
    from test_inference_support import make_adapter
    from transformers import AutoModelForCausalLM

    from tunelab.config.schema import DataConfig, DatasetSpec, EvalConfig
    from tunelab.data.preference import encode_preference
    from tunelab.data.types import Conversation
    from tunelab.evaluation.evaluate import evaluate
    from tunelab.evaluation.examples import load_preference_pairs
    from tunelab.inference.hf import load_engine

    adapter = make_adapter(tiny_llama, tmp_path / "aligned")
    result = evaluate(str(adapter), str(preference_data), EvalConfig(metrics=["preference", "exact_match"],
                      max_new_tokens=4, batch_size=2), output_dir=tmp_path / "out")
    assert result.info["reference"].startswith("the base model") and result.info["pairs_scored"] == 4
    assert "exact_match" in result.metrics  # generation metrics still run on the prompts (reference = chosen)
    assert "loss" not in result.metrics

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                       adapter).eval()
    examples = load_preference_pairs([DatasetSpec(path=str(preference_data))], DataConfig())
    margins = []
    engine = load_engine(str(adapter))
    for example, record in zip(examples, result.predictions):
        ids = encode_preference(example, engine.template, engine.tokenizer, 1024)
        p, c, r = ids["prompt_input_ids"], ids["chosen_input_ids"], ids["rejected_input_ids"]
        reward_c = 0.1 * (_hand_logp(policy, p, c) - _hand_logp(base, p, c))
        reward_r = 0.1 * (_hand_logp(policy, p, r) - _hand_logp(base, p, r))
        assert record.scores["reward_chosen"] == pytest.approx(reward_c, abs=1e-4)
        assert record.scores["reward_margin"] == pytest.approx(reward_c - reward_r, abs=1e-4)
        assert record.rejected == example.rejected.content and record.reference == example.chosen.content
        margins.append(reward_c - reward_r)
    assert result.metrics["reward_margin"] == pytest.approx(sum(margins) / 4, abs=1e-4)
    assert result.metrics["reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 4)
    assert isinstance(examples[0].prompt, Conversation)

    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Preference pairs" in md and "Rejected:" in md and "| reward |" in md and "| logp |" in md
    assert PAIRS[0]["rejected"] in md or PAIRS[1]["rejected"] in md
    assert "<h2>Preference pairs</h2>" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_compare_base_vs_aligned_side_by_side(tiny_llama, preference_data, tmp_path, capsys):
    from test_inference_support import make_adapter

    from tunelab.cli.main import main

    adapter = make_adapter(tiny_llama, tmp_path / "aligned")
    code = main(["eval", str(tiny_llama), "--compare", str(adapter), "--data", str(preference_data),
                 "--metrics", "preference", "--output", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["reward_accuracy"][1] == "0.500"  # the base is its own reference: every pair ties
    assert rows["reward_margin"][1] == "0.0000"
    assert rows["logp_accuracy"][1] != "-" and rows["logp_accuracy"][2] != "-"  # defined for both models
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8"))
    assert comparison["models"] == ["llama", "aligned"]
    base_info = json.loads((tmp_path / "cmp" / "1-llama" / "metrics.json").read_text(encoding="utf-8"))["info"]
    assert "implicit reward is 0 by definition" in base_info["reference"]
    assert "Per example (reward_margin)" in out  # on pairs, the margin is what is compared per example


def test_preference_metric_without_pairs_is_an_error(tiny_llama, tmp_path):
    from tunelab.config.schema import EvalConfig
    from tunelab.errors import TunelabError
    from tunelab.evaluation.evaluate import evaluate

    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "Hi", "output": "Hello"}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match="no chosen/rejected pairs"):
        evaluate(str(tiny_llama), str(data), EvalConfig(metrics=["preference"]), write=False)


def test_an_sft_run_that_a_dpo_run_started_from_is_the_base_of_the_comparison(tmp_path):
    from tunelab.evaluation.evaluate import reference_index

    for name, record in (("sft", {"model": "m"}), ("dpo", {"model": "m", "init_from": str(tmp_path / "sft")})):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text("{}\n", encoding="utf-8")
        (tmp_path / name / "run.json").write_text(json.dumps(record), encoding="utf-8")
    assert reference_index([str(tmp_path / "dpo"), str(tmp_path / "sft")]) == 1
    assert reference_index([str(tmp_path / "sft"), str(tmp_path / "dpo")]) == 0


def _reward_run(tiny_llama, root: Path, stage: str | None) -> Path:
    """An rm run as training leaves it: a SEQ_CLS LoRA adapter (with the trained `score` head) in final/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.config import dump_config
    from tunelab.config.schema import ModelConfig, RunConfig

    run = root / "rm-run"
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.score.modules_to_save["default"].weight.normal_()
    peft_model.save_pretrained(run / "final")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(run / "final")
    data = {"model": ModelConfig(name=str(tiny_llama)).model_dump()}
    cfg = RunConfig.model_validate({**data, **({"stage": stage} if stage else {})})
    (run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"status": "completed"}), encoding="utf-8")
    return run, peft_model.eval()


def test_a_reward_model_run_is_scored_by_its_value_head(tiny_llama, preference_data, tmp_path):
    from tunelab.config.schema import DataConfig, DatasetSpec
    from tunelab.evaluation.examples import load_preference_pairs
    from tunelab.evaluation.preference import load_reward_engine, measure_preference

    run, trained = _reward_run(tiny_llama, tmp_path, None)
    engine = load_reward_engine(run)
    pairs = load_preference_pairs([DatasetSpec(path=str(preference_data))], DataConfig())
    result = measure_preference(engine, pairs, cutoff_len=256)
    assert set(result.metrics) == {"rm_accuracy", "rm_margin", "rm_chosen", "rm_rejected"}
    from tunelab.data.preference import encode_preference

    trained.config.pad_token_id = engine.tokenizer.pad_token_id
    for pair, scores in zip(pairs, result.per_example):
        ids = encode_preference(pair, engine.template, engine.tokenizer, 256)
        with torch.no_grad():
            chosen = trained(input_ids=torch.tensor([ids["prompt_input_ids"] + ids["chosen_input_ids"]])).logits
        assert scores["rm_chosen"] == pytest.approx(float(chosen[0, 0]), abs=1e-4)


@pytest.mark.skipif("stage" not in __import__("tunelab.config.schema", fromlist=["RunConfig"]).RunConfig.model_fields,
                    reason="needs RunConfig.stage (issue 14, training stages)")
def test_tunelab_eval_on_an_rm_run_reports_only_the_reward_model_scores(tiny_llama, preference_data, tmp_path):
    from tunelab.config.schema import EvalConfig
    from tunelab.evaluation.evaluate import evaluate

    run, _ = _reward_run(tiny_llama, tmp_path, "rm")
    result = evaluate(str(run), str(preference_data), EvalConfig(), output_dir=tmp_path / "out")
    assert "rm_accuracy" in result.metrics and "loss" not in result.metrics and "rouge-l" not in result.metrics
    assert "| rm |" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def _has_alignment() -> bool:
    import importlib.util

    from tunelab.config.schema import RunConfig

    return "stage" in RunConfig.model_fields and importlib.util.find_spec("tunelab.data.preference") is not None


@pytest.mark.skipif(not _has_alignment(), reason="needs RunConfig.stage and tunelab.data.preference (issue 14)")
def test_a_dpo_run_is_evaluated_on_the_validation_pairs_training_held_out(tiny_llama, tmp_path):
    from test_inference_support import make_adapter

    from tunelab.config import dump_config
    from tunelab.config.schema import RunConfig
    from tunelab.data.preference import prepare_preference_data
    from tunelab.evaluation.evaluate import evaluate
    from tunelab.inference.hf import load_engine

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({**r, "prompt": f"{r['prompt']} ({i})"}, ensure_ascii=False) + "\n"
                            for i, r in enumerate(PAIRS * 3)), encoding="utf-8")
    cfg = RunConfig.model_validate({"stage": "dpo", "model": {"name": str(tiny_llama)},
                                    "data": {"datasets": [{"path": str(data)}], "val_size": 3, "seed": 3,
                                             "cutoff_len": 128}})
    run = tmp_path / "dpo-run"
    make_adapter(tiny_llama, run / "final")
    (run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"status": "completed"}), encoding="utf-8")
    from tunelab.config.schema import EvalConfig

    result = evaluate(str(run), None, EvalConfig(metrics=["preference"]), write=False)
    assert result.info["data"] == "validation split of the run" and result.info["pairs_scored"] == 3
    engine = load_engine(str(run))
    prepared = prepare_preference_data(cfg.data, engine.tokenizer, engine.template, paired=True)
    held_out = sorted(tuple(ids) for ids in prepared.validation["prompt_input_ids"])  # prompts are unique
    from tunelab.data.preference import encode_preference
    from tunelab.evaluation.examples import validation_pairs

    ours = validation_pairs(cfg.data, engine.template, engine.tokenizer)
    assert sorted(tuple(encode_preference(e, engine.template, engine.tokenizer, 128)["prompt_input_ids"])
                  for e in ours) == held_out
