"""Training-speed benchmark (issue #7): tunelab against the plain Hugging Face recipe and TRL, in one run.

Every arm fine-tunes the same model with the same LoRA adapter (r=8, alpha 16, dropout 0.05 on q,k,v,o,gate,up,
down), the same hyperparameters (lr 2e-4 cosine, batch 8, seed 42) and the same tokenized examples in the same
order: the first steps x batch examples of a synthetic Alpaca-like data set (English and Chinese, lengths from a
few tokens to the cutoff), one pass. Arms, each in its own subprocess so peak RSS is its own:

  plain      the seeds' recipe: Trainer + DataCollatorForSeq2Seq (pad to the longest) + PEFT LoRA, fp32 weights
  trl        TRL SFTTrainer with its defaults (bf16 autocast, gradient checkpointing, padded batches)
  trl_fast   TRL SFTTrainer at its fastest for this data: padding_free, bf16 autocast, no gradient checkpointing
  tunelab    tunelab.training.sft.train with tunelab's defaults

A second table repeats the arms with gradient checkpointing on. MFU is achieved model FLOP/s over the peak of a
matmul microbenchmark (fp32 and bf16) measured in the same run. Model: the embedded SmolLM2-135M-Instruct on CPU,
a Qwen2.5-0.5B-sized random-weight model on CUDA (speed does not depend on weight values).

    python bench/train.py                      # CPU: ~10-15 minutes on 2 cores
    python bench/train.py --steps 4 --no-gc    # a quick look
    python bench/train.py --device cuda --steps 30
    python bench/train.py --precision fp32 --isa avx2   # AVX2 kernels only (MKL, oneDNN, ATen), every arm

Results: a table on stdout and bench/results/train.{json,md} (git-ignored). Nothing else is written to the repo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
LORA = {"r": 8, "alpha": 16, "dropout": 0.05,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
HYPER = {"lr": 2e-4, "scheduler": "cosine", "seed": 42}
ARMS = ("plain", "trl", "trl_fast", "tunelab")
# --isa avx2: the environment that limits MKL, oneDNN and ATen's own kernels to AVX2 (read when each library
# starts, so it is set before torch is imported and the arm processes inherit it). On an AVX-512 CPU this shows the
# code path of an AVX2-only CPU, not its speed: clock, caches and cores stay the same. Measured on an AMD EPYC Zen 4
# (2026-12-02): ATen and oneDNN obey (bf16 matmuls fall to ~2 GFLOP/s), MKL's sgemm does not change speed (even
# MKL_ENABLE_INSTRUCTIONS=SSE4_2 gave 170 GFLOP/s fp32, above SSE's ceiling there): on AMD CPUs MKL picks its own
# path, and Zen 4 runs AVX-512 as two 256-bit halves, so the fp32 matmul peak stays where it was.
ISA_ENV = {"avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
FP32_ARMS = ("plain", "trl_fast", "tunelab")  # --precision fp32: TRL's default arm differs only by recomputation

# ------------------------------------------------------------------------------------------------- synthetic data
EN = {
    "subj": ["The old farmer", "A young engineer", "My neighbour", "The committee", "Every student", "The small robot",
             "A curious cat", "The city council", "Our teacher", "The research team", "A travelling musician",
             "The baker", "Most scientists", "The museum guide", "A careful driver", "The village doctor"],
    "verb": ["built", "described", "carried", "painted", "studied", "explained", "repaired", "measured", "designed",
             "cleaned", "discovered", "compared", "planted", "organised", "tested", "improved"],
    "obj": ["a wooden bridge", "the river map", "a new garden", "the solar panel", "an ancient coin",
            "the train schedule", "a simple recipe", "the weather station", "a paper lantern", "the water pump",
            "a short poem", "the school library", "a mountain trail", "the bicycle chain", "a chess puzzle",
            "the harvest plan"],
    "tail": ["before sunrise.", "with great care.", "in the quiet village.", "for the first time.", "after the storm.",
             "without any help.", "during the long winter.", "to everyone's surprise.", "in less than an hour.",
             "because it was needed.", "next to the old market.", "while the children watched."],
    "link": ["", "", "", "However, ", "Then ", "As a result, ", "Later, ", "In addition, ", "Finally, "],
    "ask": ["Explain how {s} {v} {o}.", "Write a short paragraph about {o}.", "List a few facts about {o}.",
            "Describe the day when {s} {v} {o}.", "Summarize the following text.",
            "Give advice to someone who wants to study {o}.", "Is {o} useful? Answer yes or no.",
            "Name one thing {s} {v}."],
}
ZH = {
    "subj": ["老农民", "年轻的工程师", "我的邻居", "委员会", "每个学生", "小机器人", "好奇的猫", "市议会", "我们的老师", "研究小组"],
    "verb": ["建造了", "描述了", "搬运了", "画了", "研究了", "解释了", "修理了", "测量了", "设计了", "发现了"],
    "obj": ["一座木桥", "河流地图", "新的花园", "太阳能板", "一枚古钱币", "火车时刻表", "简单的食谱", "气象站", "纸灯笼", "水泵"],
    "tail": ["在日出之前。", "非常仔细地。", "在安静的村庄里。", "第一次。", "在暴风雨之后。", "没有任何帮助。", "在漫长的冬天里。",
             "让大家都很惊讶。"],
    "link": ["", "", "但是，", "然后，", "因此，", "后来，", "此外，"],
    "ask": ["请解释{s}是怎样{v}{o}的。", "写一段关于{o}的短文。", "列出关于{o}的几个事实。", "总结下面的文字。", "{o}有用吗？请回答是或否。"],
}


def _sentence(rng: random.Random, words: dict, zh: bool) -> str:
    s, v, o, t = (rng.choice(words[k]) for k in ("subj", "verb", "obj", "tail"))
    link = rng.choice(words["link"])
    if zh:
        return f"{link}{s}{v}{o}，{t}"
    return f"{link}{s[0].lower() + s[1:] if link else s} {v} {o} {t}"


def _paragraph(rng: random.Random, words: dict, zh: bool, n: int) -> str:
    parts = [_sentence(rng, words, zh) for _ in range(n)]
    if not zh and n >= 4 and rng.random() < 0.3:  # numbered lists, like many Alpaca answers
        return "\n".join(f"{i + 1}. {p}" for i, p in enumerate(parts))
    return ("" if zh else " ").join(parts)


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca records whose lengths spread like real Alpaca: a long tail up to the cutoff, a few one-word answers."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        zh = rng.random() < 0.25
        words = ZH if zh else EN
        ask = rng.choice(words["ask"])
        s, v, o = rng.choice(words["subj"]), rng.choice(words["verb"]), rng.choice(words["obj"])
        instruction = ask.format(s=s, v=v, o=o)
        given = _paragraph(rng, words, zh, min(12, max(1, round(rng.lognormvariate(math.log(4), 0.6))))) \
            if ("ummar" in ask or "总结" in ask) else ""
        if "yes or no" in ask or "是或否" in ask:
            output = rng.choice(["是。", "否。"] if zh else ["Yes.", "No."])
        else:
            sentences = min(80, max(1, round(rng.lognormvariate(math.log(6.5), 0.8))))
            output = _paragraph(rng, words, zh, sentences)
        records.append({"instruction": f"{instruction} (#{i})", "input": given, "output": output})
    return records


# ------------------------------------------------------------------------------------------------ setup (parent)
def tunelab_config(spec: dict, gradient_checkpointing: bool = False, method: str = "lora",
                   overrides: list[str] | None = None):
    """The tunelab arm's RunConfig: tunelab's defaults, plus what every arm shares (data, steps, batch, lr, seed),
    plus `overrides` ("train.sparse_logits=false") for the ablation arms."""
    from tunelab.config.load import apply_overrides
    from tunelab.config.schema import RunConfig

    return RunConfig.model_validate(apply_overrides({
        "model": {"name": spec["model"], "device": spec["device"]},
        "data": {"datasets": [{"path": spec["data_json"]}], "cutoff_len": spec["cutoff"]},
        "method": {"name": method, "r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                   "target_modules": LORA["targets"]},
        "train": {"output_dir": str(Path(spec["work"]) / "runs"), "max_steps": spec["steps"],
                  "batch_size": spec["batch_size"], "lr": HYPER["lr"], "scheduler": HYPER["scheduler"],
                  "seed": HYPER["seed"], "gradient_checkpointing": gradient_checkpointing, "logging_steps": 1},
    }, overrides or []))


def build_gpu_model(tokenizer_dir: Path, out: Path) -> Path:
    """A Qwen2.5-0.5B-shaped model with random weights and the embedded tokenizer (vocab padded like Qwen's)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prepare(args, work: Path) -> dict:
    """Write the data, tokenize it once with tunelab's pipeline, and describe the run for the arm processes."""
    from tunelab.config.schema import ModelConfig
    from tunelab.data.pipeline import prepare_data
    from tunelab.data.templates import apply_template, resolve_template
    from tunelab.models.load import load_tokenizer
    from tunelab.models.resolve import resolve_model_path

    model = Path(args.model) if args.model else resolve_model_path(ModelConfig())
    if args.device == "cuda" and not args.model:
        model = build_gpu_model(model, work / "qwen2.5-0.5b-random")
    records = synthetic_records(args.records)
    n = args.steps * args.batch_size
    if n > len(records):
        raise SystemExit(f"--steps x --batch-size = {n} needs more than --records {len(records)}")
    spec = {"model": str(model), "device": args.device, "cutoff": args.cutoff, "steps": args.steps,
            "batch_size": args.batch_size, "work": str(work), "data_json": str(work / "train.json")}
    tokenizer = load_tokenizer(ModelConfig(name=str(model)), model)
    template = resolve_template("auto", tokenizer)
    apply_template(tokenizer, template)
    every = work / "all.json"
    every.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    full = prepare_data(tunelab_config({**spec, "data_json": str(every)}).data, tokenizer, template)
    Path(spec["data_json"]).write_text(json.dumps(records[:n], ensure_ascii=False), encoding="utf-8")
    data = prepare_data(tunelab_config(spec).data, tokenizer, template)
    if len(data.train) != n:
        raise SystemExit(f"the first {n} records gave {len(data.train)} examples; every record must give one")
    data.train.save_to_disk(str(work / "tokenized"))
    lengths = [len(ids) for ids in data.train["input_ids"]]
    spec.update(dataset=str(work / "tokenized"), tokens=sum(lengths), lengths=lengths,
                trained_tokens=int(data.stats["trained_tokens"]), data_stats=full.stats["length"],
                data_examples=len(full.train))
    return spec


def matmul_peak(device: str, largest: int | None = None) -> dict:
    """Best FLOP/s of a square matmul in fp32 and bf16: the ceiling MFU is measured against. The size doubles from
    256 up to `largest` (2048 on CPU) while one product takes under 0.1 s, so a precision without fast kernels (bf16
    under --isa avx2 runs at ~2 GFLOP/s: 17 s per 2048 product) is measured at a size that fits in seconds."""
    import torch

    largest = largest or (2048 if device == "cpu" else 8192)
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = 256
        while n < largest and _product_seconds(n, dtype, device, repeats=1) < 0.1:
            n *= 2
        peak[name] = 2 * n**3 / _product_seconds(n, dtype, device, repeats=6)
    return peak


def _product_seconds(n: int, dtype, device: str, repeats: int) -> float:
    """Fastest of `repeats` n x n matmuls, after one untimed (kernel selection, first touch of the pages)."""
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def training_flops(model_dir: str, lengths: list[int]) -> float:
    """Model FLOPs of LoRA training on these examples: 4 x matmul parameters per token (forward, and the backward
    pass to the activations; frozen weights get no weight gradient) plus causal attention, 3 x its forward.
    Padding and recomputation (gradient checkpointing) are not useful work and are not counted."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head, c.num_key_value_heads * head
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    matmul_params = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
    tokens = sum(lengths)
    attention = sum(2 * 2 * (n * (n + 1) / 2) * q for n in lengths) * c.num_hidden_layers  # QK^T and PV, causal
    return 4 * matmul_params * tokens + 3 * attention


# ---------------------------------------------------------------------------------------------------- arms (child)
def _peft_lora():
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], task_type="CAUSAL_LM")


def _load_model(spec: dict):
    """How the seeds load a model: fp32 on CPU (their rule), bf16 on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if spec["device"] == "cpu" else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(spec["device"])


def _shared_args(spec: dict, arm: str) -> dict:
    """TrainingArguments every Hugging Face arm shares: same steps, batch, schedule, seed; no saving, no trackers."""
    return {"output_dir": str(Path(spec["work"]) / arm), "per_device_train_batch_size": spec["batch_size"],
            "max_steps": spec["steps"], "learning_rate": HYPER["lr"], "lr_scheduler_type": HYPER["scheduler"],
            "seed": HYPER["seed"], "logging_steps": 1, "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True, "use_cpu": spec["device"] == "cpu",
            "dataloader_pin_memory": spec["device"] == "cuda",
            # counted per step for the steady-state rate; padding-free rows have no attention_mask and hold
            # end-of-turn tokens equal to the pad id, so they count every token
            "include_num_input_tokens_seen": "all" if arm == "trl_fast" else "non_padding"}


def step_clock():
    """A TrainerCallback recording, at the end of every optimizer step, the time and the input tokens seen so far:
    steady-state speed is measured from the end of step 1 (set-up, first allocations) to the end of the run."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.seen = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.seen.append(int(state.num_input_tokens_seen))

        def result(self) -> dict:
            return {"step_ends": self.ends, "tokens_seen": self.seen}

    return StepClock()


def arm_plain(spec: dict, gc: bool) -> dict:
    """(a) The seeds' recipe: Trainer + DataCollatorForSeq2Seq(padding=True) + PEFT LoRA."""
    from datasets import load_from_disk
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    set_seed(HYPER["seed"])  # the adapters' random initialisation, as in every arm
    model = get_peft_model(_load_model(spec), _peft_lora())
    args = TrainingArguments(**_shared_args(spec, "plain"), bf16=spec["device"] == "cuda",
                             gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False})
    clock = step_clock()
    trainer = Trainer(model=model, args=args, train_dataset=load_from_disk(spec["dataset"]),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[clock])
    output = trainer.train()
    return {"loss": output.training_loss, "train_s": output.metrics["train_runtime"], "precision": "fp32",
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], **clock.result()}


