"""`tunelab export RUN_OR_ADAPTER`: merged safetensors folder, GGUF files, Ollama Modelfile, and a summary with
the files, their sizes, the template/GGUF checks and one sample answer from the exported model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunelab.cli.common import Setting, add_override_argument, add_settings, comma_list, config_from_args, is_override

SAMPLE_PROMPT = "What is the capital of France? Answer in one sentence."
KIND_TEXT = {"merged": "adapter merged into the base", "full": "full model (no adapter)",
             "prefix": "base + prefix adapter (prefix tuning cannot be merged)"}


SETTINGS = (
    Setting("--out", "export.output_dir", note="must be new or empty; default <run>/export or <folder>-export"),
    Setting("--gguf", "export.gguf", parse=lambda text: comma_list(text.lower()), metavar="TYPES",
            note="comma-separated, e.g. f16,q4_0"),
    Setting("--ollama", "export.ollama"),
    Setting("--dtype", "export.dtype"),
    Setting("--max-shard-size", "export.max_shard_size"),
    Setting("--quantize", "export.quantize"),
    Setting("--gptq", "export.gptq"),
    Setting("--awq", "export.awq"),
    Setting("--converter-dir", "export.converter_dir"),
    Setting("--overwrite", "export.overwrite"),
    Setting("--verify", "export.verify"),
    Setting("--no-table", "export.table", const=False, note="--no-table sets it to false"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="run folder, adapter folder, or model folder/hub id/.gguf")
    add_override_argument(parser)
    parser.add_argument("--adapter", help="adapter folder to merge into SOURCE (a base model)")
    add_settings(parser, SETTINGS)
    parser.add_argument("--prompt", default=SAMPLE_PROMPT, help="question for the sample answer")
    parser.add_argument("--no-sample", action="store_true", help="skip the sample answer")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="upload the export to this Hub repo (private) with a model card from run.json")
    parser.add_argument("--fetch-converter", action="store_true",
                        help="download llama.cpp's GGUF converter into the cache now (needs PyPI; once)")
    parser.add_argument("--build-quantizer", action="store_true",
                        help="compile llama.cpp's llama-quantize/llama-imatrix/llama-perplexity/llama-bench (CPU, "
                             "-j2, a few minutes; once, into ~/.cache/tunelab/llama.cpp/build) for the k-quants")
    parser.add_argument("--no-imatrix", action="store_true",
                        help="k-quants without an importance matrix from the run's data (config key export.imatrix)")


def run(args: argparse.Namespace) -> int:
    if args.fetch_converter:
        from tunelab.export.gguf import fetch_converter

        print(f"GGUF converter ready in {fetch_converter()}")
        if args.source is None:
            return 0
    if args.build_quantizer:
        from tunelab.export.llamacpp_build import build_llama_cpp

        build_llama_cpp()
        if args.source is None:
            return 0
    if args.source is None:
        print("error: give a run folder, adapter or model to export (or --fetch-converter, --build-quantizer)",
              file=sys.stderr)
        return 2
    from tunelab.export.pipeline import export_model

    cfg = export_config(args)
    result = export_model(args.source, cfg, adapter=args.adapter)
    ok = print_summary(result)
    if args.push_to_hub:
        from tunelab.export.hub import push_to_hub
        from tunelab.runs.rundir import is_run_dir

        source = Path(args.source).expanduser()
        push_to_hub(result.out_dir, args.push_to_hub, source if is_run_dir(source) else None)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")
    if not args.no_sample:
        print_sample(result, args.prompt)
    return 0 if ok else 1


def export_config(args: argparse.Namespace):
    """The run's export section (or the defaults), with flags and export.*=... overrides on top."""
    if args.source and is_override(args.source):  # `tunelab export export.gguf=[f16]` names no source
        args.overrides, args.source = [args.source, *args.overrides], None
    cfg = config_from_args(args, args.source).export
    return cfg.model_copy(update={"imatrix": False}) if getattr(args, "no_imatrix", False) else cfg


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def print_summary(result) -> bool:
    print(f"exported {result.source} -> {result.out_dir}  ({KIND_TEXT[result.kind]})")
    for path, size in result.files():
        print(f"  {human_size(size):>9}  {path.relative_to(result.out_dir)}")
    for note in result.notes:
        print(f"note: {note}")
    ok = not result.template_problems and not result.modelfile_problems
    print("chat template: " + ("identical to training on the sample conversations" if not result.template_problems
                               else "DIFFERS from training:\n  " + "\n  ".join(result.template_problems)))
    if result.modelfile is not None:
        state = "matches training" if not result.modelfile_problems else "DIFFERS:\n  " + "\n  ".join(
            result.modelfile_problems)
        print(f"Ollama: {result.modelfile} (TEMPLATE {state}); run: ollama create NAME -f {result.modelfile}")
    for rt in result.round_trips:
        ok &= rt.passed
        print(f"GGUF round trip {rt.gguf.name}: {rt.identical}/{rt.total} greedy answers identical, "
              f"{rt.token_agreement:.0%} same next token, mean KL {rt.mean_kl:.2g} (tolerance {rt.tolerance:g}): "
              f"{'ok' if rt.passed else 'FAILED'}")
    if result.table_text:
        print(result.table_text)
    if result.quantized:
        q = result.quantized
        speed = (f", {q['tokens_per_s']:.1f} tokens/s (merged {q['merged_tokens_per_s']:.1f})"
                 if "tokens_per_s" in q else "")
        print(f"{q['method']}: {human_size(q['size_bytes'])} (merged {human_size(q['merged_size_bytes'])}){speed}")
    return ok


def print_sample(result, prompt: str) -> None:
    from tunelab.inference.chat import ChatSession
    from tunelab.inference.engine import GenerationParams
    from tunelab.inference.hf import load_engine

    engine = load_engine(str(result.out_dir))
    session = ChatSession(engine, params=GenerationParams(max_new_tokens=64))
    answer = session.ask(prompt)
    print(f"sample answer from the exported model ({session.last_stats['tokens_per_s']:.1f} tokens/s):")
    print(f"  Q: {prompt}\n  A: {answer.text.strip()}")
