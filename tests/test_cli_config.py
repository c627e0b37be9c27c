"""One config dialect: every command that reads a config takes `a.b=c` overrides, its flags are aliases of config
keys documented by the schema, and one precedence rule orders defaults, environment, file, flags and overrides."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from tunelab.cli.common import Setting, add_settings, config_from_args, flag_values, schema_field
from tunelab.cli.main import COMMANDS, build_parser, main, parse_command_line
from tunelab.config import ConfigError, load_config


def parse(*argv: str) -> argparse.Namespace:
    return parse_command_line(build_parser(), list(argv))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A run folder as far as the CLI's config reading goes: its resolved config.yaml."""
    run = tmp_path / "runs" / "r1"
    (run / "final").mkdir(parents=True)
    write(run / "config.yaml", "train:\n  threads: 3\nserve:\n  port: 9001\nexport:\n  gguf: [q8_0]\n")
    write(run / "run.json", '{"status": "done"}')
    return run


def command_config(args: argparse.Namespace):
    """The RunConfig a command would run with, computed the way its run() does, without loading a model."""
    module = importlib.import_module(f"tunelab.cli.{args._module}")
    if args.command == "train":
        return module.load_run_config(args)
    if args.command == "eval":
        return module.run_config(args)
    if args.command == "chat":
        return module.chat_config(args)
    if args.command == "serve":
        return module.run_config(args)
    return config_from_args(args)


def test_every_config_command_takes_overrides_after_options_too(tmp_path, run_dir):
    cfg_file = write(tmp_path / "c.yaml", "serve:\n  port: 9001\n")
    argvs = {
        "train": ["train", str(cfg_file), "serve.port=9123"],
        "data": ["data", "preview", str(cfg_file), "-n", "2", "serve.port=9123"],
        "validate": ["validate", str(cfg_file), "--no-data", "serve.port=9123"],
        "serve": ["serve", "some/model", "--max-queue", "3", "serve.port=9123"],
        "eval": ["eval", str(run_dir), "serve.port=9123", "--max-samples", "2"],
        "chat": ["chat", str(run_dir), "-p", "hi", "serve.port=9123"],
        "webui": ["webui", "--lang", "zh", "serve.port=9123"],
    }
    for name, argv in argvs.items():
        cfg = command_config(parse(*argv))
        assert cfg.serve.port == 9123, name
    # export reads the export section: the run's, then the override
    args = parse("export", str(run_dir), "--no-sample", "export.gguf=[f16,q4_0]")
    assert importlib.import_module("tunelab.cli.export").export_config(args).gguf == ["f16", "q4_0"]
    args = parse("export", str(run_dir))
    assert importlib.import_module("tunelab.cli.export").export_config(args).gguf == ["q8_0"]


def test_an_override_is_not_taken_for_a_model(run_dir):
    args = parse("eval", "eval.max_samples=2", "--compare", str(run_dir), "eval.batch_size=2")
    cfg = command_config(args)
    assert args.model is None and args.compare == [str(run_dir)]
    assert (cfg.eval.max_samples, cfg.eval.batch_size) == (2, 2)
    args = parse("chat", "model.device=cpu")
    assert command_config(args).model.device == "cpu" and args.model is None


def test_run_commands_start_from_the_runs_own_config(run_dir):
    for argv in (["serve", str(run_dir)], ["eval", str(run_dir)], ["chat", str(run_dir)]):
        cfg = command_config(parse(*argv))
        assert (cfg.train.threads, cfg.serve.port) == (3, 9001), argv
    assert command_config(parse("chat", str(run_dir), "--threads", "1")).train.threads == 1


@pytest.mark.parametrize("argv, key, valid", [
    (["serve", "some/model", "serve.prot=1"], "serve.prot", "port"),
    (["eval", "some/model", "eval.max_sample=1"], "eval.max_sample", "max_samples"),
    (["export", "some/model", "export.ggu=[f16]"], "export.ggu", "gguf"),
    (["chat", "some/model", "model.devise=cpu"], "model.devise", "device"),
    (["webui", "train.thread=2"], "train.thread", "threads"),
    (["validate", "--no-data", "CFG", "train.lrr=1"], "train.lrr", "lr"),
])
def test_a_misspelled_override_names_the_key_and_the_valid_ones(argv, key, valid, tmp_path, capsys):
    argv = [str(write(tmp_path / "c.yaml", "{}\n")) if a == "CFG" else a for a in argv]
    assert main(argv) == 2  # before any model, server or browser UI is loaded
    err = capsys.readouterr().err
    assert f"{key}: unknown key; valid keys here:" in err
    assert valid in err.split(key, 1)[1].splitlines()[0].split(", ")


def test_a_bad_flag_value_is_a_config_error_naming_the_key(capsys):
    assert main(["serve", "some/model", "--port", "70000"]) == 2
    assert "serve.port: Input should be less than or equal to 65535 (got 70000)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the schema's choices are argparse choices: refused while parsing
        parse("eval", "m", "--device", "tpu")


