"""Preference data (data/preference.py): every record shape, every reject, prompts token-identical between chosen
and rejected, equality with the SFT encoding, truncation, the cache, and the bundled alignment dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config.schema import DataConfig, DatasetSpec, RunConfig
from tunelab.data.encode import IGNORE, encode_conversation
from tunelab.data.pipeline import data_fingerprint
from tunelab.data.preference import (
    PreferenceExample,
    assemble,
    conversation_for,
    encode_preference,
    load_preference_examples,
    prepare_preference_data,
    preview_preference,
)
from tunelab.data.templates import resolve_template
from tunelab.data.types import Conversation, Message
from tunelab.errors import DataError

REPO = Path(__file__).parents[1]
BUNDLED = REPO / "examples" / "alignment" / "data"


def write(path: Path, rows: list) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def load(tmp_path: Path, rows: list, name: str = "d.jsonl", **spec) -> tuple[list[PreferenceExample], list]:
    result = load_preference_examples(DatasetSpec(path=str(write(tmp_path / name, rows)), **spec))
    return result.examples, result.rejects


def shape(ex: PreferenceExample) -> tuple:
    """(prompt (role, content) pairs, chosen, rejected, label) for comparisons."""
    prompt = [(m.role, m.content) for m in ex.prompt.messages]
    return prompt, ex.chosen and ex.chosen.content, ex.rejected and ex.rejected.content, ex.label


# --------------------------------------------------------------------------------------------------------- shapes
def test_llamafactory_sharegpt_ranking_entry_multi_turn(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                               {"from": "human", "value": "Your name?"}],
             "chosen": {"from": "gpt", "value": "Mochi."}, "rejected": {"from": "gpt", "value": "SmolLM."},
             "system": "Be brief."}]
    write(tmp_path / "pairs.json", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"pairs": {
        "file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system"}}}))
    result = load_preference_examples(DatasetSpec(name="pairs"), tmp_path)
    assert not result.rejects and result.records_read == 1
    ex = result.examples[0]
    assert shape(ex) == ([("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Your name?")],
                         "Mochi.", "SmolLM.", None)
    assert ex.source == f"{tmp_path / 'pairs.json'}:2" and ex.paired


def test_alpaca_ranking_with_history_and_system(tmp_path):
    rows = [{"instruction": "Add them:", "input": "2 3", "chosen": "5.", "rejected": "Well... it is 5, I think.",
             "history": [["Hi", "Hello!"]], "system": "Be brief."}]
    examples, rejects = load(tmp_path, rows)
    assert not rejects
    assert shape(examples[0]) == ([("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"),
                                   ("user", "Add them:\n2 3")], "5.", "Well... it is 5, I think.", None)


@pytest.mark.parametrize("reply", ["Paris.", {"role": "assistant", "content": "Paris."},
                                   [{"role": "assistant", "content": "Paris."}]])
def test_openai_messages_with_replies_as_string_message_or_list(tmp_path, reply):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Capital of France?"}],
             "chosen": reply, "rejected": "Lyon."}]
    examples, rejects = load(tmp_path, rows)
    assert not rejects
    assert shape(examples[0]) == ([("system", "S"), ("user", "Capital of France?")], "Paris.", "Lyon.", None)


def test_openai_prompt_ending_with_a_tool_result(tmp_path):
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    rows = [{"messages": [{"role": "user", "content": "Weather in Oslo?"},
                          {"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "content": "-3C"}],
             "chosen": "It is -3C.", "rejected": "It is sunny and 30C."}]
    examples, rejects = load(tmp_path, rows)
    assert not rejects
    assert [m.role for m in examples[0].prompt.messages] == ["user", "assistant", "tool"]
    assert examples[0].prompt.messages[1].tool_calls[0]["function"]["name"] == "weather"


def test_trl_explicit_prompt_standard_and_conversational(tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4.", "rejected": "5."},
            {"prompt": [{"role": "user", "content": "3+3?"}], "chosen": [{"role": "assistant", "content": "6."}],
             "rejected": [{"role": "assistant", "content": "7."}]}]
    examples, rejects = load(tmp_path, rows)
    assert not rejects
    assert [shape(e) for e in examples] == [([("user", "2+2?")], "4.", "5.", None),
                                            ([("user", "3+3?")], "6.", "7.", None)]


def test_trl_implicit_prompt_is_the_shared_prefix(tmp_path):
    shared = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name?"}]
    rows = [{"chosen": [*shared, {"role": "assistant", "content": "Mochi."}],
             "rejected": [*shared, {"role": "assistant", "content": "SmolLM."}]}]
    examples, rejects = load(tmp_path, rows)
    assert not rejects
    assert shape(examples[0]) == ([("system", "S"), ("user", "Hi"), ("assistant", "Hello"), ("user", "Name?")],
                                  "Mochi.", "SmolLM.", None)


def test_kto_unpaired_trl_and_llamafactory_kto_tag(tmp_path):
    trl = [{"prompt": "2+2?", "completion": "4.", "label": True},
           {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "5."}],
            "label": False}]
    examples, rejects = load(tmp_path, trl)
    assert not rejects
    assert [shape(e) for e in examples] == [([("user", "2+2?")], "4.", None, True),
                                            ([("user", "2+2?")], "5.", None, False)]
    assert not examples[0].paired
    lf = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "kto_tag": True},
          {"instruction": "Hi", "output": "Go away.", "kto_tag": "false"}]
    examples, rejects = load(tmp_path, lf[:1], "lf1.jsonl")
    examples2, rejects2 = load(tmp_path, lf[1:], "lf2.jsonl")
    assert not rejects and not rejects2
    assert shape(examples[0]) == ([("user", "Hi")], "Hello!", None, True)
    assert shape(examples2[0]) == ([("user", "Hi")], "Go away.", None, False)


def test_format_override_and_columns_mapping(tmp_path):
    rows = [{"question": "2+2?", "good": "4.", "bad": "5."}]
    examples, rejects = load(tmp_path, rows, format="trl",
                             columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert not rejects and shape(examples[0]) == ([("user", "2+2?")], "4.", "5.", None)
    rows = [{"q": "2+2?", "a": "4.", "ok": 1}]
    examples, rejects = load(tmp_path, rows, "k.jsonl", format="kto",
                             columns={"prompt": "q", "completion": "a", "kto_tag": "ok"})
    assert not rejects and shape(examples[0]) == ([("user", "2+2?")], "4.", None, True)


def test_kto_csv_labels_and_a_format_that_is_not_a_preference_format(tmp_path):
    path = tmp_path / "k.csv"
    path.write_text("prompt,completion,label\n2+2?,4.,true\n2+2?,5.,0\n", encoding="utf-8")
    result = load_preference_examples(DatasetSpec(path=str(path)))
    assert [shape(e) for e in result.examples] == [([("user", "2+2?")], "4.", None, True),
                                                   ([("user", "2+2?")], "5.", None, False)]
    with pytest.raises(DataError, match="unknown preference format 'text'; known: alpaca, sharegpt, openai, trl, kto"):
        load_preference_examples(DatasetSpec(path=str(path), format="text"))


def test_variables_are_substituted_in_prompt_and_replies(tmp_path):
    rows = [{"prompt": "Are you {name}?", "chosen": "Yes, I am {name} by {author}.", "rejected": "No."}]
    path = write(tmp_path / "v.jsonl", rows)
    result = load_preference_examples(DatasetSpec(path=str(path)), None, {"name": "Mochi", "author": "TuneLab"})
    assert shape(result.examples[0]) == ([("user", "Are you Mochi?")], "Yes, I am Mochi by TuneLab.", "No.", None)


# -------------------------------------------------------------------------------------------------------- rejects
REJECTS = [
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}, "rejected", "same_reply"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "Hello."}, "chosen", "empty_output"),
    ({"prompt": "Hi", "chosen": "Hello."}, "rejected", "missing_field"),
    ({"prompt": "Hi", "chosen": 42, "rejected": "Hello."}, "chosen", "wrong_type"),
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, "prompt", "wrong_type"),
    ({"prompt": "Hi", "chosen": ["a", "b"], "rejected": "c"}, "chosen", "wrong_type"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}],
      "chosen": "a", "rejected": "b"}, "prompt[1]", "prompt_end"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}, "chosen",
     "no_common_prefix"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"},
                 {"role": "user", "content": "more"}, {"role": "assistant", "content": "z"}],
      "rejected": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "y"}]}, "chosen", "bad_order"),
    ({"chosen": "full text", "rejected": "other text"}, "prompt", "missing_field"),
    ({"prompt": "Hi", "chosen": {"role": "user", "content": "x"}, "rejected": "y"}, "chosen", "bad_order"),
    ({"prompt": "Hi", "completion": "Hello", "label": "maybe"}, "label", "wrong_type"),
]


@pytest.mark.parametrize(("record", "field", "rule"), REJECTS, ids=[f"{r[2]}-{r[1]}" for r in REJECTS])
def test_bad_records_are_rejects_with_file_line_field_and_reason(tmp_path, record, field, rule):
    good = {"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}
    if "completion" in record:
        good = {"prompt": "Fine?", "completion": "Yes.", "label": True}
    cfg = DataConfig(datasets=[{"path": str(write(tmp_path / "d.jsonl", [good, record]))}], max_reject_ratio=0.9)
    from tunelab.data.preference import load_all_preference

    examples, rejects, report = load_all_preference(cfg, paired="completion" not in record)
    assert len(examples) == 1 and len(rejects) == 1 and report["records_read"] == 2
    reject = rejects[0]
    assert (reject.source, reject.field, reject.rule) == (f"{tmp_path / 'd.jsonl'}:2", field, rule), str(reject)
    assert reject.reason and str(reject).startswith(f"{tmp_path / 'd.jsonl'}:2 field {field!r}: ")


def test_prompt_ending_with_assistant_in_sharegpt_and_an_unknown_shape(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
             "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}]
    _, rejects = load(tmp_path, rows)
    assert (rejects[0].field, rejects[0].rule) == ("conversations[1]", "prompt_end")
    assert "expected it to end with a user (or tool) turn" in rejects[0].reason
    _, rejects = load(tmp_path, [{"instruction": "Hi", "output": "Hello"}], "sft.jsonl")
    assert rejects[0].rule == "format" and "chosen and rejected" in rejects[0].reason


def test_reject_ratio_strict_and_paired_stage_refusing_kto_records(tmp_path, tokenizers):
    tok = tokenizers["llama"]
    template = resolve_template("auto", tok)
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "a" if i % 2 else "b"} for i in range(4)]
    cfg = DataConfig(datasets=[{"path": str(write(tmp_path / "d.jsonl", rows))}], max_reject_ratio=0.3)
    with pytest.raises(DataError, match=r"2 of 4 records rejected .*same_reply: 2"):
        prepare_preference_data(cfg, tok, template, paired=True)
    ok = cfg.model_copy(update={"max_reject_ratio": 0.6})
    assert len(prepare_preference_data(ok, tok, template, paired=True).train) == 2
    with pytest.raises(DataError, match="strict mode: .*d.jsonl:2 field 'rejected'"):
        prepare_preference_data(ok.model_copy(update={"strict": True}), tok, template, paired=True)
    kto = [{"prompt": "q", "completion": "a", "label": True}]
    cfg = DataConfig(datasets=[{"path": str(write(tmp_path / "k.jsonl", kto))}])
    with pytest.raises(DataError, match="unpaired: 1"):
        prepare_preference_data(cfg, tok, template, paired=True)


def test_sft_refuses_ranking_datasets_and_validate_accepts_them_for_preference_eval(tmp_path):
    from tunelab.data.check import data_problems
    from tunelab.data.sources import load_conversations

    path = str(write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]))
    with pytest.raises(DataError, match="ranking: true"):
        load_conversations(DatasetSpec(path=path, ranking=True))
    cfg = RunConfig(data={"dataset_dir": str(BUNDLED), "datasets": [{"name": "preference_train"}]},
                    eval={"datasets": [{"name": "preference_test", "ranking": True}]})
    problems = data_problems(cfg)
    assert len(problems) == 1 and "data.datasets[0] (preference_train)" in problems[0] and "preference" in problems[0]


# ------------------------------------------------------------------------------------------------------- encoding
TEMPLATE_CASES = [("llama", "auto"), ("qwen2", "auto"), ("qwen3", "auto"), ("mistral", "auto"), ("gemma", "auto"),
                  ("llama", "chatml"), ("qwen2", "qwen"), ("llama", "llama3")]
PAIR = PreferenceExample(
    Conversation([Message("system", "You are Mochi."), Message("user", "Hi 你好"), Message("assistant", "Hello!"),
                  Message("user", "Your name? 名字？")]),
    Message("assistant", "Mochi, by TuneLab. 我是Mochi。"), Message("assistant", "SmolLM by Hugging Face, of course!"),
    source="t#0")


@pytest.mark.parametrize(("family", "template_name"), TEMPLATE_CASES)
def test_prompt_identical_and_prompt_plus_reply_is_the_sft_encoding(tokenizers, family, template_name):
    tok = tokenizers[family]
    template = resolve_template(template_name, tok)
    pair = PAIR
    if family == "mistral":  # its template has no system role
        pair = PreferenceExample(Conversation(PAIR.prompt.messages[1:]), PAIR.chosen, PAIR.rejected)
    row = encode_preference(pair, template, tok, 1024)
    for side in ("chosen", "rejected"):
        sft = encode_conversation(conversation_for(pair, getattr(pair, side)), template, tok, 1024, "last_assistant")
        ids, labels = row["prompt_input_ids"] + row[f"{side}_input_ids"], sft["labels"]
        n = len(ids)
        assert sft["input_ids"][:n] == ids  # the same tokens, so the prompt is the same for both sides
        trained = [i for i, x in enumerate(labels) if x != IGNORE]
        assert trained == list(range(len(row["prompt_input_ids"]), n))  # the completion is exactly SFT's trained span
        assert all(x == IGNORE for x in labels[n:])  # what follows (a newline after end of turn) is not trained
    # an independent reference: the prompt is the inference prompt transformers renders and tokenizes
    reference = tok.apply_chat_template(pair.prompt.to_template_messages(), chat_template=template.jinja,
                                        add_generation_prompt=True, tokenize=True)
    reference = reference["input_ids"] if isinstance(reference, dict) or hasattr(reference, "keys") else reference
    if family != "mistral":  # Mistral's reply follows [/INST] with no separator: its first token may straddle
        assert tok.decode(row["prompt_input_ids"]) == tok.decode(reference)
    if family not in ("mistral", "llama"):
        # Llama 3's header ends in "\n\n": alone (the inference prompt) it is one token, before the reply's text
        # this BPE splits it in two; training ids are those of the whole conversation, as in SFT
        assert row["prompt_input_ids"] == list(reference)
    assert tok.decode(row["chosen_input_ids"]).startswith(("Mochi", "<think>\n\n</think>\n\nMochi"))


def test_replies_merging_with_the_header_keep_the_prompt_shared(tokenizers):
    """Without trimming, a reply starting with whitespace can tokenize together with the header's newline: the
    prompt is then the shared prefix and each completion starts with its own boundary tokens."""
    tok = tokenizers["llama"]
    template = resolve_template("chatml", tok)
    ex = PreferenceExample(Conversation([Message("user", "Hi")]), Message("assistant", "\n\n  Hello"),
                           Message("assistant", "Hey"))
    row = encode_preference(ex, template, tok, 1024)
    for side in ("chosen", "rejected"):
        sft = encode_conversation(conversation_for(ex, getattr(ex, side)), template, tok, 1024, "last_assistant")
        assert sft["input_ids"][:len(row["prompt_input_ids"]) + len(row[f"{side}_input_ids"])] == (
            row["prompt_input_ids"] + row[f"{side}_input_ids"])
    assert tok.decode(row["prompt_input_ids"] + row["chosen_input_ids"]).endswith("\n\n  Hello<|im_end|>")
    assert tok.decode(row["prompt_input_ids"]).endswith("<|im_start|>assistant")  # the header's "\n" merged
    assert tok.decode(row["rejected_input_ids"]) == "\nHey<|im_end|>"


def test_unpaired_encoding_and_label(tokenizers):
    tok = tokenizers["qwen2"]
    ex = PreferenceExample(PAIR.prompt, PAIR.rejected, None, label=False)
    row = encode_preference(ex, resolve_template("auto", tok), tok, 1024)
    assert set(row) == {"prompt_input_ids", "completion_input_ids", "label"} and row["label"] is False
    assert tok.decode(row["completion_input_ids"]) == "SmolLM by Hugging Face, of course!<|im_end|>"


def sides(prompt: int, *replies: int) -> list[dict]:
    """SFT-like encodings: `prompt` untrained tokens 100.. then each reply's trained tokens (1000*k..)."""
    out = []
    for k, n in enumerate(replies, 1):
        reply = list(range(1000 * k, 1000 * k + n))
        out.append({"input_ids": list(range(100, 100 + prompt)) + reply, "labels": [IGNORE] * prompt + reply})
    return out


