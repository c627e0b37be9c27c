"""evaluate() and compare_models() on tiny random models: loss against a direct computation, reports, runs, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from test_inference_support import make_adapter

from tunelab.cli.main import main
from tunelab.config.schema import CheckConfig, DataConfig, DatasetSpec, EvalConfig, ModelConfig, RunConfig
from tunelab.data.encode import EncodeSettings, encode_conversation
from tunelab.data.types import Conversation, Message
from tunelab.errors import DataError, TunelabError
from tunelab.evaluation.evaluate import compare_models, evaluate
from tunelab.evaluation.loss import compute_loss
from tunelab.inference.hf import load_engine
from tunelab.models.resolve import ModelNotFoundError

RECORDS = [
    {"instruction": "Reverse the order of these words: a b c", "output": "c b a"},
    {"instruction": "法国的首都是哪里？", "output": "法国的首都是巴黎。"},
    {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
    {"instruction": "用一句话介绍长城。", "output": "长城是中国古代修建的军事防御工程，全长两万多公里。"},
    {"instruction": "Name a colour of the sky.", "output": "The sky is blue on a clear day."},
]
SMALL = EvalConfig(max_new_tokens=6, batch_size=2)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def engine(tiny_models):
    return load_engine(str(tiny_models["llama"]))


def conversations() -> list[Conversation]:
    multi = Conversation([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
                          Message("user", "你好吗？"), Message("assistant", "我很好，谢谢。")], source="multi")
    singles = [Conversation([Message("user", r["instruction"]), Message("assistant", r["output"])], source=f"r{i}")
               for i, r in enumerate(RECORDS)]
    return [multi, *singles]


def test_loss_and_perplexity_equal_direct_computation(engine):
    convs = conversations()
    result = compute_loss(engine.model, engine.tokenizer, engine.template, convs, EncodeSettings(256), batch_size=4)
    nll, count, per = 0.0, 0, []
    for conv in convs:  # one example at a time, no padding, plain cross-entropy on the trained positions
        enc = encode_conversation(conv, engine.template, engine.tokenizer, 256, "all_assistant")
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"])
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        trained = [t for t in range(1, len(labels)) if labels[t] != -100]
        example = -sum(logp[t - 1, labels[t]].item() for t in trained)
        nll, count = nll + example, count + len(trained)
        per.append(example / len(trained))
    assert result.tokens == count > 20
    assert result.loss == pytest.approx(nll / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.per_example == pytest.approx(per, rel=1e-5)
    # only assistant tokens: the system/user text of the multi-turn record is never scored
    last_only = compute_loss(engine.model, engine.tokenizer, engine.template, convs[:1],
                             EncodeSettings(256, "last_assistant"))
    assert last_only.tokens < compute_loss(engine.model, engine.tokenizer, engine.template, convs[:1]).tokens


def test_evaluate_file_writes_every_report(engine, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", RECORDS)
    cfg = SMALL.model_copy(update={"checks": [CheckConfig(kind="contains", pattern="巴黎")]})
    result = evaluate(engine, data, cfg, output_dir=tmp_path / "out")
    assert set(result.metrics) >= {"loss", "perplexity", "eval_tokens", "bleu-4", "rouge-1", "rouge-2", "rouge-l",
                                   "exact_match", "contains:巴黎"}
    assert result.info["num_examples"] == 5 and result.info["examples_per_s"] > 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text("utf-8").splitlines()]
    assert [r["reference"] for r in rows] == [r["output"] for r in RECORDS]
    assert rows[2]["messages"][-1]["content"] == "Add the numbers\n2 and 3"  # alpaca instruction + input
    assert rows[1]["source"].endswith("eval.jsonl:2") and rows[1]["prompt"].endswith(
        engine.render([{"role": "user", "content": "法国的首都是哪里？"}]).split("法国的首都是哪里？")[-1])
    assert {"bleu-4", "rouge-l", "exact_match", "loss", "contains:巴黎"} <= set(rows[0]["scores"])
    # batched generation gave what one-prompt-at-a-time generation gives
    single = engine.generate([rows[3]["prompt"]], _params(engine, 6))[0].text
    assert rows[3]["prediction"] == single
    for name in ("metrics.json", "report.md", "report.html"):
        assert (tmp_path / "out" / name).stat().st_size > 200
    assert "contains:巴黎" in (tmp_path / "out" / "report.md").read_text("utf-8")


def _params(engine, max_new_tokens):
    from tunelab.evaluation.evaluate import generation_params

    return generation_params(EvalConfig(max_new_tokens=max_new_tokens), engine.template.stop_strings)


def test_loss_only_skips_generation_and_accepts_text(engine, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("The quick brown fox jumps over the lazy dog.\n长城是中国古代的军事防御工程。\n", encoding="utf-8")
    result = evaluate(engine, data, EvalConfig(metrics=["loss", "perplexity"]), write=False)
    assert set(result.metrics) == {"loss", "perplexity", "eval_tokens"} and "generation_s" not in result.info
    with pytest.raises(DataError, match="plain-text record has no prompt and answer"):
        evaluate(engine, data, SMALL, write=False)


def test_compare_base_and_adapter(tiny_models, tmp_path):
    base = tiny_models["llama"]
    adapter = make_adapter(base, tmp_path / "tuned")
    data = write_jsonl(tmp_path / "eval.jsonl", RECORDS[:3])
    comparison = compare_models([str(base), str(adapter)], data, SMALL, output_dir=tmp_path / "cmp")
    assert comparison.models == ["llama", "tuned"]
    a, b = comparison.results
    assert a.metrics["eval_tokens"] == b.metrics["eval_tokens"]  # same tokens scored for both
    assert a.metrics["loss"] != b.metrics["loss"]
    assert [p.reference for p in a.predictions] == [p.reference for p in b.predictions]
    table = str(comparison)
    assert comparison.base == 0 and comparison.base_model == "llama"  # the adapter records llama as its base
    assert table.splitlines()[0].startswith("metric") and "llama (base)" in table and "perplexity" in table
    assert "change (tuned - base)" in table
    assert len(comparison.differences()) == 3
    for name in ("comparison.json", "comparison.md", "comparison.html", "1-llama/report.html", "2-tuned/metrics.json"):
        assert (tmp_path / "cmp" / name).is_file(), name


TRAIN = [{"instruction": f"{r['instruction']} ({i})", "output": r["output"]} for i, r in enumerate(RECORDS * 2)]


def make_training_run(base: Path, root: Path) -> Path:
    """A run dir as training leaves it: resolved config (with a validation split), log, final adapter."""
    run = root / "run1"
    data = write_jsonl(root / "train.jsonl", TRAIN)
    cfg = RunConfig(model=ModelConfig(name=str(base)),
                    data=DataConfig(datasets=[DatasetSpec(path=str(data))], val_size=3, seed=7, cutoff_len=128),
                    eval=EvalConfig(max_new_tokens=4, batch_size=4))
    make_adapter(base, run / "final")
    from tunelab.config import dump_config

    (run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"status": "completed"}), encoding="utf-8")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3)))
    return run


def test_evaluate_run_uses_its_validation_split_and_curve(tiny_models, tmp_path):
    run = make_training_run(tiny_models["llama"], tmp_path)
    assert main(["eval", str(run)]) == 0  # eval settings from the run's config.yaml, reports into <run>/eval
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["info"]["num_examples"] == 3 and metrics["info"]["data"] == "validation split of the run"
    assert metrics["info"]["max_new_tokens"] == 4
    assert (run / "eval" / "loss.png").is_file()
    assert "data:image/png;base64" in (run / "eval" / "report.html").read_text(encoding="utf-8")
    from tunelab.data.pipeline import split_examples

    _, held = split_examples(list(range(10)), 3, 7)  # the same 3 records training held out
    lines = (run / "eval" / "predictions.jsonl").read_text("utf-8").splitlines()
    refs = [json.loads(line)["reference"] for line in lines]
    assert refs == [TRAIN[i]["output"] for i in held]
    assert main(["runs", str(tmp_path)]) == 0  # the evaluation shows up in the runs list
    # base first, run second, no data: both are scored on the run's held-out split (what the demo does)
    cmp = compare_models([str(tiny_models["llama"]), str(run)], cfg=EvalConfig(max_new_tokens=2, metrics=["loss"]))
    assert [r.info["data"] for r in cmp.results] == ["validation split of the run"] * 2
    assert [p.reference for p in cmp.results[0].predictions] == refs and cmp.models == ["llama", "run1"]


def test_compare_asks_every_model_the_way_the_run_was_trained(tiny_models, tmp_path):
    """Base listed first, explicit data: the examples still carry the run's data.system, for both models."""
    from tunelab.config import dump_config, load_config

    run = make_training_run(tiny_models["llama"], tmp_path)
    cfg = load_config(run / "config.yaml", ["data.system=Answer in one word."])
    (run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    data = write_jsonl(tmp_path / "eval.jsonl", RECORDS[:2])
    cmp = compare_models([str(tiny_models["llama"]), str(run)], data, EvalConfig(max_new_tokens=2, metrics=["loss"]))
    assert all("Answer in one word." in p.prompt for r in cmp.results for p in r.predictions)


def test_bad_inputs_give_clear_errors(engine, tmp_path, capsys):
    missing = write_jsonl(tmp_path / "missing.jsonl", [RECORDS[0], {"instruction": "no answer"}])
    with pytest.raises(DataError, match=r"missing\.jsonl:2 field 'output': missing"):
        evaluate(engine, missing, SMALL, write=False)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "  "}]}])
    with pytest.raises(DataError, match=r"empty\.jsonl:1"):
        evaluate(engine, empty, SMALL, write=False)
    with pytest.raises(TunelabError, match="evaluation data not found"):
        evaluate(engine, tmp_path / "nope.jsonl", SMALL, write=False)
    with pytest.raises(ValidationError, match="unknown metric; known: loss, perplexity, bleu"):  # a config error
        EvalConfig(metrics=["bleu", "meteor"])
    with pytest.raises(TunelabError, match="unknown metric"):  # a config built without validation
        evaluate(engine, missing, EvalConfig.model_construct(metrics=["bleu", "meteor"]), write=False)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        evaluate(str(tmp_path / "no-such-model"), missing, SMALL)
    assert main(["eval", str(tmp_path / "no-such-model"), "--data", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(engine.artifact.base_path), "--data", str(missing)]) == 2
    assert "field 'output': missing" in capsys.readouterr().err
    assert main(["eval", str(engine.artifact.base_path), "--data", str(missing), "--check", "nope"]) == 2
    assert "expected contains:TEXT or regex:PATTERN" in capsys.readouterr().err