def test_precedence_default_env_file_flag_override(tmp_path, monkeypatch):
    """schema default < environment variable < config file < flag < a.b=c override (README, Configuration)."""
    from tunelab.config.schema import DataConfig
    from tunelab.data.pipeline import cache_root
    from tunelab.models.resolve import cache_root as model_cache_root

    cfg_file = write(tmp_path / "c.yaml", f"serve:\n  port: 9001\n  api_keys: [sk-file]\ndata:\n  cache_dir: "
                                          f"{tmp_path / 'from-file'}\n")
    assert config_from_args(parse("serve", "m")).serve.port == 8000  # schema default
    args = parse("serve", "m", "--config", str(cfg_file))
    assert config_from_args(args).serve.port == 9001  # file over default
    args = parse("serve", "m", "--config", str(cfg_file), "--port", "9002")
    assert config_from_args(args).serve.port == 9002  # flag over file
    args = parse("serve", "m", "--config", str(cfg_file), "serve.port=9003", "--port", "9002")
    assert config_from_args(args).serve.port == 9003  # override over flag, wherever it is written
    args = parse("serve", "m", "--config", str(cfg_file), "--api-key", "sk-flag")
    assert config_from_args(args).serve.api_keys == ["sk-file", "sk-flag"]  # --api-key adds to the config's keys
    # the environment stands in for what nobody wrote, and never beats the config
    monkeypatch.setenv("TUNELAB_DATA_CACHE", str(tmp_path / "from-env"))
    assert cache_root(DataConfig()) == tmp_path / "from-env"
    assert cache_root(load_config(cfg_file).data) == tmp_path / "from-file"
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "env-models"))
    assert model_cache_root() == tmp_path / "env-models"
    assert model_cache_root(str(tmp_path / "cfg-models")) == tmp_path / "cfg-models"


def test_webui_password_flag_beats_the_environment(monkeypatch):
    from tunelab.config.load import from_environment

    monkeypatch.setenv("TUNELAB_WEBUI_PASSWORD", "env-pw")
    assert from_environment(None, "TUNELAB_WEBUI_PASSWORD") == "env-pw"
    assert from_environment("flag-pw", "TUNELAB_WEBUI_PASSWORD") == "flag-pw"
    monkeypatch.delenv("TUNELAB_WEBUI_PASSWORD")
    assert from_environment(None, "TUNELAB_WEBUI_PASSWORD") is None


def test_flags_take_help_type_and_default_from_the_schema():
    """No default written twice: every config flag is None unless given, its help quotes the schema."""
    checked = 0
    for module_name, _help in COMMANDS.values():
        module = importlib.import_module(f"tunelab.cli.{module_name}")
        for s in (*getattr(module, "SETTINGS", ()), *getattr(module, "SAMPLING", ())):
            field = schema_field(s.key)
            assert field.description, f"{s.key} has no description in the schema"
            parser = argparse.ArgumentParser()
            add_settings(parser, [s])
            action = next(a for a in parser._actions if s.flag in a.option_strings)
            assert action.default is None
            assert field.description.rstrip(".") in action.help and f"Config key {s.key}" in action.help
            checked += 1
    assert checked >= 40
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "TCP port to listen on. Config key serve.port; default: 8000" in " ".join(help_text.split())


def test_setting_types_follow_the_annotation():
    parser = argparse.ArgumentParser()
    add_settings(parser, [Setting("--cutoff", "data.cutoff_len"), Setting("--gguf", "export.gguf"),
                          Setting("--ollama", "export.ollama"), Setting("--dtype", "model.dtype")])
    args = parser.parse_args(["--cutoff", "64", "--gguf", "f16", "--gguf", "q8_0", "--ollama"])
    assert flag_values(args) == {"data.cutoff_len": 64, "export.gguf": ["f16", "q8_0"], "export.ollama": True}
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int3"])


def test_flag_values_are_not_parsed_as_yaml():
    args = parse("serve", "m", "--model-name", "123", "--host", "::1")
    cfg = config_from_args(args)
    assert cfg.serve.model_name == "123" and cfg.serve.host == "::1"


def test_chat_sampling_flags_default_to_generation_params():
    from tunelab.cli.chat import params_from_config
    from tunelab.inference.engine import GenerationParams

    assert params_from_config(command_config(parse("chat", "m"))) == GenerationParams()
    params = params_from_config(command_config(parse("chat", "m", "--top-k", "5", "--seed", "3", "--stop", "END")))
    assert (params.top_k, params.seed, params.stop) == (5, 3, ["END"])