def arm_trl(spec: dict, gc: bool, fast: bool = False) -> dict:
    """(b) TRL SFTTrainer with its defaults; (c) with fast=True, at its fastest settings for this data."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    bf16 = spec.get("precision") != "fp32"
    extra = {"bf16": bf16}  # TRL's default is bf16; --precision fp32 turns it off
    if fast:  # padding-free batches (examples end to end, position_ids restart) and no recomputation
        extra.update(padding_free=True, max_length=None, gradient_checkpointing=gc)
    # the default arm keeps TRL's default gradient checkpointing (on) in both tables
    args = SFTConfig(**_shared_args(spec, "trl_fast" if fast else "trl"), **extra)
    set_seed(HYPER["seed"])
    clock = step_clock()
    trainer = SFTTrainer(model=_load_model(spec), args=args, train_dataset=load_from_disk(spec["dataset"]),
                         processing_class=AutoTokenizer.from_pretrained(spec["model"]), peft_config=_peft_lora(),
                         callbacks=[clock])
    output = trainer.train()
    return {"loss": output.training_loss, "train_s": output.metrics["train_runtime"],
            "precision": "bf16" if bf16 else "fp32",
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], **clock.result()}


def arm_tunelab(spec: dict, gc: bool, method: str = "lora", overrides: list[str] | None = None) -> dict:
    """(d) tunelab's recipe with its defaults (or with `overrides`, one speed option turned off)."""
    from tunelab.training.sft import train

    if spec.get("precision") == "fp32":
        overrides = ["train.mixed_precision=no", *(overrides or [])]
    clock = step_clock()
    result = train(tunelab_config(spec, gc, method, overrides), echo=False, callbacks=[clock])
    lines = (result.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    env = json.loads((result.run_dir / "env.json").read_text(encoding="utf-8"))
    precision = "fp32" if env.get("mixed_precision", "no") == "no" else env["mixed_precision"]
    return {"loss": result.metrics["train_loss"], "train_s": result.metrics["runtime_s"], "precision": precision,
            "losses": [r["loss"] for r in map(json.loads, lines) if "loss" in r], **clock.result()}


ARM_FUNCS = {
    "plain": arm_plain,
    "trl": arm_trl,
    "trl_fast": lambda spec, gc: arm_trl(spec, gc, fast=True),
    "tunelab": arm_tunelab,
    "tunelab_qlora": lambda spec, gc: arm_tunelab(spec, gc, method="qlora"),  # CUDA + bitsandbytes
}
# tunelab with one speed option off at a time (--ablate): each option's measured effect (docs/speed.md)
# (group_by_length is not among them: it only applies to padded batches, i.e. with data.packing=false)
ABLATIONS = ["data.packing=false", "train.mixed_precision=no", "train.bf16_frozen_base=false",
             "train.fp32_adapter_output=false", "train.packed_attention=false", "train.sparse_logits=false",
             "train.fast_dropout=false", "train.fused_lora=false"]


def arm_function(arm: str):
    """`tunelab:<override>[;<override>]` runs tunelab with those overrides; other names are ARM_FUNCS keys."""
    if arm.startswith("tunelab:"):
        overrides = arm.split(":", 1)[1].split(";")
        return lambda spec, gc: arm_tunelab(spec, gc, overrides=overrides)
    return ARM_FUNCS[arm]


def arm_label(arm: str, precision: str | None = None) -> str:
    if arm.startswith("tunelab:"):
        return "tunelab, " + arm.split(":", 1)[1].replace(";", ", ")
    if precision == "fp32" and arm in FP32_LABELS:
        return FP32_LABELS[arm]
    return LABELS[arm]


LABELS = {
    "plain": "seeds' recipe (Trainer + pad to longest + LoRA, fp32)",
    "trl": "TRL SFTTrainer, defaults",
    "trl_fast": "TRL SFTTrainer, padding_free + bf16",
    "tunelab": "tunelab (defaults)",
    "tunelab_qlora": "tunelab QLoRA 4-bit",
}
FP32_LABELS = {"trl": "TRL SFTTrainer, defaults but fp32", "trl_fast": "TRL SFTTrainer, padding_free, fp32",
               "tunelab": "tunelab (defaults, train.mixed_precision=no)"}


def run_arm(spec_file: str, out_file: str) -> int:
    """Child process: train one arm, then write its measurements (peak RSS is this process's own)."""
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    started = time.perf_counter()
    result = arm_function(spec["arm"])(spec, spec["gc"])
    result["process_s"] = time.perf_counter() - started
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result.update(kernels_in_use(spec["device"]))
    if spec["device"] == "cuda":
        import torch

        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    Path(out_file).write_text(json.dumps(result), encoding="utf-8")
    return 0


def kernels_in_use(device: str) -> dict:
    """What this process computes with: ATen's kernel level and small fp32 (1024^2) and bf16 (256^2) matmul rates.
    With --isa avx2 they show that the limits reached the arm's own process: ATen reports AVX2 and the bf16 rate
    falls from hundreds of GFLOP/s to ~2 (oneDNN without its AVX-512 BF16 kernels)."""
    import torch

    if device != "cpu":
        return {}
    rates = {f"{name}_gflops": 2 * n**3 / _product_seconds(n, dtype, device, repeats=3) / 1e9
             for name, dtype, n in (("fp32", torch.float32, 1024), ("bf16", torch.bfloat16, 256))}
    return {"aten_kernels": torch.backends.cpu.get_cpu_capability(), **rates}


def kernels_line(rows: list[dict]) -> str:
    """One report line: the kernels each arm's process ran with (the same in every arm unless something broke)."""
    seen = {}
    for r in rows:
        if "aten_kernels" in r:
            key = (r["aten_kernels"], round(r["fp32_gflops"], -1), round(r["bf16_gflops"]))
            seen.setdefault(r["aten_kernels"], []).append(key)
    if not seen:
        return ""
    parts = [f"ATen {kernels} in {len(keys)} arm(s), fp32 1024^2 matmul {min(k[1] for k in keys):.0f}-"
             f"{max(k[1] for k in keys):.0f} GFLOP/s, bf16 256^2 {min(k[2] for k in keys):.0f}-"
             f"{max(k[2] for k in keys):.0f} GFLOP/s" for kernels, keys in seen.items()]
    return "Kernels in the arm processes (measured in each after training): " + "; ".join(parts) + "."


# ------------------------------------------------------------------------------------------------ running, report
def run_child(script: str, spec_file: Path, out_file: Path, log_file: Path, timeout: float) -> dict:
    """Run `script --child SPEC OUT` in a fresh interpreter, its output in log_file: the arm's result, or
    {"error": ...} with the log's last lines (bench/align.py launches its arms the same way)."""
    with log_file.open("w") as log:
        try:
            code = subprocess.call([sys.executable, script, "--child", str(spec_file), str(out_file)], stdout=log,
                                   stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0 or not out_file.is_file():
        tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
        return {"error": f"exit {code}: " + " | ".join(tail)}
    return json.loads(out_file.read_text(encoding="utf-8"))


def launch(spec: dict, arm: str, gc: bool, timeout: float) -> dict:
    """Run one arm in a fresh interpreter; its log goes to the work folder."""
    work = Path(spec["work"])
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in arm)
    tag = f"{safe}{'-gc' if gc else ''}-{int(time.time() * 1000) % 10**8}"
    spec_file, out_file, log_file = work / f"{tag}.spec.json", work / f"{tag}.result.json", work / f"{tag}.log"
    spec_file.write_text(json.dumps({**spec, "arm": arm, "gc": gc, "lengths": None}), encoding="utf-8")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    result = run_child(__file__, spec_file, out_file, log_file, timeout)
    if "error" in result:
        return {"arm": arm, "gc": gc, **result}
    return {"arm": arm, "gc": gc, "wall_s": time.perf_counter() - started, "load": [load_before, os.getloadavg()[0]],
            **result}


def derive(result: dict, spec: dict, peak: dict, flops: float) -> dict:
    if "error" in result:
        return result
    seconds = result["train_s"]
    steady = steady_rate(result)
    # model FLOPs of the steps after the first, in proportion to their tokens
    steady_flops = flops * steady["tokens"] / spec["tokens"] if steady else None
    own = peak[result.get("precision", "fp32")]
    return {**result, "tokens_per_s": spec["tokens"] / seconds, "mfu_fp32": flops / seconds / peak["fp32"],
            "mfu_bf16": flops / seconds / peak["bf16"], "steady": steady,
            "steady_tokens_per_s": steady["tokens"] / steady["seconds"] if steady else None,
            "mfu_own": steady_flops / steady["seconds"] / own if steady else flops / seconds / own}


def steady_rate(result: dict) -> dict | None:
    """Tokens and seconds of the steps after the first (None with fewer than two steps)."""
    ends, seen = result.get("step_ends") or [], result.get("tokens_seen") or []
    if len(ends) < 2 or len(seen) != len(ends):
        return None
    return {"steps": len(ends) - 1, "tokens": seen[-1] - seen[0], "seconds": ends[-1] - ends[0]}


def table(rows: list[dict], gpu: bool) -> str:
    """Markdown table with ratios to the seeds' recipe (the first row with arm == plain)."""
    base = next((r for r in rows if r["arm"] == "plain" and "error" not in r), None)
    head = ["arm", "tokens/s", "x plain", "after step 1", "x plain", "train s", "peak RSS GB", "x plain",
            "mean loss", "vs plain", "MFU fp32", "MFU bf16", "MFU own", "load"] + (["peak GPU GB"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = arm_label(r["arm"], r.get("precision")) + (" + grad. checkpointing" if r["gc"] and r["arm"] != "trl"
                                                          else "")
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:150]} |")
            continue
        speed, steady, memory = (ratio(r, base, k) for k in ("tokens_per_s", "steady_tokens_per_s", "peak_rss_gb"))
        loss = f"{100 * (r['loss'] / base['loss'] - 1):+.2f}%" if base else "-"
        rate = f"{r['steady_tokens_per_s']:.1f}" if r.get("steady_tokens_per_s") else "-"
        load = "-".join(f"{x:.1f}" for x in r.get("load", ()))
        cells = [label, f"{r['tokens_per_s']:.1f}", speed, rate, steady, f"{r['train_s']:.1f}",
                 f"{r['peak_rss_gb']:.2f}", memory, f"{r['loss']:.4f}", loss,
                 f"{100 * r['mfu_fp32']:.1f}%", f"{100 * r['mfu_bf16']:.1f}%",
                 f"{100 * r['mfu_own']:.1f}% {r.get('precision', 'fp32')}", load]
        if gpu:
            cells.append(f"{r.get('peak_gpu_gb', 0):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio(row: dict, base: dict | None, key: str) -> str:
    """row[key] / base[key] as '1.23x' ('-' when either is missing); bench/align.py uses it too."""
    return f"{row[key] / base[key]:.2f}x" if base and row.get(key) and base.get(key) else "-"


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    from tunelab.hardware import cpu_info

    cpu = cpu_info().name
    kernels = torch.backends.cpu.get_cpu_capability()
    limited = [f"{k}={v}" for k, v in ISA_ENV.get(os.environ.get("TUNELAB_BENCH_ISA", ""), {}).items()]
    return (f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), flags: {cpu_flags()}; ATen kernels: {kernels}"
            + (f" (limited with {' '.join(limited)}: AVX2 kernels on this CPU, not an AVX2-only CPU)" if limited
               else ""))


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> str:
    """The SIMD flags that decide the fp32 and bf16 matmul rates: which are present, which absent."""
    from tunelab.hardware import cpu_info

    have = cpu_info().flags
    if not have:
        return "unknown"
    return " ".join(f if f in have else f"no-{f}" for f in SIMD_FLAGS)


def pick_median(runs: list[dict]) -> dict:
    """With --repeat, the run with the median training time represents its arm; all times are kept."""
    good = sorted((r for r in runs if "error" not in r), key=lambda r: r["train_s"])
    if not good:
        return runs[-1]
    return {**good[(len(good) - 1) // 2], "train_s_all": [round(r["train_s"], 1) for r in good],
            "steady_all": [round(r["steady_tokens_per_s"], 1) for r in good if r.get("steady_tokens_per_s")],
            "load_all": [[round(x, 1) for x in r["load"]] for r in good if "load" in r]}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per arm (one pass over steps x batch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--records", type=int, default=2100, help="synthetic records written (>= 2,000)")
    parser.add_argument("--arms", default=None, help=f"comma-separated, from {', '.join(ARM_FUNCS)} "
                        f"(default {','.join(ARMS)}; with --precision fp32 {','.join(FP32_ARMS)})")
    parser.add_argument("--precision", choices=["default", "fp32"], default="default",
                        help="fp32: every arm in fp32 (TRL bf16=False, tunelab train.mixed_precision=no), the path "
                        "of CPUs without fast bf16; implies --no-gc and --repeat 2 unless given")
    parser.add_argument("--isa", choices=sorted(ISA_ENV), default=None,
                        help="limit MKL, oneDNN and ATen to these kernels in the matmul peak and every arm")
    parser.add_argument("--gc-arms", default="plain,tunelab", help="arms repeated with gradient checkpointing")
    parser.add_argument("--no-gc", action="store_true", help="skip the gradient-checkpointing table")
    parser.add_argument("--ablate", action="store_true", help="also run tunelab with each speed option off in turn "
                        "(a third table: what each option is worth)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per arm, interleaved; the median is reported")
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2 on CPU, a random "
                        "Qwen2.5-0.5B-sized model on CUDA)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before an arm is abandoned")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fp32 = args.precision == "fp32"
    args.arms = args.arms or ",".join(FP32_ARMS if fp32 else ARMS)
    args.repeat = args.repeat or (2 if fp32 else 1)
    args.no_gc = args.no_gc or (fp32 and "--gc-arms" not in (argv if argv is not None else sys.argv))
    return args


def isa_environment(isa: str | None) -> dict:
    """The variables --isa sets for the matmul peak and every arm (none without --isa)."""
    return {**ISA_ENV[isa], "TUNELAB_BENCH_ISA": isa} if isa else {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_arm(*args.child)
    os.environ.update(isa_environment(args.isa))  # before anything imports torch; the arms inherit it
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-train-") as tmp:
        work = Path(tmp)
        os.environ["TUNELAB_DATA_CACHE"] = str(work / "data-cache")  # the arms inherit it: one tokenization
        spec = {**prepare(args, work), "precision": args.precision}
        peak = matmul_peak(args.device)
        flops = training_flops(spec["model"], spec["lengths"])
        plan = [(arm, False) for arm in args.arms.split(",")]
        if args.ablate:
            plan += [(f"tunelab:{o}", False) for o in ABLATIONS]
        if not args.no_gc:
            plan += [(arm, True) for arm in args.gc_arms.split(",") if arm]
        print(f"{len(plan)} arms x {args.repeat}, {args.steps} steps x {args.batch_size} examples, "
              f"{spec['tokens']} tokens; peak fp32 {peak['fp32'] / 1e9:.0f} / bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s",
              flush=True)
        runs: dict = {key: [] for key in plan}
        for _ in range(args.repeat):
            for arm, gc in plan:
                result = launch(spec, arm, gc, args.timeout)
                runs[(arm, gc)].append(result)
                print(f"  {arm}{' + gc' if gc else ''}: " + (result["error"] if "error" in result else
                      f"{spec['tokens'] / result['train_s']:.1f} tokens/s, loss {result['loss']:.4f}, "
                      f"RSS {result['peak_rss_gb']:.2f} GB, load {result['load'][0]:.1f}-{result['load'][1]:.1f}"),
                      flush=True)
        again = matmul_peak(args.device)  # the machine may be shared: keep the better of two measurements
        peak = {k: max(peak[k], again[k]) for k in peak}
        rows = [pick_median([derive(r, spec, peak, flops) for r in runs[key]]) for key in plan]
    report = render(args, spec, peak, flops, rows, time.perf_counter() - started)
    print("\n" + report)
    save(args, spec, peak, rows, report)
    return 0


def render(args, spec: dict, peak: dict, flops: float, rows: list[dict], seconds: float) -> str:
    gpu = args.device == "cuda"
    stats = spec["data_stats"]
    parts = [
        (f"Machine: {machine(args.device)}. Model: {Path(spec['model']).name}. "
         f"Matmul peak in this run: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s."),
        (f"Data: {spec['data_examples']} synthetic Alpaca-like examples (tokens p50 {stats['p50']:.0f}, "
         f"p90 {stats['p90']:.0f}, max {stats['max']}, cutoff {args.cutoff}); every arm trains the same first "
         f"{args.steps * args.batch_size} ({spec['tokens']} tokens, {spec['trained_tokens']} with loss), "
         f"{args.steps} steps of {args.batch_size}; {flops / 1e12:.2f} model TFLOP."),
        (f"Precision: {'fp32 in every arm' if args.precision == 'fp32' else 'each arm its default'}. "
         f"Runs: {args.repeat} per arm, interleaved (every arm once, then again), the median run reported"
         f"{' (of two: the faster)' if args.repeat == 2 else ''}. "
         f"'tokens/s' times all {args.steps} steps (set-up of step 1 included); 'after step 1' times steps "
         f"2-{args.steps} ({args.steps - 1} steps) by their own tokens, and 'MFU own' uses that time against the "
         f"matmul peak of the arm's precision. 'load' is the 1-minute load average at the start and end of the "
         f"reported run."),
        "",
        table([r for r in rows if not r["gc"] and not r["arm"].startswith("tunelab:")], gpu),
    ]
    kernels = kernels_line(rows)
    if kernels:
        parts[3:3] = [kernels]
    ablations = [r for r in rows if r["arm"].startswith("tunelab:")]
    if ablations:
        tuned = [r for r in rows if r["arm"] == "tunelab" and not r["gc"]]
        parts += ["", "tunelab with one speed option off (ratios still to the seeds' recipe):", "",
                  table(tuned + ablations + [r for r in rows if r["arm"] == "plain" and not r["gc"]], gpu)]
    if any(r["gc"] for r in rows):
        parts += ["", "With gradient checkpointing:", "", table([r for r in rows if r["gc"]], gpu)]
    if args.repeat > 1:
        parts += ["", "Every run, fastest first (tokens/s after step 1, load average at its start and end):", ""]
        parts += [f"- {arm_label(r['arm'], r.get('precision'))}{' + gc' if r['gc'] else ''}: " + ", ".join(
            f"{v} ({a}-{b})" for v, (a, b) in zip(r.get("steady_all", []), r.get("load_all", []), strict=False))
            for r in rows if "error" not in r]
    command = "python bench/train.py " + " ".join(sys.argv[1:])
    parts += ["", f"Command: `{command.strip()}` ({seconds / 60:.1f} min)."]
    return "\n".join(parts)


def save(args, spec: dict, peak: dict, rows: list[dict], report: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = ("train" if args.device == "cpu" else "train_cuda") + ("_fp32" if args.precision == "fp32" else "")
    name += f"_{args.isa}" if args.isa else ""
    keep = {k: v for k, v in spec.items() if k not in ("lengths",)}
    (out / f"{name}.json").write_text(json.dumps({"spec": keep, "peak": peak, "rows": rows,
                                                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2),
                                      encoding="utf-8")
    (out / f"{name}.md").write_text(report + "\n", encoding="utf-8")
    print(f"results: {out / name}.json and .md")


if __name__ == "__main__":
    sys.exit(main())
