"""DPO speed benchmark (issue 14): tunelab's dpo stage against plain TRL DPOTrainer with its defaults, in one run.

Every arm aligns the same model (the embedded SmolLM2-135M-Instruct, tunelab.models.resolve's default; a random
Qwen2.5-0.5B-sized model on CUDA) with the same LoRA (r=8, alpha 16, dropout 0.05 on q,k,v,o,gate,up,down), the
same hyper-parameters (lr 2e-4 cosine, batch 8 pairs, seed 42, DPO sigmoid loss, beta 0.1: TRL's default) on the
same preference records: synthetic Alpaca-like prompts (English and Chinese, bench/train.py's generator) whose
chosen reply answers the prompt and whose rejected reply answers another one. Each arm tokenizes the records its
own way (TRL: its chat-template tokenization of the conversational prompt/chosen/rejected records; tunelab: its
data stage on the same records as a LLaMA-Factory `ranking: true` dataset). Arms, each in its own subprocess:

  trl        TRL DPOTrainer with its defaults (bf16 autocast, gradient checkpointing, padded chosen+rejected)
  trl_nogc   the same without gradient checkpointing (TRL at its fastest here without touching its data path)
  tunelab    tunelab's dpo stage (tunelab.training.stages) with tunelab's defaults
  tunelab:<a.b=c>[;<d.e=f>]   the same with config overrides (what a difference in the loss curve comes from)

Runs are interleaved (--repeat: every arm once, then again; the median run is reported). Tokens/s counts the real
tokens of both sequences of each pair (prompt + chosen, prompt + rejected), the same count for every arm; the
loss curves are compared step by step (the first step is ln 2 in every arm: policy == reference).

    python bench/align.py                        # CPU, default precision of each arm
    python bench/align.py --precision fp32       # every arm in fp32 (TRL bf16=False, mixed_precision=no)
    python bench/align.py --steps 4 --arms trl   # a quick look at one side

Results: a table on stdout and bench/results/align[_fp32].{json,md} (git-ignored).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("trl", "trl_nogc", "tunelab")
BETA = 0.1
LOSS_TOLERANCE = 0.01  # "the same loss curve within 1%"


def _bench_train():
    """bench/train.py (synthetic data, LoRA and hyper-parameters, step clock, machine line): shared, not copied."""
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BT = _bench_train()


# ------------------------------------------------------------------------------------------------ data (parent)
def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Pairs: the chosen reply answers the prompt, the rejected one is the answer to another prompt."""
    records = BT.synthetic_records(n + 1, seed)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    pairs = []
    for i in range(n):
        other = records[order[i] if order[i] != i else (i + 1) % n]
        prompt = records[i]["instruction"] + (f"\n\n{records[i]['input']}" if records[i]["input"] else "")
        pairs.append({"prompt": prompt, "chosen": records[i]["output"], "rejected": other["output"]})
    return pairs


def pair_tokens(tokenizer, pair: dict) -> tuple[int, int]:
    """(prompt + chosen, prompt + rejected) lengths through the model's chat template: the tokens one pair costs."""
    prompt = [{"role": "user", "content": pair["prompt"]}]
    return tuple(len(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": pair[key]}],
                                                   tokenize=True, return_dict=False))
                 for key in ("chosen", "rejected"))