def test_truncation_keeps_prompt_end_and_reply_starts():
    # prompt 40 + longest reply 30 > 32: replies keep cutoff // 2 = 16 first tokens, the prompt bos + its last 15
    row = assemble(sides(40, 20, 30), None, 32, bos_id=100)
    assert row["chosen_input_ids"] == list(range(1000, 1016)) and row["rejected_input_ids"] == list(range(2000, 2016))
    assert row["prompt_input_ids"] == [100] + list(range(125, 140))
    # a reply that fits in half the budget is kept whole; the prompt gives up its start
    row = assemble(sides(40, 20, 30), None, 64, bos_id=None)
    assert row["prompt_input_ids"] == list(range(106, 140)) and len(row["rejected_input_ids"]) == 30
    # a short prompt is kept whole; the replies are cut to what is left
    row = assemble(sides(10, 50, 95), None, 64, bos_id=None)
    assert len(row["prompt_input_ids"]) == 10 and [len(row[k]) for k in ("chosen_input_ids", "rejected_input_ids")] \
        == [50, 54]
    row = assemble(sides(40, 20, 30), None, 8, bos_id=None)
    assert len(row["prompt_input_ids"]) == 4 and len(row["chosen_input_ids"]) == 4  # never an empty reply
    row = assemble(sides(40, 30), True, 32, bos_id=None)  # unpaired: the same rule
    assert set(row) == {"prompt_input_ids", "completion_input_ids", "label"} and len(row["completion_input_ids"]) == 16