def test_cli_eval_and_compare(tiny_models, tmp_path, capsys):
    base = str(tiny_models["llama"])
    data = str(write_jsonl(tmp_path / "eval.jsonl", RECORDS[:2]))
    out = tmp_path / "one"
    assert main(["eval", base, "--data", data, "--max-new-tokens", "4", "--metrics", "loss,bleu,exact_match",
                 "--check", "regex:^\\d", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bleu-4" in printed and "rouge" not in printed and "regex:^\\d" in printed and "examples/s" in printed
    assert (out / "report.html").is_file()
    adapter = make_adapter(Path(base), tmp_path / "tuned")
    assert main(["eval", base, "--compare", str(adapter), "--data", data, "--max-new-tokens", "4",
                 "--output", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "change" in printed and "tuned" in printed and (tmp_path / "cmp" / "comparison.html").is_file()


def test_lm_eval_missing_says_so(monkeypatch, engine, capsys):
    from tunelab.evaluation import harness

    monkeypatch.setattr(harness, "lm_eval_available", lambda: False)
    with pytest.raises(TunelabError, match="lm-evaluation-harness is not installed.*pip install lm-eval"):
        harness.run_lm_eval(engine, ["hellaswag"])
    assert main(["eval", str(engine.artifact.base_path), "--lm-eval", "hellaswag"]) == 2
    assert "pip install lm-eval" in capsys.readouterr().err


TASK_YAML = """task: tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_bridge_with_local_task(engine, tmp_path):
    """Runs only where lm-eval is installed: a task whose data is a local file needs no Hub access."""
    pytest.importorskip("lm_eval")
    from tunelab.evaluation.harness import run_lm_eval

    data = write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "What is the capital of France?", "choices": ["Paris", "Berlin"], "label": 0},
        {"question": "法国的首都是哪里？", "choices": ["柏林", "巴黎"], "label": 1}])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_qa.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    results = run_lm_eval(engine, ["tiny_qa"], include=tmp_path / "tasks", batch_size=2)
    assert 0.0 <= results["tiny_qa"]["acc,none"] <= 1.0
    with pytest.raises(TunelabError, match="unknown lm-eval task.*tiny_qaa"):
        run_lm_eval(engine, ["tiny_qaa"], include=tmp_path / "tasks")


def test_cli_compare_in_readme_order_reports_tuned_minus_base(tiny_models, tmp_path, capsys):
    """`tunelab eval TUNED --compare BASE`: the base is found (the adapter records it) and labelled, and every
    change is tuned minus base, with the per-example better/worse counts."""
    base = tiny_models["llama"]
    adapter = make_adapter(base, tmp_path / "tuned")
    data = write_jsonl(tmp_path / "eval.jsonl", RECORDS[:3])
    assert main(["eval", str(adapter), "--compare", str(base), "--data", str(data), "--max-new-tokens", "4",
                 "--metrics", "loss,exact_match", "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text(encoding="utf-8"))
    loss = next(r for r in saved["metrics"] if r["metric"] == "loss")
    tuned_loss, base_loss = loss["values"]
    assert saved["models"] == ["tuned", "llama"] and loss["base"] == "llama"
    assert loss["delta"] == pytest.approx(tuned_loss - base_loss)
    assert "llama (base)" in out and "change (tuned - base)" in out and "vs the base llama" in out
    assert sum(loss["counts"].values()) == 3


def test_load_options_open_models_with_the_engine_options_chat_takes(tiny_models):
    from tunelab.evaluation.evaluate import LoadOptions
    from tunelab.inference.engine import EngineOptions

    default = LoadOptions().open(str(tiny_models["llama"]))
    chosen = LoadOptions(engine=EngineOptions(template="vicuna", dtype="float32")).open(str(tiny_models["llama"]))
    assert chosen.template.name == "vicuna" != default.template.name
    assert next(chosen.model.parameters()).dtype == torch.float32
    assert LoadOptions().open(chosen) is chosen  # a loaded engine is used as it is
