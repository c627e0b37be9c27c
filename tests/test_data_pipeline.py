"""prepare_data end to end (cache, rejects, split, stats), collators (packing == padding), preview and the CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tunelab.config.schema import DataConfig
from tunelab.data.collate import packing_collator, padding_collator
from tunelab.data.pipeline import prepare_data
from tunelab.data.preview import format_example, preview
from tunelab.data.templates import resolve_template
from tunelab.errors import DataError

REPO = Path(__file__).parents[1]
DEMO = REPO / "examples" / "demo" / "data"


@pytest.fixture(scope="module")
def llama_tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def records(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Reverse the order of these words: w{i} x{i} y{i}", "output": f"y{i} x{i} w{i}"}
            for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list, extra_lines: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "".join(extra_lines),
                    encoding="utf-8")
    return path


def prepare(cfg: DataConfig, tokenizer, **kwargs):
    return prepare_data(cfg, tokenizer, resolve_template(cfg.template, tokenizer), **kwargs)


def test_prepare_stats_split_and_artifacts(tmp_path, llama_tok):
    path = write_jsonl(tmp_path / "d.jsonl", records(40) + records(2), ["{broken\n"])
    cfg = DataConfig(datasets=[{"path": str(path)}], val_size=0.25, max_reject_ratio=0.1)
    data = prepare(cfg, llama_tok)
    s = data.stats
    assert (s["records_read"], s["rejected"]["total"], s["cleaning"]["dedup"]) == (43, 1, 2)
    assert s["rejected"]["by_reason"] == {"json": 1}
    assert (len(data.train), len(data.validation)) == (30, 10) and s["examples"] == 40
    assert s["length"]["max"] <= cfg.cutoff_len and s["tokens"] > s["trained_tokens"] > 0
    assert Path(s["histogram"]).read_bytes()[:4] == b"\x89PNG"
    reject = json.loads(Path(s["rejects_file"]).read_text().splitlines()[0])
    assert reject["source"].endswith("d.jsonl:43") and reject["rule"] == "json"
    assert (data.cache_dir / "chat_template.jinja").read_text() == llama_tok.chat_template
    assert data.cache_dir.parent == Path(os.environ["TUNELAB_DATA_CACHE"])
    assert set(data.train.column_names) == {"input_ids", "labels"}


def test_cache_is_reused_and_invalidated(tmp_path, llama_tok):
    path = write_jsonl(tmp_path / "d.jsonl", records(30))
    cfg = DataConfig(datasets=[{"path": str(path)}])
    first = prepare(cfg, llama_tok)
    again = prepare(cfg, llama_tok)
    assert not first.stats["cache_hit"] and again.stats["cache_hit"]
    assert again.fingerprint == first.fingerprint and again.train[0] == first.train[0]
    assert prepare(cfg.model_copy(update={"packing": False, "num_proc": 2}), llama_tok).stats["cache_hit"]
    assert prepare(cfg.model_copy(update={"cutoff_len": 64}), llama_tok).fingerprint != first.fingerprint
    chatml = prepare_data(cfg, llama_tok, resolve_template("chatml", llama_tok))
    assert chatml.fingerprint != first.fingerprint
    time.sleep(0.01)
    write_jsonl(path, records(31))  # the data changed
    changed = prepare(cfg, llama_tok)
    assert changed.fingerprint != first.fingerprint and changed.stats["examples"] == 31


def test_too_many_rejects_fail_with_reasons_and_a_rejects_file(tmp_path, llama_tok):
    bad = [{"instruction": "q", "output": ""}, {"instruction": "q"}, {"text_only": 1}]
    path = write_jsonl(tmp_path / "d.jsonl", records(10) + bad)
    cfg = DataConfig(datasets=[{"path": str(path)}])
    with pytest.raises(DataError) as e:
        prepare(cfg, llama_tok)
    message = str(e.value)
    assert "3 of 13 records rejected" in message and "empty_output: 1" in message and "missing_field: 2" in message
    assert "d.jsonl:11 field 'output': is empty" in message
    rejects_file = Path(message.rsplit("all rejects with reasons: ", 1)[1].strip())
    assert len(rejects_file.read_text().splitlines()) == 3
    assert prepare(cfg.model_copy(update={"max_reject_ratio": 0.5}), llama_tok).stats["examples"] == 10
    with pytest.raises(DataError, match="strict mode: .*d.jsonl:11"):
        prepare(cfg.model_copy(update={"strict": True, "max_reject_ratio": 0.5}), llama_tok)


def test_never_a_silently_empty_dataset(tmp_path, llama_tok):
    with pytest.raises(DataError, match="data.datasets is empty"):
        prepare(DataConfig(), llama_tok)
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "word " * 100, "output": "late"}])
    with pytest.raises(DataError, match=f"no trainable examples in {path}: .*1 with no trainable token.*cutoff_len=16"):
        prepare(DataConfig(datasets=[{"path": str(path)}], cutoff_len=16), llama_tok)


def test_mixing_datasets_with_caps_and_a_default_system(tmp_path, llama_tok):
    a = write_jsonl(tmp_path / "a.jsonl", records(20))
    b = write_jsonl(tmp_path / "b.jsonl", records(20, start=100))
    cfg = DataConfig(datasets=[{"path": str(a), "max_samples": 5}, {"path": str(b)}], system="Be brief.")
    data = prepare(cfg, llama_tok)
    assert [d["kept"] for d in data.stats["datasets"]] == [5, 20] and data.stats["examples"] == 25
    assert "Be brief." in llama_tok.decode(data.train[0]["input_ids"])


# ------------------------------------------------------------------------------------------------------ collators
def test_padding_and_packing_collators_shapes(llama_tok):
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    padded = padding_collator(llama_tok, pad_to_multiple_of=4)(examples)
    pad = llama_tok.pad_token_id
    assert padded["input_ids"].tolist() == [[1, 2, 3, pad], [4, 5, pad, pad]]
    assert padded["labels"].tolist() == [[-100, 2, 3, -100], [-100, 5, -100, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    packed = packing_collator()(examples)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5]] and "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert packed["input_ids"].dtype == packed["labels"].dtype == torch.long
    # the boundaries explicitly, as flash-attention's varlen kwargs (also read by tunelab's packed attention)
    assert packed["cu_seq_lens_q"].tolist() == packed["cu_seq_lens_k"].tolist() == [0, 3, 5]
    assert packed["max_length_q"] == packed["max_length_k"] == 3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_loss_equals_padded_loss_per_token(tiny_models, family):
    """Padding-free packing must not let examples attend to each other: same per-token loss as padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.encode import EncodeSettings, encode_batch
    from tunelab.data.types import Conversation, Message

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[family])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], attn_implementation="sdpa").eval()
    model.config.use_cache = False  # docs/pitfalls.md #1: with a cache, packed sequences are not detected
    convs = [Conversation([Message("user", "q " * n), Message("assistant", f"answer {n} " * (n % 3 + 1))])
             for n in (3, 11, 6)]
    examples, _ = encode_batch(convs, resolve_template("auto", tokenizer), tokenizer, EncodeSettings(256))

    def per_token(batch) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**batch).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
        return losses[labels != -100]

    padded = per_token(padding_collator(tokenizer)(examples))
    packed_batch = packing_collator()(examples)
    packed = per_token(packed_batch)
    assert padded.shape == packed.shape and padded.numel() > 20
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    wrong = per_token({"input_ids": packed_batch["input_ids"], "labels": packed_batch["labels"]})
    assert not torch.allclose(wrong, padded, atol=1e-3)  # the test can tell cross-attention apart


