"""Stage 6 (export): run, adapter or model -> merged HF folder -> optional quantized copy, GGUF files, Modelfile.

    <out>/                 merged model (safetensors shards, tokenizer with the training template,
                           generation_config stopping at the end-of-turn token, tunelab_export.json)
    <out>/prefix_adapter/  prefix-tuning runs only: the adapter next to its base (cannot be merged)
    <out>/gguf/            <name>-<type>.gguf files and the Ollama Modelfile
    <out>/<quant>/         post-merge quantized copy (int8, bnb8, bnb4)
    <out>/gptq/, <out>/awq/  GPTQ / AWQ W4A16 copies calibrated on the run's training data (gptq.py)
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config.schema import ExportConfig
from tunelab.errors import TunelabError
from tunelab.export.gguf import convert_to_gguf
from tunelab.export.gptq import asked_methods, calibration_texts, check_weight_quant, quantize_weights
from tunelab.export.merge import PREFIX_NOTE, load_merged, save_hf_folder, save_prefix_export, write_marker
from tunelab.export.target import check_target
from tunelab.export.verify import RoundTrip, compare_gguf, template_mismatches
from tunelab.files import staged_folder
from tunelab.inference.template import load_template
from tunelab.runs.artifacts import Artifact, resolve_artifact
from tunelab.runs.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    out_dir: Path
    kind: str  # merged | full | prefix
    source: str
    notes: list[str] = field(default_factory=list)
    gguf: dict[str, Path] = field(default_factory=dict)
    modelfile: Path | None = None
    quantized: dict | None = None  # folder, size, tokens/s (quantize.py)
    imatrix: object | None = None  # imatrix.ImatrixInfo when k-quants were written
    weight_quant: dict[str, dict] = field(default_factory=dict)  # gptq/awq -> folder, size, seconds (gptq.py)
    template_problems: list[str] = field(default_factory=list)
    modelfile_problems: list[str] = field(default_factory=list)
    round_trips: list[RoundTrip] = field(default_factory=list)
    table: list = field(default_factory=list)  # table.TableRow per artifact: size, perplexity, tokens/s
    table_text: str = ""  # the same as markdown (export_table.md)

    def files(self) -> list[tuple[Path, int]]:
        return [(p, p.stat().st_size) for p in sorted(self.out_dir.rglob("*")) if p.is_file()]


def export_model(source: str, cfg: ExportConfig | None = None, *, adapter: str | None = None,
                 out: str | Path | None = None) -> ExportResult:
    """Export `source` (run dir, adapter, or model folder) as configured (`cfg`, else the run's export section);
    see the module docstring for the layout.

    A non-empty `out` (else cfg.output_dir; a user's folder or a previous export) is refused unless
    `cfg.overwrite`; the export is written into a hidden sibling folder and renamed into place when complete
    (target.py). With `cfg.verify`, every GGUF is reloaded with transformers and compared with the merged folder.
    With `cfg.table`, every artifact's size, perplexity on the run's held-out data and tokens/s are measured.
    """
    art = resolve_artifact(source, adapter, device="cpu")
    cfg = cfg or (art.run_config.export if art.run_config is not None else ExportConfig())
    out_dir = Path(out or cfg.output_dir or default_output_dir(source, art)).expanduser()
    check_target(out_dir, cfg.overwrite, sources=(art.base_path, art.adapter_path))
    check_weight_quant(asked_methods(cfg))  # GPTQ/AWQ refused before anything is written
    with staged_folder(out_dir) as staging:
        result = _export_into(staging, art, cfg, source)
    return _moved(result, staging, out_dir)


def planned_gguf_types(cfg: ExportConfig) -> list[str]:
    """The GGUF types an export writes: the asked ones, or q8_0 alone when only the Modelfile was asked."""
    return list(dict.fromkeys(cfg.gguf or (["q8_0"] if cfg.ollama else [])))


def _export_into(out_dir: Path, art: Artifact, cfg: ExportConfig, source: str) -> ExportResult:
    gguf_types = planned_gguf_types(cfg)
    model, tokenizer, kind = load_merged(art, cfg.dtype)
    if kind == "prefix" and (gguf_types or cfg.quantize != "none" or asked_methods(cfg)):
        raise TunelabError(f"cannot write GGUF or quantize this run: {PREFIX_NOTE}")
    template = training_template(art, tokenizer)
    result = ExportResult(out_dir, kind, source)
    if kind == "prefix":
        save_prefix_export(model, tokenizer, template, art, out_dir, cfg.max_shard_size)
        result.notes.append(PREFIX_NOTE)
    else:
        save_hf_folder(model, tokenizer, template, out_dir, cfg.max_shard_size)
    write_marker(out_dir, _provenance(art, kind, template, model, gguf_types))
    del model
    gc.collect()
    result.template_problems = template_mismatches(out_dir, template)
    if cfg.quantize != "none":
        from tunelab.export.quantize import quantize_export

        result.quantized = quantize_export(out_dir, cfg.quantize)
    if asked_methods(cfg):
        calibration = calibration_texts(art, template, cfg.calibration_samples)
        result.weight_quant = {m: quantize_weights(out_dir, m, calibration) for m in asked_methods(cfg)}
    _write_gguf_and_modelfile(result, cfg, gguf_types, art, template, tokenizer)
    if cfg.verify:
        result.round_trips = [compare_gguf(path, out_dir) for path in result.gguf.values()]
    if cfg.table and kind != "prefix":
        _measure_table(result, art, template, tokenizer)
    return result


def _measure_table(result: ExportResult, art: Artifact, template, tokenizer) -> None:
    from tunelab.export.llamacpp_speed import find_runtime
    from tunelab.export.table import Artifacts, build_table, held_out_conversations, write_table

    conversations, label = held_out_conversations(art, template, tokenizer)
    data_cfg = art.run_config.data if art.run_config is not None else None
    artifacts = Artifacts(result.out_dir, result.gguf, result.quantized, result.weight_quant,
                          llama_cpp=find_runtime(art.model_cfg.cache_dir) if result.gguf else None)
    result.table = build_table(artifacts, conversations, template, data_cfg)
    notes = [result.imatrix.describe()] if result.imatrix is not None else []
    result.table_text = write_table(result.out_dir, result.table, label, notes)


def _moved(result: ExportResult, staging: Path, out_dir: Path) -> ExportResult:
    """The result with every path moved from the staging folder to the final one."""

    def move(path: Path) -> Path:
        return out_dir / path.relative_to(staging)

    result.out_dir = out_dir
    result.gguf = {t: move(p) for t, p in result.gguf.items()}
    result.modelfile = move(result.modelfile) if result.modelfile is not None else None
    for rt in result.round_trips:
        rt.gguf = move(rt.gguf)
    if result.quantized:
        result.quantized["folder"] = str(out_dir / result.quantized["method"])
    for info in result.weight_quant.values():
        info["folder"] = str(out_dir / info["method"])
    return result


def _write_gguf_and_modelfile(result: ExportResult, cfg: ExportConfig, types: list[str], art: Artifact,
                              template, tokenizer) -> None:
    from tunelab.export.gguf_quant import KQUANT_TYPES, NUMPY_TYPES, find_quantizer, kquantize_gguf, quantize_gguf
    from tunelab.export.modelfile import build_modelfile, write_modelfile

    name = export_name(art)
    folder = result.out_dir / "gguf"
    kquant_types = [t for t in types if t in KQUANT_TYPES]
    if kquant_types:
        find_quantizer(art.model_cfg.cache_dir)  # before any conversion: say at once what is missing
    for outtype in [t for t in types if t not in NUMPY_TYPES + KQUANT_TYPES]:  # llama.cpp's converter writes these
        result.gguf[outtype] = convert_to_gguf(result.out_dir, folder / f"{name}-{outtype}.gguf", outtype,
                                               cfg.converter_dir, art.model_cfg.cache_dir)
    numpy_types = [t for t in types if t in NUMPY_TYPES + KQUANT_TYPES]
    if numpy_types:  # quantized from a 16-bit GGUF: the one asked for, or a temporary f16
        source = next((result.gguf[t] for t in ("bf16", "f16", "f32") if t in result.gguf), None)
        temporary = source is None
        if temporary:
            source = convert_to_gguf(result.out_dir, folder / f".{name}-f16.gguf", "f16", cfg.converter_dir,
                                     art.model_cfg.cache_dir)
        imatrix = _imatrix(result, cfg, art, template, tokenizer, source) if kquant_types else None
        for outtype in numpy_types:
            target = folder / f"{name}-{outtype}.gguf"
            result.gguf[outtype] = (kquantize_gguf(source, target, outtype, art.model_cfg.cache_dir, imatrix=imatrix)
                                    if outtype in KQUANT_TYPES else quantize_gguf(source, target, outtype))
        if temporary:
            source.unlink()
    result.gguf = {t: result.gguf[t] for t in types}
    if cfg.ollama:  # the smallest file: Ollama users run the quantized one
        gguf_file = min(result.gguf.values(), key=lambda p: p.stat().st_size)
        system = art.run_config.data.system if art.run_config is not None else None
        modelfile = build_modelfile(gguf_file.name, template, tokenizer, system=system,
                                    parameters={"num_ctx": _context_length(result.out_dir)})
        result.modelfile = write_modelfile(gguf_file.parent, modelfile)
        result.modelfile_problems = modelfile.mismatches
        if modelfile.family is None:
            result.notes.append("Modelfile has no TEMPLATE: unknown chat template family (see the Modelfile)")


def _imatrix(result: ExportResult, cfg: ExportConfig, art: Artifact, template, tokenizer, source: Path) -> Path | None:
    """The importance matrix for the k-quants (imatrix.py), recorded in result.imatrix and its notes."""
    from tunelab.export.imatrix import ImatrixInfo, build_imatrix

    if cfg.imatrix:
        result.imatrix = build_imatrix(art, template, tokenizer, source, source.parent / "imatrix.gguf",
                                       result.out_dir)
    else:
        result.imatrix = ImatrixInfo(None, reason="turned off (export.imatrix: false)")
    result.notes.append(result.imatrix.describe())
    return result.out_dir / result.imatrix.file if result.imatrix.file else None


def training_template(art: Artifact, tokenizer):
    """The template the run trained with; Qwen3-style thinking on/off stays baked into its text (data.templates)
    so the exported tokenizer renders what training saw without the caller passing enable_thinking."""
    thinking = art.run_config.data.enable_thinking if art.run_config is not None else None
    return load_template(tokenizer, None, art.template_file, thinking)


def export_name(art: Artifact) -> str:
    return art.name.replace("+", "-").replace("/", "-")


def default_output_dir(source: str, art: Artifact) -> Path:
    """<run>/export for runs; <folder>-export next to an adapter or model folder; ./<name>-export otherwise."""
    if art.run_dir is not None:
        return RunDir(art.run_dir).export_dir
    path = Path(source).expanduser()
    return path.parent / f"{path.name}-export" if path.exists() else Path(f"{export_name(art)}-export")


def _context_length(folder: Path) -> int:
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return min(int(config.get("max_position_embeddings") or 4096), 8192)


def _provenance(art: Artifact, kind: str, template, model, gguf_types: list[str]) -> dict:
    info = {
        "kind": kind,
        "source": str(art.run_dir or art.adapter_path or art.base_path),
        "base_model": art.model_cfg.name,
        "adapter": "prefix_adapter" if kind == "prefix" else None,
        "template": template.name,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "gguf": gguf_types,
    }
    if art.run_config is not None:
        info["method"] = art.run_config.method.name
    return info