def test_chat_sampling_flag_and_override_are_one_key(tmp_path):
    """--temperature is an alias of generation.temperature: file < flag < override, as for every key."""
    from tunelab.cli.chat import params_from_config

    cfg_file = write(tmp_path / "c.yaml", "generation:\n  temperature: 0.3\n  stop: [FILE]\n")
    assert command_config(parse("chat", "m", "--config", str(cfg_file))).generation.temperature == 0.3
    assert command_config(parse("chat", "m", "--temperature", "0.7")).generation.temperature == 0.7
    assert command_config(parse("chat", "m", "generation.temperature=0.7")).generation.temperature == 0.7
    args = parse("chat", "m", "--config", str(cfg_file), "--temperature", "0.5", "generation.temperature=0.9",
                 "--stop", "FLAG")
    params = params_from_config(command_config(args))
    assert params.temperature == 0.9 and params.stop == ["FILE", "FLAG"]
    with pytest.raises(ConfigError, match="generation.temperature"):
        command_config(parse("chat", "m", "generation.temperature=-1"))


def test_webui_flags_are_keys_of_the_webui_section(tmp_path, monkeypatch):
    from tunelab.config.load import dump_config, from_environment

    assert command_config(parse("webui")).webui.model_dump() == {"host": "127.0.0.1", "port": 7860,
                                                                  "password": None, "lang": "en"}
    cfg = command_config(parse("webui", "--port", "7861", "--lang", "zh", "--host", "::1"))
    assert (cfg.webui.port, cfg.webui.lang, cfg.webui.host) == (7861, "zh", "::1")
    assert command_config(parse("webui", "--port", "7861", "webui.port=7862")).webui.port == 7862
    cfg_file = write(tmp_path / "c.yaml", "webui:\n  password: file-pw\n")
    monkeypatch.setenv("TUNELAB_WEBUI_PASSWORD", "env-pw")  # below the file and the flag
    assert from_environment(command_config(parse("webui")).webui.password, "TUNELAB_WEBUI_PASSWORD") == "env-pw"
    cfg = command_config(parse("webui", "--config", str(cfg_file)))
    assert from_environment(cfg.webui.password, "TUNELAB_WEBUI_PASSWORD") == "file-pw"
    cfg = command_config(parse("webui", "--config", str(cfg_file), "--password", "flag-pw"))
    assert cfg.webui.password == "flag-pw"
    assert "flag-pw" not in dump_config(cfg)  # a run's config.yaml never holds the page's password
    with pytest.raises(SystemExit):  # the schema's choices
        parse("webui", "--lang", "fr")


def test_webui_help_comes_from_the_schema(capsys):
    from tunelab.config.schema import WebUIConfig

    with pytest.raises(SystemExit):
        main(["webui", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in ("host", "port", "password", "lang"):
        description = " ".join(WebUIConfig.model_fields[name].description.rstrip(".").split())
        assert f"{description}. Config key webui.{name}" in help_text


def test_serve_and_export_flags_are_config_keys(run_dir):
    cfg = command_config(parse("serve", "m", "--shutdown-timeout", "5", "--engine", "hf", "--allow-no-auth"))
    assert (cfg.serve.shutdown_timeout_s, cfg.serve.engine, cfg.serve.allow_no_auth) == (5.0, "hf", True)
    assert command_config(parse("serve", "m")).serve.model_dump(include={"engine", "allow_no_auth"}) == {
        "engine": "hf", "allow_no_auth": False}
    with pytest.raises(ConfigError, match="serve.engine: unknown inference engine; known: hf, vllm"):
        command_config(parse("serve", "m", "serve.engine=tgi"))
    export = importlib.import_module("tunelab.cli.export").export_config
    cfg = export(parse("export", str(run_dir), "--no-table", "--verify", "--overwrite"))
    assert (cfg.table, cfg.verify, cfg.overwrite) == (False, True, True)
    cfg = export(parse("export", str(run_dir)))
    assert (cfg.table, cfg.verify, cfg.overwrite) == (True, False, False)
    assert export(parse("export", str(run_dir), "export.table=false")).table is False


def test_chat_runs_with_overrides(tiny_llama, capsys):
    assert main(["chat", str(tiny_llama), "-p", "hi", "--max-new-tokens", "2", "model.device=cpu",
                 "train.threads=1"]) == 0


def test_config_errors_still_name_the_source(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid config .*c\.yaml"):
        load_config(write(tmp_path / "c.yaml", "serve:\n  port: x\n"), flags={"serve.host": "::1"})


def test_serve_and_eval_load_models_with_the_model_settings_chat_uses(run_dir):
    from tunelab.cli import evaluate, serve

    args = parse("serve", str(run_dir), "--dtype", "bfloat16", "--device", "cpu", "model.quantize=int8")
    options = serve.engine_options(command_config(args))
    assert (options.dtype, options.device, options.quantize, options.threads) == ("bfloat16", "cpu", "int8", 3)
    args = parse("eval", str(run_dir), "--dtype", "float16", "--template", "vicuna")
    options = evaluate.engine_options(args, command_config(args))
    assert (options.dtype, options.template) == ("float16", "vicuna")
