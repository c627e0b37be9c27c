"""Export, optional step: GPTQ / AWQ 4-bit weight-only (W4A16) copies of the MERGED model, calibrated on the run's
own training data, through GPT-QModel (`gptqmodel`, ModelCloud's maintained successor of the archived auto-gptq).

gptqmodel also writes a per-layer quantization log to ./logs/ in the working directory (a fixed relative path in
gptqmodel 7.6; not configurable). The copies go to <out>/gptq/ and <out>/awq/: safetensors with a `quantization_config` that transformers (with
gptqmodel installed) and vLLM load. `check_weight_quant` runs before anything is written, so a missing library or
an environment it cannot run in is refused at once with what to install (docs/export.md, "GPTQ and AWQ").
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

METHODS = ("gptq", "awq")
INSTALL = "pip install 'tunelab[gptq]'"
# 7.7 requires torch>=2.14.1: pip would replace tunelab's torch (with a CUDA build on Linux); 7.6 accepts torch>=2.8
SUPPORTED = ("7.6",)
BITS = 4
GROUP_SIZE = 128  # the usual W4A16 group; a layer whose input size it does not divide uses the largest that does


def asked_methods(cfg) -> list[str]:
    """The weight-only quantizations an ExportConfig asks for, in a fixed order."""
    return [m for m in METHODS if getattr(cfg, m)]


def check_weight_quant(methods: list[str]) -> None:
    """Refuse, before anything is written, a GPTQ/AWQ export this environment cannot run."""
    if not methods:
        return
    import torch

    flags = " / ".join(f"--{m}" for m in methods)
    if "awq" in methods and not torch.cuda.is_available():  # gptqmodel 7.6 has no CPU AWQ kernel
        raise TunelabError("export --awq needs a CUDA GPU: GPT-QModel 7.6 selects no AWQ kernel without CUDA "
                           "(\"AWQ: CUDA is not available\"); on CPU use --gptq (or GGUF q4_1/q5_1). Nothing was written.")
    missing = [name for name in ("gptqmodel", "optimum") if importlib.util.find_spec(name) is None]
    if missing:
        raise TunelabError(
            f"export {flags} needs GPT-QModel (and optimum, with which transformers loads the result); not "
            f"installed: {', '.join(missing)}. {INSTALL} (gptqmodel 7.6.x; 7.7 requires torch>=2.14.1 and would "
            "replace this torch). Nothing was written."
        )
    version = importlib.metadata.version("gptqmodel")
    if not version.startswith(SUPPORTED):
        raise TunelabError(f"export {flags}: gptqmodel {version} is installed; tunelab is tested with "
                           f"{', '.join(v + '.x' for v in SUPPORTED)} ({INSTALL}). Nothing was written.")


def calibration_texts(art, template, n: int) -> list[str]:
    """Up to `n` of the run's training conversations rendered with its training template (what the model saw)."""
    if art.run_config is None:
        raise TunelabError("GPTQ/AWQ calibrate on the run's training data: export a run folder, not a plain "
                           "adapter or model")
    from tunelab.data.pipeline import load_all

    conversations, _, _ = load_all(art.run_config.data)
    texts = [c.text if c.is_text else template.render(c.to_template_messages(), tools=c.tools,
                                                        add_generation_prompt=False)
             for c in conversations[:n]]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TunelabError(f"{art.run_dir}: the run's data gave no calibration text for GPTQ/AWQ")
    return texts


def group_size_for(folder: Path) -> int:
    """GROUP_SIZE, or the largest power of two <= it that divides every Linear input (tiny test models)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    sizes = [config.get("hidden_size"), config.get("intermediate_size")]
    group = GROUP_SIZE
    while group > 8 and any(s and s % group for s in sizes):
        group //= 2
    return group


def quantize_weights(merged_dir: Path, method: str, calibration: list[str], device: str = "cpu") -> dict:
    """Write <merged_dir>/<method>/ (GPTQ or AWQ W4A16) and return {method, folder, size_bytes, seconds}."""
    import os

    if device == "cpu":  # gptqmodel's CPU pool gets (cores + 1) // 2 workers, its model loader asks for 2: on a
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 1) // 2)))  # 2-core CPU fails
    from gptqmodel import AWQConfig, GPTQConfig, GPTQModel

    target = merged_dir / method
    if target.exists():
        shutil.rmtree(target)
    group = group_size_for(merged_dir)
    config = (GPTQConfig if method == "gptq" else AWQConfig)(bits=BITS, group_size=group)
    start = time.perf_counter()
    try:
        model = GPTQModel.load(str(merged_dir), config, device=device)
        model.quantize(calibration, batch_size=1)
        model.save(str(target))
    except Exception as e:
        raise TunelabError(f"{method} quantization failed ({type(e).__name__}: {e})") from e
    seconds = time.perf_counter() - start
    for name in ("chat_template.jinja",):  # the exact training template, as in the merged folder
        if (merged_dir / name).is_file():
            shutil.copy2(merged_dir / name, target / name)
    size = sum(p.stat().st_size for p in target.rglob("*.safetensors"))
    info = {"method": method, "folder": method, "bits": BITS, "group_size": group, "size_bytes": size,
            "calibration_examples": len(calibration), "seconds": round(seconds, 1)}
    (target / "tunelab_export.json").write_text(json.dumps({"kind": "weight_quant", **info}, indent=2),
                                                encoding="utf-8")
    log.info("%s W4A16 (group %d) in %.0f s: %s", method, group, seconds, target)
    return {**info, "folder": str(target)}