def write_data(pairs: list[dict], work: Path) -> dict:
    """The same records twice: TRL's conversational prompt/chosen/rejected, and a LLaMA-Factory ranking dataset."""
    trl_rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    (work / "trl.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in trl_rows),
                                    encoding="utf-8")
    alpaca = [{"instruction": p["prompt"], "input": "", "chosen": p["chosen"], "rejected": p["rejected"]}
              for p in pairs]
    (work / "pairs.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    info = {"pairs": {"file_name": "pairs.json", "ranking": True,
                      "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                  "rejected": "rejected"}}}
    (work / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return {"trl_data": str(work / "trl.jsonl"), "dataset_dir": str(work)}


def prepare(args, work: Path) -> dict:
    from transformers import AutoTokenizer

    from tunelab.config.schema import ModelConfig
    from tunelab.models.resolve import resolve_model_path

    model = Path(args.model) if args.model else resolve_model_path(ModelConfig())
    if args.device == "cuda" and not args.model:
        model = BT.build_gpu_model(model, work / "qwen2.5-0.5b-random")
    tokenizer = AutoTokenizer.from_pretrained(model)
    n = args.steps * args.batch_size
    kept, lengths = [], []
    for pair in preference_records(max(4 * n, 64)):
        tokens = pair_tokens(tokenizer, pair)
        if max(tokens) <= args.cutoff:  # nothing is truncated in any arm
            kept.append(pair)
            lengths.append(tokens)
        if len(kept) == n:
            break
    if len(kept) < n:
        raise SystemExit(f"only {len(kept)} pairs fit --cutoff {args.cutoff}; lower --steps or raise --cutoff")
    spec = {"model": str(model), "device": args.device, "cutoff": args.cutoff, "steps": args.steps,
            "batch_size": args.batch_size, "work": str(work), "precision": args.precision,
            "tokens": sum(c + r for c, r in lengths), "pairs": n,
            "pair_tokens_p50": sorted(c + r for c, r in lengths)[n // 2],
            "pair_tokens_max": max(c + r for c, r in lengths)}
    spec.update(write_data(kept, work))
    return spec


# ---------------------------------------------------------------------------------------------------- arms (child)
def tunelab_config(spec: dict, overrides: list[str] | None = None):
    """The tunelab arm: tunelab's defaults, stage dpo, plus what every arm shares (data, steps, batch, lr, seed)."""
    from tunelab.config.load import apply_overrides
    from tunelab.config.schema import RunConfig

    lora = BT.LORA
    return RunConfig.model_validate(apply_overrides({
        "stage": "dpo",
        "model": {"name": spec["model"], "device": spec["device"]},
        "data": {"dataset_dir": spec["dataset_dir"], "datasets": [{"name": "pairs"}], "cutoff_len": spec["cutoff"]},
        "method": {"name": "lora", "r": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"],
                   "target_modules": lora["targets"]},
        "train": {"output_dir": str(Path(spec["work"]) / "runs"), "max_steps": spec["steps"],
                  "batch_size": spec["batch_size"], "lr": BT.HYPER["lr"], "scheduler": BT.HYPER["scheduler"],
                  "seed": BT.HYPER["seed"], "logging_steps": 1, "report_to": []},
    }, overrides or []))


def tunelab_stage(name: str):
    """The stage registry's entry for `name` (tunelab.training.stages, issue 14)."""
    from tunelab.training import stages

    getter = getattr(stages, "get_stage", None)
    if getter is not None:
        return getter(name)
    return stages.STAGES[name]


def arm_tunelab(spec: dict, overrides: list[str] | None = None) -> dict:
    """tunelab's dpo stage with its defaults, or with `overrides` (an ablation arm `tunelab:a.b=c;d.e=f`)."""
    overrides = (["train.mixed_precision=no"] if spec["precision"] == "fp32" else []) + (overrides or [])
    cfg = tunelab_config(spec, overrides)
    clock = BT.step_clock()
    result = tunelab_stage("dpo").run(cfg, callbacks=[clock], echo=False)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    env = json.loads((result.run_dir / "env.json").read_text(encoding="utf-8"))
    precision = "fp32" if env.get("mixed_precision", "no") == "no" else env["mixed_precision"]
    logged = [r for r in rows if "loss" in r and "eval_loss" not in r]
    return {"train_s": result.metrics.get("runtime_s") or result.metrics.get("train_runtime"),
            "precision": precision, "losses": [r["loss"] for r in logged],
            "accuracies": [_accuracy(r) for r in logged], **clock.result()}


def _accuracy(row: dict) -> float | None:
    return next((v for k, v in row.items() if "accurac" in k and isinstance(v, (int, float))), None)


def arm_trl(spec: dict, gc: bool = True) -> dict:
    """TRL DPOTrainer, defaults except what every arm shares (steps, batch, lr, schedule, seed, LoRA)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    shared = BT._shared_args(spec, "trl" if gc else "trl_nogc")
    shared.pop("include_num_input_tokens_seen", None)
    bf16 = spec["precision"] != "fp32"  # TRL's default is bf16; --precision fp32 turns it off
    extra = {"bf16": bf16} if gc else {"bf16": bf16, "gradient_checkpointing": False}
    args = DPOConfig(**shared, **extra)
    set_seed(BT.HYPER["seed"])
    clock = BT.step_clock()
    trainer = DPOTrainer(model=BT._load_model(spec), args=args,
                         train_dataset=load_dataset("json", data_files=spec["trl_data"], split="train"),
                         processing_class=AutoTokenizer.from_pretrained(spec["model"]), peft_config=BT._peft_lora(),
                         callbacks=[clock])
    output = trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {"train_s": output.metrics["train_runtime"], "precision": "bf16" if bf16 else "fp32",
            "losses": [h["loss"] for h in logged], "accuracies": [_accuracy(h) for h in logged],
            "beta": args.beta, "loss_type": args.loss_type, **clock.result()}


ARM_FUNCS = {"trl": arm_trl, "trl_nogc": lambda spec: arm_trl(spec, gc=False), "tunelab": arm_tunelab}
LABELS = {"trl": "TRL DPOTrainer, defaults", "trl_nogc": "TRL DPOTrainer, defaults but no grad. checkpointing",
          "tunelab": "tunelab dpo stage (defaults)"}


def arm_function(arm: str):
    """`tunelab:<override>[;<override>]` runs tunelab with those overrides; other names are ARM_FUNCS keys."""
    if arm.startswith("tunelab:"):
        return lambda spec: arm_tunelab(spec, arm.split(":", 1)[1].split(";"))
    return ARM_FUNCS[arm]


def arm_label(arm: str) -> str:
    return "tunelab dpo stage, " + arm.split(":", 1)[1].replace(";", ", ") if arm.startswith("tunelab:") else LABELS[arm]


def run_arm(spec_file: str, out_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    result = arm_function(spec["arm"])(spec)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if spec["device"] == "cuda":
        import torch

        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    Path(out_file).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------------------ running, report
def launch(spec: dict, arm: str, timeout: float) -> dict:
    work = Path(spec["work"])
    tag = f"{arm}-{int(time.time() * 1000) % 10**8}"
    spec_file, out_file, log_file = work / f"{tag}.spec.json", work / f"{tag}.result.json", work / f"{tag}.log"
    spec_file.write_text(json.dumps({**spec, "arm": arm}), encoding="utf-8")
    load_before = os.getloadavg()[0]
    result = BT.run_child(__file__, spec_file, out_file, log_file, timeout)
    if "error" in result:
        return {"arm": arm, **result}
    return {"arm": arm, "load": [load_before, os.getloadavg()[0]], **result}


def derive(result: dict, spec: dict) -> dict:
    """tokens/s over the whole run, and after step 1 (steps 2..N, pairs of equal share: tokens x (N-1)/N)."""
    if "error" in result:
        return result
    ends = result.get("step_ends") or []
    out = {**result, "tokens_per_s": spec["tokens"] / result["train_s"]}
    if len(ends) >= 2:
        out["steady_tokens_per_s"] = spec["tokens"] * (len(ends) - 1) / len(ends) / (ends[-1] - ends[0])
    return out


def curve_gap(a: list[float], b: list[float]) -> float | None:
    """Largest relative difference between two loss curves, step by step (None when they cannot be compared)."""
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def pick_median(runs: list[dict]) -> dict:
    good = sorted((r for r in runs if "error" not in r), key=lambda r: r["train_s"])
    if not good:
        return runs[-1]
    return {**good[(len(good) - 1) // 2], "train_s_all": [round(r["train_s"], 1) for r in good]}


def trl_base(rows: list[dict]) -> dict | None:
    """The row ratios are taken to: TRL with its defaults, else the other TRL arm."""
    good = [r for r in rows if "error" not in r]
    return next((r for r in good if r["arm"] == "trl"), None) or next((r for r in good if r["arm"] == "trl_nogc"),
                                                                       None)


def table(rows: list[dict], gpu: bool) -> str:
    base = trl_base(rows)
    head = ["arm", "tokens/s", "x TRL", "after step 1", "x TRL", "train s", "peak RSS GB", "mean loss",
            "max curve gap vs TRL", "last reward acc."] + (["peak GPU GB"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = arm_label(r["arm"])
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:200]} |")
            continue
        gap = curve_gap(r["losses"], base["losses"]) if base else None
        acc = next((a for a in reversed(r.get("accuracies") or []) if a is not None), None)
        cells = [label, f"{r['tokens_per_s']:.1f}", BT.ratio(r, base, "tokens_per_s"),
                 f"{r['steady_tokens_per_s']:.1f}" if r.get("steady_tokens_per_s") else "-",
                 BT.ratio(r, base, "steady_tokens_per_s"), f"{r['train_s']:.1f}", f"{r['peak_rss_gb']:.2f}",
                 f"{sum(r['losses']) / len(r['losses']):.4f}" if r["losses"] else "-",
                 f"{100 * gap:.2f}%" if gap is not None else "-", f"{acc:.2f}" if acc is not None else "-"]
        if gpu:
            cells.append(f"{r.get('peak_gpu_gb', 0):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(args, spec: dict, rows: list[dict], seconds: float) -> str:
    base = trl_base(rows)
    parts = [
        f"Machine: {BT.machine(args.device)}. Model: {Path(spec['model']).name}.",
        (f"Data: {spec['pairs']} synthetic preference pairs ({spec['tokens']} tokens counting prompt + chosen and "
         f"prompt + rejected; per pair p50 {spec['pair_tokens_p50']}, max {spec['pair_tokens_max']}, none over "
         f"--cutoff {args.cutoff}); {args.steps} steps of {args.batch_size} pairs, DPO sigmoid, beta {BETA}, LoRA "
         f"r={BT.LORA['r']} on {', '.join(BT.LORA['targets'])}, lr {BT.HYPER['lr']} {BT.HYPER['scheduler']}."),
        (f"Precision: {'fp32 in every arm' if args.precision == 'fp32' else 'each arm its default'}. "
         f"Runs: {args.repeat} per arm, interleaved, the median reported. 'after step 1' times steps 2-{args.steps}."),
        "", table(rows, args.device == "cuda"), "",
    ]
    for r in rows:
        if "error" not in r:
            parts.append(f"- {arm_label(r['arm'])} losses: " + ", ".join(f"{x:.4f}" for x in r["losses"]))
    tuned = next((r for r in rows if r["arm"] == "tunelab" and "error" not in r), None)
    if tuned and base:
        gap = curve_gap(tuned["losses"], base["losses"])
        same = gap is not None and gap <= LOSS_TOLERANCE
        parts += ["", (f"tunelab vs {LABELS[base['arm']]}: {tuned['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s; "
                       f"loss curves {'within' if same else 'NOT within'} {100 * LOSS_TOLERANCE:.0f}% "
                       f"(largest step gap {'-' if gap is None else f'{100 * gap:.2f}%'}).")]
    parts += ["", f"Command: `python bench/align.py {' '.join(sys.argv[1:])}`".rstrip() + f" ({seconds / 60:.1f} min)."]
    return "\n".join(parts)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per arm")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--cutoff", type=int, default=512, help="longest prompt + reply kept (tokens)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARM_FUNCS)}, or "
                        "tunelab:<override>[;<override>] (e.g. tunelab:method.dropout=0) for an ablation")
    parser.add_argument("--precision", choices=["default", "fp32"], default="default",
                        help="fp32: every arm in fp32 (TRL bf16=False, tunelab train.mixed_precision=no)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per arm, interleaved; the median is reported")
    parser.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2 on CPU)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before an arm is abandoned")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_arm(*args.child)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-align-") as tmp:
        work = Path(tmp)
        os.environ["TUNELAB_DATA_CACHE"] = str(work / "data-cache")
        spec = prepare(args, work)
        arms = [a for a in args.arms.split(",") if a]
        unknown = [a for a in arms if a not in ARM_FUNCS and not a.startswith("tunelab:")]
        if unknown:
            raise SystemExit(f"--arms: unknown {', '.join(unknown)}; known: {', '.join(ARM_FUNCS)}")
        print(f"{len(arms)} arms x {args.repeat}, {args.steps} steps x {args.batch_size} pairs, {spec['tokens']} "
              "tokens", flush=True)
        runs: dict[str, list] = {arm: [] for arm in arms}
        for _ in range(args.repeat):
            for arm in arms:
                result = derive(launch(spec, arm, args.timeout), spec)
                runs[arm].append(result)
                print(f"  {arm}: " + (result["error"] if "error" in result else
                      f"{result['tokens_per_s']:.1f} tokens/s, losses {result['losses']}"), flush=True)
        rows = [pick_median(runs[arm]) for arm in arms]
    report = render(args, spec, rows, time.perf_counter() - started)
    print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = ("align" if args.device == "cpu" else "align_cuda") + ("_fp32" if args.precision == "fp32" else "")
    (out / f"{name}.json").write_text(json.dumps({"spec": spec, "rows": rows,
                                                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2),
                                      encoding="utf-8")
    (out / f"{name}.md").write_text(report + "\n", encoding="utf-8")
    print(f"results: {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