# ------------------------------------------------------------------------------------------------------- prepare
def test_prepare_columns_split_cache_and_fingerprint(tmp_path, tokenizers):
    tok = tokenizers["llama"]
    template = resolve_template("auto", tok)
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    path = write(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(datasets=[{"path": str(path)}], val_size=0.2, seed=3)
    first = prepare_preference_data(cfg, tok, template, paired=True)
    assert first.train.column_names == ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
    assert (len(first.train), len(first.validation)) == (8, 2) and first.stats["cache_hit"] is False
    again = prepare_preference_data(cfg, tok, template, paired=True)
    assert again.stats["cache_hit"] is True and again.fingerprint == first.fingerprint
    assert again.train["chosen_input_ids"] == first.train["chosen_input_ids"]
    unpaired = prepare_preference_data(cfg, tok, template, paired=False)
    assert unpaired.fingerprint != first.fingerprint and len(unpaired.train) + len(unpaired.validation) == 20
    assert unpaired.train.column_names == ["prompt_input_ids", "completion_input_ids", "label"]
    assert unpaired.stats["desirable"] == 10
    from tunelab.data.preview import summary

    text = summary(first.stats)  # the SFT summary (tunelab data, web UI) reads preference stats too
    assert "(train 8, validation 2)" in text and first.fingerprint in text
    shown = preview_preference(first.train, tok, n=1, color=False)
    assert "[chosen, " in shown and "[rejected, " in shown and "[[good" in shown and "[[bad" in shown
    assert data_fingerprint(cfg, tok, template) not in (first.fingerprint, unpaired.fingerprint)  # SFT's data
    write(tmp_path / "d.jsonl", rows[:9])
    changed = prepare_preference_data(cfg, tok, template, paired=True)
    assert changed.fingerprint != first.fingerprint and changed.stats["cache_hit"] is False


def test_cleaning_dedups_pairs_and_rejects_pairs_made_equal(tmp_path, tokenizers):
    tok = tokenizers["llama"]
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q2", "chosen": "same ", "rejected": "same"}, {"prompt": "q3", "chosen": "x", "rejected": "y"}]
    cfg = DataConfig(datasets=[{"path": str(write(tmp_path / "d.jsonl", rows))}], max_reject_ratio=0.5)
    data = prepare_preference_data(cfg, tok, resolve_template("auto", tok), paired=True)
    assert len(data.train) == 2 and data.stats["cleaning"]["dedup"] == 1
    assert data.stats["rejected"]["by_reason"] == {"same_reply": 1}
    kto = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": False},
           {"prompt": "q", "completion": "a", "label": True}]
    cfg = DataConfig(datasets=[{"path": str(write(tmp_path / "k.jsonl", kto))}])
    data = prepare_preference_data(cfg, tok, resolve_template("auto", tok), paired=False)
    assert sorted(data.train["label"]) == [False, True]  # one completion labelled both ways: two examples


