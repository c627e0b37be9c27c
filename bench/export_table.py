"""The export table for the demo model (issue 16): every artifact's size, perplexity and tokens/s on this machine.

A zero-LoRA run (B = 0, so the merged model is the base) on the embedded SmolLM2-135M-Instruct with the demo's data
(examples/demo/data: identity + reverse_en/zh, 16 validation examples, cutoff 256) is written to --root and exported
with the export table: the merged folder, GPTQ W4A16 (--gptq: needs gptqmodel 7.6 + optimum in this environment,
`pip install 'tunelab[gptq]'`) and the GGUF types of --gguf (k-quants need llama.cpp's quantizer: `make llama-cpp`;
GGUF tokens/s need its Python runtime: `make test-llamacpp`). The same run as tests/test_llamacpp.py, so its figures
compare with that check's.

    python bench/export_table.py --gptq --gguf f16,q8_0,q4_1,q4_k_m

Prints the table, the GPTQ quantization time, the whole export's time and peak RSS, and the versions used; writes
them to bench/results/export_table.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "examples" / "demo" / "data"


def zero_lora_run(root: Path) -> Path:
    """runs/zero-lora: a LoRA adapter with B = 0 on the embedded model, and the demo's data in its config."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config.schema import ModelConfig
    from tunelab.models.resolve import resolve_model_path

    base = resolve_model_path(ModelConfig())
    run = root / "zero-lora"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        task_type="CAUSAL_LM", r=8, target_modules="all-linear"))
    model.save_pretrained(run / "final")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "final")
    (run / "config.yaml").write_text(
        f"model:\n  name: {base}\nmethod:\n  name: lora\n  r: 8\ndata:\n  dataset_dir: {DEMO_DATA}\n  datasets:\n"
        "    - name: identity\n    - name: reverse_en_train\n    - name: reverse_zh_train\n"
        "  variables:\n    name: Mochi\n    author: TuneLab\n  cutoff_len: 256\n  val_size: 16\n", encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"status": "completed", "method": "lora"}), encoding="utf-8")
    return run


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy", "gptqmodel", "optimum"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "-"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gptq", action="store_true", help="also write and measure GPTQ W4A16")
    parser.add_argument("--gguf", default="f16,q8_0,q4_1", help="GGUF types, comma separated ('' for none)")
    parser.add_argument("--root", help="where the run and its export go (default: a temporary folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from tunelab.config.schema import ExportConfig
    from tunelab.export.pipeline import export_model

    root = Path(args.root or tempfile.mkdtemp(prefix="export-table-"))
    os.chdir(root)  # gptqmodel writes its per-layer log to ./logs/
    run = zero_lora_run(root)
    cfg = ExportConfig(gptq=args.gptq, gguf=[t for t in args.gguf.split(",") if t], table=True)
    start = time.perf_counter()
    result = export_model(str(run), cfg, out=root / "export")
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    report = {"versions": versions(), "threads": __import__("torch").get_num_threads(), "export_s": round(seconds, 1),
              "peak_rss_gb": round(peak_gb, 2), "weight_quant": result.weight_quant,
              "table": json.loads((result.out_dir / "export_table.json").read_text(encoding="utf-8")),
              "out": str(result.out_dir)}
    print(result.table_text)
    for method, info in result.weight_quant.items():
        print(f"{method}: quantized in {info['seconds']} s on {info['calibration_examples']} calibration examples "
              f"(group {info['group_size']})")
    print(f"export with the table: {seconds:.0f} s, peak RSS {peak_gb:.2f} GB; {report['versions']}")
    out = REPO / "bench" / "results" / "export_table.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
