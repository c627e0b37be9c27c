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


def test_dataset_paths_are_relative_to_config(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    cfg = load_config(write(tmp_path, "data:\n  datasets:\n    - path: d.jsonl\n"))
    assert Path(cfg.data.datasets[0].path) == (tmp_path / "d.jsonl").resolve()


def test_validate_command(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, "train:\n  epochs: 2\n")), "train.seed=7"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2.0" in out and "seed: 7" in out
    assert main(["validate", str(write(tmp_path, "train:\n  epochz: 2\n"))]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err


def test_shipped_configs_validate():
    """Every YAML under configs/ and examples/ is a valid run config (globbed recursively)."""
    files = [p for d in ("configs", "examples") for p in (REPO / d).rglob("*.yaml")
             if "accelerate" not in p.parts and "deepspeed" not in p.parts]
    for path in files:
        load_config(path)


def test_cli_import_is_light():
    import subprocess
    import sys

    code = "import sys, tunelab.cli.main as m; m.build_parser(); " \
           "bad=[k for k in ('fastapi','gradio','bitsandbytes','torch') if k in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