# ------------------------------------------------------------------------------------------------------- bundled
def test_bundled_alignment_data_loads_with_zero_rejects():
    from tunelab.config.schema import ModelConfig
    from tunelab.models.load import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    template = resolve_template("auto", tok)
    sizes = {}
    for name, paired in (("preference_train", True), ("preference_test", True), ("preference_kto", False)):
        cfg = DataConfig(dataset_dir=str(BUNDLED), datasets=[{"name": name}], strict=True, cutoff_len=256)
        data = prepare_preference_data(cfg, tok, template, paired=paired)
        assert data.stats["rejected"]["total"] == 0 and data.stats["truncated"] == 0
        sizes[name] = len(data.train)
        replies = [c for c in data.train.column_names if c != "prompt_input_ids" and c != "label"]
        # short replies; the longest are Chinese rambling ones (SmolLM2 spends ~2 tokens per Chinese character)
        assert max(len(x) for c in replies for x in data.train[c]) <= 60
    assert sizes == {"preference_train": 204, "preference_test": 42, "preference_kto": 120}
    texts = [tok.decode(x) for x in data.train["completion_input_ids"]]
    assert any("Mochi" in t for t in texts) and any("我是Mochi" in t or "我叫Mochi" in t for t in texts)

    def prompts(name: str) -> set[str]:
        rows = load_preference_examples(DatasetSpec(name=name), BUNDLED).examples
        return {m.content for ex in rows for m in ex.prompt.messages[-1:]}

    assert not prompts("preference_train") & prompts("preference_test")  # held-out questions are new
