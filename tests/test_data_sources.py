"""Reading data: every file type and record format, LLaMA-Factory registries, placeholders, cleaning, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config.schema import CleanConfig, DatasetSpec
from tunelab.data.clean import clean_conversations, normalize_whitespace, strip_html
from tunelab.data.sources import load_conversations
from tunelab.data.types import Conversation, Message
from tunelab.errors import DataError

ALPACA = [
    {"instruction": "Translate to Chinese", "input": "apple", "output": "苹果", "system": "Be brief.",
     "history": [["hi", "hello"]]},
    {"instruction": "Say hi", "output": "hi"},
]
SHAREGPT = [{
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "gpt", "value": "Let me check."},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 20}'},
        {"from": "gpt", "value": "It is 20 degrees."},
    ],
    "system": "You can call tools.",
    "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]',
}]
OPENAI = [{"messages": [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "The answer is 42.", "train": False},
]}]


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (bytes, str)):
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    else:
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def load(path: Path, **spec):
    return load_conversations(DatasetSpec(path=str(path), **spec), None, {})


def roles(conv: Conversation) -> list[str]:
    return [m.role for m in conv.messages]


# ----------------------------------------------------------------------------------------------------- formats
def test_alpaca_with_input_system_and_history(tmp_path):
    result = load(write(tmp_path / "a.json", ALPACA))
    first, second = result.conversations
    assert roles(first) == ["system", "user", "assistant", "user", "assistant"]
    assert first.messages[3].content == "Translate to Chinese\napple" and first.messages[4].content == "苹果"
    assert roles(second) == ["user", "assistant"] and second.source.endswith("a.json:14")
    assert result.records_read == 2 and not result.rejects


def test_sharegpt_tool_calls_observations_and_tools(tmp_path):
    conv = load(write(tmp_path / "s.json", SHAREGPT)).conversations[0]
    assert roles(conv) == ["system", "user", "assistant", "tool", "assistant"]
    reply = conv.messages[2]
    assert reply.content == "Let me check."  # text and function_call turns are one assistant turn
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert reply.tool_calls == [{"type": "function", "function": call}]
    assert conv.tools == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_sharegpt_custom_tags(tmp_path):
    rows = [{"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "hello"}]}]
    spec = {"format": "sharegpt", "columns": {"messages": "dialog"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}}
    conv = load(write(tmp_path / "c.jsonl", rows), **spec).conversations[0]
    assert roles(conv) == ["user", "assistant"] and conv.messages[1].content == "hello"


def test_openai_messages_content_parts_tool_calls_and_train_flag(tmp_path):
    conv = load(write(tmp_path / "o.jsonl", OPENAI)).conversations[0]
    assert roles(conv) == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[1].content == "part one, part two"
    assert conv.messages[2].tool_calls[0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert conv.messages[4].train is False


def test_text_lines_and_files(tmp_path):
    path = write(tmp_path / "corpus.txt", "first document\n\nsecond 文档\n")
    result = load(path)
    assert [c.text for c in result.conversations] == ["first document", "second 文档"]
    assert result.conversations[1].source.endswith("corpus.txt:3")
    whole = load(path, text_unit="file").conversations
    assert len(whole) == 1 and whole[0].text == "first document\n\nsecond 文档\n"
    jsonl = load(write(tmp_path / "t.jsonl", [{"text": "a doc"}])).conversations
    assert jsonl[0].text == "a doc"


def test_csv_parquet_save_to_disk_folder_and_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    write(tmp_path / "d/a.csv", 'instruction,input,output\n"Add 2, 3",,5\nHi,,"multi\nline"\n')
    pq.write_table(pa.Table.from_pylist(ALPACA[1:]), tmp_path / "d/b.parquet")
    Dataset.from_list(ALPACA[1:]).save_to_disk(str(tmp_path / "saved"))
    csv_result = load(tmp_path / "d/a.csv")
    assert [c.messages[1].content for c in csv_result.conversations] == ["5", "multi\nline"]
    assert csv_result.conversations[1].source.endswith("a.csv:3")
    assert len(load(tmp_path / "d").conversations) == 3  # a folder: every data file in it
    assert len(load(tmp_path / "saved").conversations) == 1
    assert len(load(tmp_path / "d/*.parquet").conversations) == 1


def test_jsonl_saved_as_json_and_bom(tmp_path):
    data = "\ufeff" + "".join(json.dumps(r) + "\n" for r in ALPACA)
    assert len(load(write(tmp_path / "x.json", data)).conversations) == 2


# ---------------------------------------------------------------------------------------------------- registry
def registry(tmp_path: Path, entries: dict) -> Path:
    write(tmp_path / "dataset_info.json", entries)
    return tmp_path


def test_llamafactory_registry_columns_tags_and_num_samples(tmp_path):
    write(tmp_path / "chat.json", [{"msgs": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": f"a{i}"}]} for i in range(5)])
    write(tmp_path / "inst.json", [{"q": "question", "a": "answer"}])
    folder = registry(tmp_path, {
        "chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "msgs"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant"}, "num_samples": 3},
        "inst": {"file_name": "inst.json", "columns": {"prompt": "q", "response": "a"}},
    })
    chat = load_conversations(DatasetSpec(name="chat"), folder, {})
    assert len(chat.conversations) == 3 and chat.conversations[2].messages[1].content == "a2"
    assert len(load_conversations(DatasetSpec(name="chat", max_samples=2), folder, {}).conversations) == 2
    inst = load_conversations(DatasetSpec(name="inst"), folder, {}).conversations[0]
    assert [m.content for m in inst.messages] == ["question", "answer"]


@pytest.mark.parametrize("entry, message", [
    ({"file_name": "p.json", "ranking": True, "formatting": "sharegpt"}, "preference dataset"),
    ({"file_name": "p.json", "columns": {"kto_tag": "label"}}, "KTO"),
    ({"file_name": "p.json", "columns": {"images": "images"}}, "multimodal"),
    ({"hf_hub_url": "someone/data"}, "only hf_hub_url"),
    ({"file_name": "p.json", "formatting": "weird"}, "formatting 'weird'"),
    ({"file_name": "missing.json"}, "not found"),
])
def test_registry_entries_we_cannot_use_fail_clearly(tmp_path, entry, message):
    write(tmp_path / "p.json", ALPACA)
    folder = registry(tmp_path, {"bad": entry})
    with pytest.raises(DataError, match=message):
        load_conversations(DatasetSpec(name="bad"), folder, {})


def test_unknown_name_lists_known_ones_and_dataset_dir_is_required(tmp_path):
    folder = registry(tmp_path, {"alpha": {"file_name": "a.json"}, "beta": {"file_name": "b.json"}})
    with pytest.raises(DataError, match="registry folder .* set data.dataset_dir.*alpha, beta"):
        load(folder)
    with pytest.raises(DataError, match="'gamma' is not registered; known: alpha, beta"):
        load_conversations(DatasetSpec(name="gamma"), folder, {})
    with pytest.raises(DataError, match="dataset_dir is not set"):
        load_conversations(DatasetSpec(name="alpha"), None, {})


# -------------------------------------------------------------------------------------------------- placeholders
def test_placeholders_in_both_styles_leave_other_braces_alone(tmp_path):
    rows = [{"instruction": "Who are you? 你是谁？", "output": "I am {name} by {{ author }}. 我是{name}。"},
            {"instruction": "code", "output": 'print(f"{x}") and {"name": 1} and {name_x} {{other}}'}]
    result = load_conversations(DatasetSpec(path=str(write(tmp_path / "i.json", rows))), None,
                                {"name": "Tuney", "author": "Lab"})
    assert result.conversations[0].messages[1].content == "I am Tuney by Lab. 我是Tuney。"
    assert result.conversations[1].messages[1].content == rows[1]["output"]


# ---------------------------------------------------------------------------------------------------- bad inputs
def rejected(tmp_path: Path, name: str, data, **spec):
    result = load(write(tmp_path / name, data), **spec)
    assert len(result.rejects) == 1, result.rejects
    return result.rejects[0]


def test_malformed_json_line_is_rejected_with_its_line(tmp_path):
    text = json.dumps(ALPACA[1]) + "\n{not json\n" + json.dumps(ALPACA[1]) + "\n"
    r = rejected(tmp_path, "m.jsonl", text)
    assert r.source.endswith("m.jsonl:2") and "not valid JSON" in r.reason and r.rule == "json"


def test_malformed_json_file_fails_naming_line_and_column(tmp_path):
    path = write(tmp_path / "broken.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",,}\n]')
    with pytest.raises(DataError, match=r"broken.json:3:\d+: not valid JSON"):
        load(path)
    with pytest.raises(DataError, match="expected a JSON array"):
        load(write(tmp_path / "obj.json", '"just a string"'))


@pytest.mark.parametrize("record, field, words", [
    ({"instruction": "q"}, "output", "missing"),
    ({"output": "a"}, "instruction", "missing"),
    ({"instruction": "q", "output": ["a", "b"]}, "output", "expected a string, got a list"),
    ({"instruction": "q", "output": {"text": "a"}}, "output", "got dict"),
    ({"instruction": "q", "output": "   "}, "output", "empty"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "history[0]", "pair"),
])
def test_alpaca_field_errors_name_the_field(tmp_path, record, field, words):
    r = rejected(tmp_path, "a.jsonl", [ALPACA[1], record])
    assert r.field == field and words in r.reason and r.source.endswith("a.jsonl:2")
    assert f"field {field!r}" in str(r)


@pytest.mark.parametrize("turns, field, words, rule", [
    ([{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}], "conversations[1].from",
     "unknown role 'robot'", "unknown_role"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}], "conversations[1].value", "empty",
     "empty_output"),
    ([{"from": "human", "value": "hi"}], "conversations", "no assistant", "no_assistant"),
    ([{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}], "conversations[0].value",
     "expected a string", "wrong_type"),
    ([{"value": "hi"}, {"from": "gpt", "value": "y"}], "conversations[0].from", "missing", "missing_field"),
    ([{"from": "human", "value": "q"}, {"from": "function_call", "value": "{bad"}], "conversations[1].value",
     "not valid JSON", "wrong_type"),
])
def test_sharegpt_errors_name_turn_and_field(tmp_path, turns, field, words, rule):
    r = rejected(tmp_path, "s.jsonl", [{"conversations": turns}])
    assert (r.field, r.rule) == (field, rule) and words in r.reason


def test_non_utf8_bytes(tmp_path):
    good = json.dumps(ALPACA[1]).encode()
    r = rejected(tmp_path, "b.jsonl", good + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n' + good + b"\n")
    assert r.source.endswith("b.jsonl:2") and "not valid UTF-8" in r.reason and r.rule == "utf8"
    with pytest.raises(DataError, match=r"b.json:3: byte 0xe9 .* not valid UTF-8"):
        load(write(tmp_path / "b.json", b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9"}]'))


def test_unsupported_files_and_missing_paths(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load(tmp_path / "nope.json")
    with pytest.raises(DataError, match="unsupported file type"):
        load(write(tmp_path / "x.xml", "<a/>"))
    with pytest.raises(DataError, match="no files match"):
        load(tmp_path / "*.jsonl")


# -------------------------------------------------------------------------------------------------------- cleaning
def test_whitespace_and_html_rules_keep_indentation_and_chat_markup():
    assert normalize_whitespace("  a  b\t c  \r\n\r\n\r\n\n    indented()   \n") == "a b c\n\n    indented()"
    html = "<p>Hello&nbsp;<b>world</b></p><think>keep</think><br>x"
    assert strip_html(html) == "Hello\xa0world\n<think>keep</think>\nx"


def test_cleaning_rules_report_what_they_removed():
    def conv(q, a):
        return Conversation([Message("user", q), Message("assistant", a)])

    convs = [conv("q", "a"), conv("q", "a"), conv(" <b> </b> ", "a"), conv("q2", "a" * 50), conv("q3", "tiny")]
    kept, report = clean_conversations(convs, CleanConfig(strip_html=True, min_chars=6, max_chars=40))
    assert report == {"strip_html (changed)": 1, "trim (changed)": 1, "drop_empty": 1, "dedup": 1,
                      "min_chars": 1, "max_chars": 1}
    assert [c.messages[0].content for c in kept] == ["q3"]
    kept, report = clean_conversations([conv("q", "a"), conv("q", "a")], CleanConfig(dedup=False))
    assert len(kept) == 2 and "dedup" not in report