# -------------------------------------------------------------------------------------------------- preview, CLI
def test_preview_marks_trained_spans(llama_tok):
    ids = llama_tok("Q: hi A: yo<|eot_id|>", add_special_tokens=False)["input_ids"]
    cut = len(llama_tok("Q: hi A:", add_special_tokens=False)["input_ids"])
    example = {"input_ids": ids, "labels": [-100] * cut + ids[cut:]}
    assert format_example(example, llama_tok) == "Q: hi A:[[ yo<|eot_id|>]]"
    assert format_example(example, llama_tok, color=True) == "Q: hi A:\x1b[1;32m yo<|eot_id|>\x1b[0m"
    text = preview([example], llama_tok, n=3, color=False)
    assert text.startswith("--- example 0:") and "[[ yo<|eot_id|>]]" in text


def write_config(tmp_path: Path, model: Path, data: dict) -> Path:
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": str(model)}, "data": data}, allow_unicode=True), encoding="utf-8")
    return cfg


def test_cli_prepare_and_preview(tmp_path, tiny_models, capsys):
    from tunelab.cli.main import main

    data = {"dataset_dir": str(DEMO), "datasets": [{"name": "identity"}, {"name": "reverse_zh_train"}],
            "variables": {"name": "Tuney", "author": "实验室"}, "val_size": 4}
    cfg = write_config(tmp_path, tiny_models["qwen2"], data)
    assert main(["data", "prepare", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "records read" in out and "90" in out and "lengths.png" in out and "train 86, validation 4" in out
    assert main(["data", "preview", str(cfg), "data.seed=1", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- example") == 2 and "[[" in out and "<|im_end|>]]" in out
    assert "{name}" not in out and ("实验室" in out or "Tuney" in out)


def test_cli_reports_bad_data_without_traceback(tmp_path, tiny_models, capsys):
    from tunelab.cli.main import main

    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                   {"from": "wizard", "value": "x"}]}])
    cfg = write_config(tmp_path, tiny_models["llama"], {"datasets": [{"path": str(path)}]})
    assert main(["data", "prepare", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1 field 'conversations[1].from': unknown role 'wizard'" in err and "Traceback" not in err


def test_bundled_demo_data(tmp_path):
    """The shipped demo set: bilingual identity with placeholders filled, both formats, held-out words unseen."""
    from tunelab.config.schema import ModelConfig
    from tunelab.models.load import load_tokenizer

    registry = json.loads((DEMO / "dataset_info.json").read_text(encoding="utf-8"))
    cfg = DataConfig(dataset_dir=str(DEMO), datasets=[{"name": n} for n in registry if not n.startswith("identity")] +
                     [{"name": "identity"}], variables={"name": "Tuney", "author": "Lab"}, template="auto")
    tokenizer = load_tokenizer(ModelConfig())
    data = prepare(cfg, tokenizer)
    counts = {d["name"]: d["kept"] for d in data.stats["datasets"]}
    assert counts == {"reverse_en_train": 64, "reverse_en_test": 20, "reverse_zh_train": 32, "reverse_zh_extra": 48,
                      "reverse_zh_test": 10, "identity": 58}
    assert data.stats["rejected"]["total"] == 0 and data.stats["truncated"] == 0
    texts = [tokenizer.decode(ex["input_ids"]) for ex in data.train]
    assert any("我是Tuney" in t for t in texts) and not any("{name}" in t or "{author}" in t for t in texts)

    def words(name: str) -> set[str]:
        raw = (DEMO / registry[name]["file_name"]).read_text(encoding="utf-8")
        rows = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(x) for x in raw.splitlines()]
        return {w for r in rows for w in (r.get("output") or r["conversations"][1]["value"]).split()}

    assert not words("reverse_en_train") & words("reverse_en_test")
    assert not (words("reverse_zh_train") | words("reverse_zh_extra")) & words("reverse_zh_test")


def test_long_text_documents_are_chunked_not_truncated(tmp_path, llama_tok):
    """Plain text longer than cutoff_len: consecutive cutoff_len-token examples that together hold every token
    of the document (eos last); long_text=truncate keeps only the first cutoff_len tokens."""
    words = " ".join(f"word{i}" for i in range(400))
    doc = tmp_path / "doc.txt"
    doc.write_text(words + "\n短文本。\n", encoding="utf-8")
    cfg = DataConfig(datasets=[{"path": str(doc), "format": "text"}], cutoff_len=64, packing=False)
    data = prepare(cfg, llama_tok)
    whole = prepare(cfg.model_copy(update={"cutoff_len": 4096}), llama_tok).train[0]["input_ids"]  # one piece
    assert whole[-1] == llama_tok.eos_token_id and len(whole) > 3 * 64
    chunks = [ex["input_ids"] for ex in data.train][:-1]  # the last example is the short document
    assert len(chunks) == -(-len(whole) // 64) and all(len(c) == 64 for c in chunks[:-1])
    assert [t for c in chunks for t in c] == whole
    assert data.stats["chunked_documents"] == 1 and data.stats["truncated"] == 0
    assert llama_tok.decode(data.train[-1]["input_ids"], skip_special_tokens=True) == "短文本。"

    cut = prepare(cfg.model_copy(update={"long_text": "truncate"}), llama_tok)
    assert len(cut.train) == 2 and cut.stats["truncated"] == 1 and cut.stats["chunked_documents"] == 0
    assert cut.train[0]["input_ids"] == whole[:64]


# ----------------------------------------------------------------------------------- one builder for every caller
def test_tunelab_data_and_training_build_identical_data(tmp_path, tiny_models, monkeypatch, capsys):
    """`tunelab data prepare` and `tunelab train` build the same examples: same fingerprint, same token ids, each
    computed in its own cache (no cache hit can hide a difference). The template is applied: the tiny qwen2
    tokenizer brings its own qwen2.5 template and the config asks for chatml."""
    from datasets import load_from_disk

    from tunelab.cli.main import main
    from tunelab.data.pipeline import cache_root
    from tunelab.runs.read import RunInfo

    data = {"dataset_dir": str(DEMO), "datasets": [{"name": "identity"}], "template": "chatml",
            "variables": {"name": "Tuney", "author": "Lab"}, "val_size": 4}
    cfg = write_config(tmp_path, tiny_models["qwen2"], data)
    monkeypatch.setenv("TUNELAB_DATA_CACHE", str(tmp_path / "cache-data-command"))
    assert main(["data", "prepare", str(cfg)]) == 0
    printed = capsys.readouterr().out
    (from_cli,) = [p for p in (tmp_path / "cache-data-command").iterdir() if (p / "stats.json").is_file()]
    assert from_cli.name in printed and "chatml" in printed
    monkeypatch.setenv("TUNELAB_DATA_CACHE", str(tmp_path / "cache-training"))
    overrides = [f"train.output_dir={tmp_path / 'runs'}", "train.run_name=r", "train.max_steps=1",
                 "train.batch_size=2", "method.r=2"]
    assert main(["train", str(cfg), *overrides]) == 0
    run = tmp_path / "runs" / "r"
    info = RunInfo.read(run)
    assert info.data_fingerprint == from_cli.name and info.template == "chatml"
    from_training = tmp_path / "cache-training" / info.data_fingerprint
    assert from_training.parent == cache_root(DataConfig()) and (from_training / "stats.json").is_file()
    for split in ("train", "validation"):
        ours, theirs = load_from_disk(str(from_cli / split)), load_from_disk(str(from_training / split))
        assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]
        assert len(ours) > 0
    trained_template = (run / "chat_template.jinja").read_text(encoding="utf-8")
    assert (from_cli / "chat_template.jinja").read_text(encoding="utf-8") == trained_template
    assert "<|im_start|>" in trained_template and "Qwen" not in trained_template  # chatml, not qwen2.5


def test_every_data_caller_uses_the_one_builder(tmp_path, tiny_models, monkeypatch, capsys):
    """`tunelab data`, the web UI's Data tab and the demo call data.build.build_sft_data (the cli copy skipped
    apply_template, so its tokenizer did not carry the training template), and get a tokenizer that does."""
    from tunelab.cli.main import main
    from tunelab.config import load_config
    from tunelab.data import build
    from tunelab.demo import _show_data
    from tunelab.webui.data_tab import DataChoice, data_config, prepare

    calls = []

    def spy(cfg, tokenizer=None, **kwargs):
        prepared = real(cfg, tokenizer, **kwargs)
        calls.append(prepared)
        return prepared

    real = build.build_sft_data
    monkeypatch.setattr(build, "build_sft_data", spy)
    data = {"dataset_dir": str(DEMO), "datasets": [{"name": "identity"}], "template": "chatml",
            "variables": {"name": "Tuney", "author": "Lab"}}
    cfg = write_config(tmp_path, tiny_models["qwen2"], data)
    assert main(["data", "preview", str(cfg), "-n", "1"]) == 0
    _show_data(load_config(cfg))
    _, tokenizer, template = prepare(str(tiny_models["qwen2"]),
                                     data_config(DataChoice(dataset_dir=str(DEMO), name="identity", template="chatml")))
    capsys.readouterr()
    assert len(calls) == 3
    assert all(p.tokenizer.chat_template == p.template.jinja and p.template.name == "chatml" for p in calls)
    assert tokenizer.chat_template == template.jinja
