"""Bad input never crashes a run and is never trained as something else: wrong types, multimodal parts, lone
surrogates, absurd nesting, empty files, one pretty-printed object, CSV files without a header row."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tunelab.config.schema import DataConfig, DatasetSpec
from tunelab.data.pipeline import prepare_data
from tunelab.data.sources import load_conversations
from tunelab.data.templates import resolve_template
from tunelab.errors import DataError

GOOD = {"instruction": "Say hi", "output": "hi"}


def load(path: Path, **spec):
    return load_conversations(DatasetSpec(path=str(path), **spec))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, *lines: str) -> Path:
    return write(path, "".join(line + "\n" for line in lines))


# ------------------------------------------------------------------------------------------------------------ types
@pytest.mark.parametrize("value, said", [
    ("42", "a number (42)"), ("4.5", "a number (4.5)"), ("NaN", "NaN (a missing value"), ("true", "a number (True)"),
    ('["a", "b"]', "a list"), ('{"text": "a"}', "dict"),
])
@pytest.mark.parametrize("key", ["output", "instruction", "input", "system"])
def test_non_string_alpaca_fields_are_rejects(tmp_path, key, value, said):
    record = json.dumps({**GOOD, "input": "", "system": ""}).replace(f'"{key}": ', f'"{key}": {value}, "_": ', 1)
    result = load(jsonl(tmp_path / "d.jsonl", json.dumps(GOOD), record),
                  columns={"prompt": "instruction", "query": "input", "response": "output", "system": "system"})
    if value == "NaN" and key in ("input", "system"):  # optional fields: NaN is pandas' missing value
        assert len(result.conversations) == 2 and not result.rejects
        return
    assert len(result.conversations) == 1 and len(result.rejects) == 1
    reject = result.rejects[0]
    assert (reject.source, reject.field, reject.rule) == (f"{tmp_path / 'd.jsonl'}:2", key, "wrong_type")
    assert said in reject.reason


def test_pandas_nan_is_never_trained_as_nan(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    nan = float("nan")
    pd.DataFrame({"instruction": ["Say hi", "Say bye", nan], "output": ["hi", nan, "one"]}).to_parquet(path)
    result = load(path)
    assert [c.messages[-1].content for c in result.conversations] == ["hi"]
    assert [(r.source.rsplit("#")[1], r.field) for r in result.rejects] == [("1", "output"), ("2", "instruction")]
    records = pd.DataFrame({"instruction": ["Say hi"], "input": [nan], "output": [nan]}).to_dict("records")
    (reject,) = load(jsonl(tmp_path / "nan.jsonl", json.dumps(records[0]))).rejects  # json writes NaN as NaN
    assert reject.field == "output" and "NaN (a missing value" in reject.reason  # input NaN: just absent
    path = tmp_path / "numbers.parquet"
    pd.DataFrame({"instruction": ["Add 2+2"], "output": [4]}).to_parquet(path)
    assert load(path).rejects[0].reason.startswith("expected a string, got a number (4)")


@pytest.mark.parametrize("content", [42, {"text": "hi"}, float("nan")])
def test_non_string_chat_content_is_a_reject(tmp_path, content):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}
    result = load(jsonl(tmp_path / "d.jsonl", json.dumps(bad)))
    assert result.rejects[0].field == "messages[1].content" and "expected a string" in result.rejects[0].reason


def test_openai_content_with_image_or_audio_parts_is_a_reject(tmp_path):
    def record(*parts):
        return json.dumps({"messages": [{"role": "user", "content": list(parts)},
                                        {"role": "assistant", "content": "A cat."}]})

    text = {"type": "text", "text": "What is this?"}
    image = {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}
    result = load(jsonl(tmp_path / "d.jsonl", record(text), record(text, image), record(audio, text)))
    assert [c.messages[0].content for c in result.conversations] == ["What is this?"]
    assert [(r.source.rsplit(":", 1)[1], r.rule) for r in result.rejects] == [("2", "multimodal"), ("3", "multimodal")]
    assert result.rejects[0].reason == "multimodal content not supported (parts of type image_url)"
    assert result.rejects[0].field == "messages[0].content"


# ---------------------------------------------------------------------------------------------------------- readers
def test_lone_surrogate_is_a_reject_naming_file_line_and_field(tmp_path):
    paired = json.dumps({"instruction": "Smile", "output": "\U0001F600"})  # ensure_ascii: a valid surrogate pair
    lone = '{"instruction": "Smile", "output": "half \\ud83d of it"}'
    result = load(jsonl(tmp_path / "d.jsonl", paired, lone))
    assert result.conversations[0].messages[-1].content == "\U0001F600"
    (reject,) = result.rejects
    assert (reject.source, reject.field, reject.rule) == (f"{tmp_path / 'd.jsonl'}:2", "output", "utf8")
    assert "lone UTF-16 surrogate \\ud83d" in reject.reason
    array = write(tmp_path / "a.json", "[\n" + paired + ",\n" + lone.replace("output", "input") + "\n]")
    (reject,) = load(array).rejects
    assert (reject.source, reject.field) == (f"{array}:3", "input")


def test_lone_surrogate_does_not_crash_prepare(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    good = [json.dumps({"instruction": f"Count {i}", "output": str(i) * 3}) for i in range(30)]
    path = jsonl(tmp_path / "d.jsonl", *good, '{"instruction": "x", "output": "\\udc00"}')
    cfg = DataConfig(datasets=[{"path": str(path)}])
    data = prepare_data(cfg, tokenizer, resolve_template("auto", tokenizer))
    assert data.stats["rejected"] == {"total": 1, "by_reason": {"utf8": 1}} and data.stats["examples"] == 30


def test_deep_nesting_is_a_reject_and_the_next_record_still_loads(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    result = load(jsonl(tmp_path / "d.jsonl", f'{{"instruction": {deep}, "output": "x"}}', json.dumps(GOOD)))
    assert len(result.conversations) == 1
    assert result.rejects[0].source.endswith("d.jsonl:1") and "nested too deeply" in result.rejects[0].reason
    array = write(tmp_path / "a.json", f'[\n{{"instruction": "a", "output": {deep}}},\n{json.dumps(GOOD)}\n]')
    result = load(array)
    assert len(result.conversations) == 1 and result.rejects[0].source == f"{array}:2"
    single = write(tmp_path / "one.json", f'{{"instruction": {deep}}}')
    assert "nested too deeply" in load(single).rejects[0].reason


@pytest.mark.parametrize("name, text", [("e.jsonl", ""), ("e.json", " \n\t\n"), ("e.csv", "\ufeff"), ("e.txt", "\n\n")])
def test_empty_files_are_an_error_naming_the_file(tmp_path, name, text):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match=f"{path}: the file is empty"):
        load(path)


def test_empty_json_array_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path / "e.json", " [ \n ] ")
    with pytest.raises(DataError, match=f"{path}: an empty JSON array"):
        load(path)


def test_one_pretty_printed_object_is_one_record(tmp_path):
    path = write(tmp_path / "one.json", json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}, indent=2))
    result = load(path)
    assert (len(result.conversations), result.rejects, result.records_read) == (1, [], 1)
    assert result.conversations[0].source == f"{path}:1"
    lines = write(tmp_path / "lines.json", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")  # JSON Lines in .json
    assert len(load(lines).conversations) == 2


def test_csv_whose_first_row_is_data_warns_with_the_assumed_header(tmp_path, caplog):
    no_header = write(tmp_path / "n.csv", "What is 2+2?,4\nWhat is 3+3?,6\n")
    with caplog.at_level(logging.WARNING, logger="tunelab.data.sources"):
        load(no_header, columns={"prompt": "What is 2+2?", "response": "4"}, format="alpaca")
    assert f"{no_header}: took the first row as the header (columns 'What is 2+2?', '4')" in caplog.text
    caplog.clear()
    good = write(tmp_path / "g.csv", "instruction,output\nWhat is 2+2?,4\n")
    with caplog.at_level(logging.WARNING, logger="tunelab.data.sources"):
        assert len(load(good).conversations) == 1
    assert "header" not in caplog.text
