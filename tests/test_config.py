"""Config loading: defaults, overrides, every error at once with dotted paths and valid keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.config import ConfigError, load_config
from tunelab.config.schema import LoraConfig, PrefixConfig, QLoraConfig

REPO = Path(__file__).parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1.0e-4\n"), ["train.batch_size=4", "method.r=16"])
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 4
    assert isinstance(cfg.method, LoraConfig) and cfg.method.r == 16
    assert cfg.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_method_union_selects_by_name(tmp_path):
    cfg = load_config(write(tmp_path, "method:\n  name: qlora\n  bits: 4\n"))
    assert isinstance(cfg.method, QLoraConfig) and cfg.method.quant_type == "nf4"
    cfg = load_config(None, ["method.name=prefix", "method.num_virtual_tokens=8"])
    assert isinstance(cfg.method, PrefixConfig) and cfg.method.num_virtual_tokens == 8


def test_unknown_keys_name_path_and_valid_keys(tmp_path):
    text = "train:\n  lrr: 1\n  batch_size: -3\nmethod:\n  name: lora\n  rank: 4\nbogus: 1\n"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert "train.lrr: unknown key" in msg and "batch_size" in msg.split("train.lrr")[1]
    assert "method.rank: unknown key" in msg and "alpha" in msg
    assert "bogus: unknown key" in msg
    assert "train.batch_size" in msg  # every error at once
    assert len(e.value.problems) == 4


def test_unknown_method_name_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.name=lorax"])
    assert "lora" in str(e.value) and "prefix" in str(e.value)


def test_method_errors_read_as_with_a_hand_written_union():
    """The method section is validated against the registry; the messages are those of the closed union it was."""
    problems = {}
    for override in (["method.name=lorax"], ["method.name=qlora", "method.rr=1"], ["method.r=0"],
                     ["method={name: freeze, trainable_layers: x}"]):
        with pytest.raises(ConfigError) as e:
            load_config(None, override)
        problems[override[-1]] = e.value.problems
    assert problems == {
        "method.name=lorax": [("method: Input tag 'lorax' found using 'name' does not match any of the expected tags: "
                               "'lora', 'dora', 'qlora', 'full', 'freeze', 'prefix'")],
        "method.rr=1": [("method.rr: unknown key; valid keys here: alpha, bits, compute_dtype, double_quant, dropout, "
                         "init_from, modules_to_save, name, quant_type, r, rslora, target_modules")],
        "method.r=0": ["method.r: Input should be greater than or equal to 1 (got 0)"],
        "method={name: freeze, trainable_layers: x}": [
            "method.trainable_layers: Input should be a valid integer, unable to parse string as an integer (got 'x')"],
    }
    cfg = load_config(None, ["method.name=dora"])
    cfg.method = {"name": "prefix", "num_virtual_tokens": 4}  # assignment is validated the same way
    assert isinstance(cfg.method, PrefixConfig) and cfg.model_dump()["method"]["num_virtual_tokens"] == 4


def test_dataset_paths_are_relative_to_config(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    cfg = load_config(write(tmp_path, "data:\n  datasets:\n    - path: d.jsonl\n"))
    assert Path(cfg.data.datasets[0].path) == (tmp_path / "d.jsonl").resolve()


def test_validate_command(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    data = "data:\n  datasets:\n    - path: d.jsonl\n"
    assert main(["validate", str(write(tmp_path, data + "train:\n  epochs: 2\n")), "train.seed=7"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2.0" in out and "seed: 7" in out
    assert main(["validate", str(write(tmp_path, "train:\n  epochz: 2\n"))]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err
    assert main(["validate", "--no-data", str(write(tmp_path, "serve:\n  port: 9000\n"))]) == 0


def test_validate_reports_every_data_problem_before_anything_starts(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text('{"known": {"file_name": "k.json"}}')
    (tmp_path / "data" / "k.json").write_text("[]")
    (tmp_path / "empty.jsonl").write_text("  \n")
    cfg = write(tmp_path, "data:\n  dataset_dir: data\n  template: chatmlx\n  datasets:\n"
                "    - path: missing.jsonl\n    - path: none/*.jsonl\n    - name: unknown\n    - name: known\n"
                "    - path: empty.jsonl\n")
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"invalid config {cfg}" in err
    assert "data.datasets[0] (missing.jsonl): dataset file not found" in err
    assert "data.datasets[1] (" in err and "no files match" in err
    assert "data.datasets[2] (unknown): " in err and "'unknown' is not registered; known: known" in err
    assert "data.datasets[3]" not in err  # registered and present (its content is checked when it is read)
    assert f"data.datasets[4] ({tmp_path / 'empty.jsonl'}): {tmp_path / 'empty.jsonl'}: the file is empty" in err
    assert "data.template: unknown chat template 'chatmlx'" in err
    assert main(["validate", str(write(tmp_path, "train:\n  epochs: 2\n"))]) == 2
    assert "data.datasets: empty; add at least one dataset" in capsys.readouterr().err


def test_data_prepare_lists_every_data_problem_first(tmp_path, capsys):
    (tmp_path / "empty.json").write_text("\n")
    cfg = write(tmp_path, "data:\n  datasets:\n    - path: gone.jsonl\n    - path: empty.json\n")
    assert main(["data", "prepare", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "data.datasets[0] (gone.jsonl): dataset file not found" in err and "empty.json: the file is empty" in err


def test_data_check_is_a_library_call_for_the_web_ui(tmp_path):
    from tunelab.config.load import config_from_dict
    from tunelab.data.check import check_data, data_problems

    cfg = config_from_dict({"data": {"datasets": [{"path": str(tmp_path / "gone.json")}]}}, "from the form")
    with pytest.raises(ConfigError, match=r"(?s)invalid config from the form:.*data\.datasets\[0\].*not found"):
        check_data(cfg, "from the form")
    assert data_problems(config_from_dict({"data": {"datasets": [{"path": str(REPO / "examples")}]}})) == []


def test_shipped_configs_validate():
    """Every YAML under configs/ and examples/ is a valid run config (globbed recursively)."""
    files = [p for d in ("configs", "examples") for p in (REPO / d).rglob("*.yaml")
             if "accelerate" not in p.parts and "deepspeed" not in p.parts]
    for path in files:
        cfg = load_config(path)
        # the data of configs that ship it exists too (configs/data/ shows layouts for the user's own files)
        if cfg.data.datasets and path.parent != REPO / "configs" / "data":
            from tunelab.data.check import data_problems

            assert data_problems(cfg) == [], path


def test_cli_import_is_light():
    import subprocess
    import sys

    code = "import sys, tunelab.cli.main as m; m.build_parser(); " \
           "bad=[k for k in ('fastapi','gradio','bitsandbytes','torch') if k in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
