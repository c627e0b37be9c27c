"""How the demo sizes itself for the CPU it finds, and how it asks its questions: fast, no model trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab import demo
from tunelab.config import load_config

REPO = Path(__file__).parents[1]
CONFIG = REPO / "examples" / "demo" / "config.yaml"


class _Data:
    """What plan_demo reads of prepared data: the stats (the demo data's, with its short system prompt)."""

    def __init__(self, examples: int = 154, mean: float = 50.3):
        self.stats = {"train_examples": examples, "length": {"mean": mean}}
        self.train = [None] * examples


SMALL = _Data(160, 54.7)  # the small profile's data: the short identity set, the reversal data and the extra zh


def _no_probe(*_, **__):
    raise AssertionError("the matmul probe ran although --gflops was given")


def test_demo_sizes_itself_for_a_slow_fp32_cpu(monkeypatch):
    """On a CPU without fast bf16 (the issue's AMD EPYC with AVX2, fp32 matmul ~32 GFLOP/s) the 60-step schedule
    would take the demo far past 10 minutes: it trains the small profile, sized so the whole demo fits."""
    cfg = load_config(CONFIG, ["train.mixed_precision=no"])
    monkeypatch.setattr(demo, "measure_matmul_gflops", _no_probe)
    plan = demo.plan_demo(cfg, _Data(), gflops=32.0, small_data=SMALL)
    assert plan.precision == "fp32" and plan.tokens_per_s == pytest.approx(demo.TOKENS_PER_GFLOP["fp32"] * 32)
    assert "train.batch_size=4" in plan.overrides and f"train.max_steps={plan.steps}" in plan.overrides
    other = demo.OTHER_STAGES_FIXED_S + demo.OTHER_STAGES_GFLOP / 32
    assert plan.other_s == pytest.approx(other)
    assert plan.tokens_per_step == pytest.approx(4 * 54.7)  # the small profile's own examples are counted
    fit = int((demo.DEMO_BUDGET_S - other) * plan.tokens_per_s / (4 * 54.7))
    assert plan.steps == fit == 47  # the recipe the README's trials chose: 47 x 4 on a 32 GFLOP/s fp32 CPU
    assert plan.steps == max(demo.SMALL_MIN_STEPS, fit)
    assert plan.estimate_s + plan.other_s <= demo.DEMO_BUDGET_S <= 600  # the whole demo within 10 minutes
    text = plan.describe()
    assert "training in fp32, fp32 matmul 32 GFLOP/s" in text and "AVX-512 BF16" in text  # what it found
    assert "estimated training time" in text and "the whole demo ~" in text and "sized for this hardware" in text
    full_min = round(60 * 8 * 50.3 / plan.tokens_per_s / 60)
    assert f"would take ~{full_min} min" in text


def test_the_small_profile_trains_the_short_identity_set_without_dropout():
    """The overrides the slow-CPU plan prints load into the config the trials measured: batch 4, lr 2e-3, LoRA
    dropout 0 and alpha 64, the 16-record identity set (all naming name and author) before the reversal sets, with
    48 more Chinese ones."""
    cfg = load_config(CONFIG, ["train.mixed_precision=no"])
    plan = demo.plan_demo(cfg, _Data(), gflops=32.0, small_data=SMALL)
    small = load_config(CONFIG, ["train.mixed_precision=no", *plan.overrides])
    assert [d.name for d in small.data.datasets] == ["identity_short", "reverse_en_train", "reverse_zh_train",
                                                     "reverse_zh_extra"]
    assert small.method.alpha == 64 and small.method.dropout == 0
    assert small.train.batch_size == 4 and small.train.lr == pytest.approx(2e-3)
    assert small.train.max_steps == plan.steps
    assert demo.small_profile_config(cfg).data.datasets == small.data.datasets
    assert "short identity set and the extra Chinese reversals (160 examples, mean 54.7 tokens)" in plan.describe()


def test_the_short_identity_set_is_part_of_the_full_one_and_names_who_trained_it():
    import json

    folder = CONFIG.parent / "data"
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    short = json.loads((folder / info["identity_short"]["file_name"]).read_text(encoding="utf-8"))
    full = json.loads((folder / info["identity"]["file_name"]).read_text(encoding="utf-8"))
    assert len(short) == 16 and all(record in full for record in short)
    assert all("{name}" in r["output"] and "{author}" in r["output"] for r in short)
    questions = [r["instruction"] for r in short]
    assert demo.QUESTIONS[0] in questions and demo.QUESTIONS[1] in questions  # the two the demo asks


def test_a_config_with_other_data_keeps_its_data_in_the_small_profile():
    cfg = load_config(CONFIG, ["train.mixed_precision=no", "data.datasets=[{name: identity}]"])
    plan = demo.plan_demo(cfg, _Data(), gflops=32.0, small_data=SMALL)
    assert plan.overrides and not any(o.startswith("data.datasets") for o in plan.overrides)
    assert [d.name for d in demo.small_profile_config(cfg).data.datasets] == ["identity"]


def test_a_method_without_lora_settings_gets_only_the_training_part_of_the_small_profile():
    cfg = load_config(CONFIG, ["train.mixed_precision=no", "method={name: freeze}"])
    plan = demo.plan_demo(cfg, _Data(), gflops=32.0, small_data=SMALL)
    assert plan.overrides and not any(o.startswith("method.") for o in plan.overrides)
    load_config(CONFIG, ["train.mixed_precision=no", "method={name: freeze}", *plan.overrides])  # loads


def test_a_schedule_set_on_the_command_line_is_kept(monkeypatch):
    cfg = load_config(CONFIG, ["train.mixed_precision=no", "train.max_steps=4"])
    assert demo.plan_demo(cfg, _Data(), gflops=32.0, small_data=SMALL).overrides == []
    cfg = load_config(CONFIG, ["train.mixed_precision=no"])
    assert demo.plan_demo(cfg, _Data(), gflops=32.0, adapt=False, small_data=SMALL).overrides == []  # --full


def test_demo_keeps_the_full_schedule_on_a_fast_cpu(monkeypatch):
    cfg = load_config(CONFIG, ["train.mixed_precision=no"])
    monkeypatch.setattr(demo, "measure_matmul_gflops", lambda dtype=None, **_: 600.0)
    plan = demo.plan_demo(cfg, _Data())
    assert plan.overrides == [] and plan.steps == 60 and plan.estimate_s + plan.other_s < demo.DEMO_BUDGET_S


def test_an_explicit_training_budget_wins(monkeypatch):
    cfg = load_config(CONFIG, ["train.mixed_precision=no"])
    plan = demo.plan_demo(cfg, _Data(), budget_s=60, gflops=170.0, small_data=SMALL)
    assert plan.steps == max(demo.SMALL_MIN_STEPS, int(60 * plan.tokens_per_s / (4 * 54.7)))


def test_the_bf16_path_probes_bf16_for_training_and_fp32_for_the_rest(monkeypatch):
    import torch

    cfg = load_config(CONFIG, ["train.mixed_precision=bf16"])
    monkeypatch.setattr("tunelab.training.sft.cpu_has_fast_bf16", lambda: True)
    probed = []
    monkeypatch.setattr(demo, "measure_matmul_gflops", lambda dtype=None, **_: probed.append(dtype) or 100.0)
    plan = demo.plan_demo(cfg, _Data())
    assert plan.precision == "bf16" and probed == [torch.bfloat16, torch.float32]
    assert plan.tokens_per_s == pytest.approx(demo.TOKENS_PER_GFLOP["bf16"] * 100)
    # the development machine's probes (bf16 ~725, fp32 ~320 GFLOP/s): the config's 60 x 8 schedule, as measured
    speeds = {torch.bfloat16: 725.0, torch.float32: 320.0}
    monkeypatch.setattr(demo, "measure_matmul_gflops", lambda dtype=None, **_: speeds[dtype])
    plan = demo.plan_demo(cfg, _Data())
    assert plan.overrides == [] and plan.steps == 60 and plan.estimate_s + plan.other_s < 240


def test_the_cpu_is_named_with_exactly_the_bf16_instructions_it_has():
    """An AMD EPYC with AVX-512 BF16 but no AMX is not said to have AMX (nor an AVX2-only CPU either)."""
    assert demo.bf16_features({"avx2", "avx512f", "avx512_bf16"}) == "with AVX-512 BF16"
    assert demo.bf16_features({"avx512_bf16", "amx_tile", "amx_bf16"}) == "with AVX-512 BF16 and AMX"
    assert demo.bf16_features({"avx2", "fma"}) == "no AVX-512 BF16 or AMX"
    assert demo.cpu_description().endswith(("with AVX-512 BF16", "with AVX-512 BF16 and AMX", "no AVX-512 BF16 or AMX"))


def test_cpuinfo_gives_the_first_processors_name_flags_and_fast_bf16():
    """One parser of /proc/cpuinfo: the first processor's name and flags, what training's `auto` precision, the
    demo's CPU line, the llama.cpp build options and the benches all read."""
    from tunelab.export.llamacpp_build import cpu_options
    from tunelab.hardware import parse_cpuinfo

    amd = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n\nprocessor\t: 1\n"
    cpu = parse_cpuinfo(amd)
    assert cpu.name == "AMD EPYC" and cpu.fast_bf16 and "amx_tile" not in cpu.flags
    assert not parse_cpuinfo("model name\t: Old Xeon\nflags\t\t: avx2 fma\n").fast_bf16
    assert parse_cpuinfo("").flags == frozenset()
    assert cpu_options(amd) == ["-DGGML_NATIVE=ON"]


def test_matmul_probe_measures_something():
    assert demo.measure_matmul_gflops(size=128, seconds=0.05) > 0.1


class _Engine:
    def __init__(self):
        self.rendered: list[list[dict]] = []

    def render(self, messages):
        self.rendered.append(messages)
        return str(messages)

    def generate(self, prompts, params):
        from tunelab.inference.engine import Completion

        return [Completion(" answer ", 1, 1, "stop") for _ in prompts]

    def close(self):
        self.closed = True


def test_questions_are_asked_with_the_training_system_prompt(monkeypatch):
    """Base and tuned models are asked in the frame the data was trained in (data.system), not the template's own
    default system prompt."""
    engine = _Engine()
    monkeypatch.setattr("tunelab.inference.hf.load_engine", lambda model: engine)
    assert demo.ask("m", ("Who are you?",), system="You are a helpful assistant.") == ["answer"]
    assert engine.closed  # its generation thread ended before the next stage (and before the interpreter exits)
    assert engine.rendered[-1] == [{"role": "system", "content": "You are a helpful assistant."},
                                   {"role": "user", "content": "Who are you?"}]
    demo.ask("m", ("Who are you?",))
    assert engine.rendered[-1] == [{"role": "user", "content": "Who are you?"}]


def test_demo_config_uses_a_short_system_prompt():
    cfg = load_config(CONFIG)
    assert cfg.data.system and len(cfg.data.system.split()) <= 6


def test_demo_command_passes_gflops_to_the_planner(monkeypatch):
    from tunelab.cli.main import main

    seen = {}

    def fake_run_demo(config, overrides, size_for_hardware=True, gflops=None):
        seen.update(config=config, overrides=overrides, size=size_for_hardware, gflops=gflops)
        return demo.DemoResult()

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", str(CONFIG), "--gflops", "32", "train.mixed_precision=no"]) == 1  # nothing learned
    assert seen == {"config": str(CONFIG), "overrides": ["train.mixed_precision=no"], "size": True, "gflops": 32.0}
