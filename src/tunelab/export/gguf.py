"""Export, step 2: write GGUF files (llama.cpp, Ollama, LM Studio) from the merged Hugging Face folder.

PyPI's `gguf` reads and writes the format but has no HF -> GGUF converter. llama.cpp's converter
(convert_hf_to_gguf.py with its conversion/ package and a newer gguf-py) ships inside the llama-cpp-python
source distribution on PyPI, pure Python, nothing to compile. tunelab downloads that sdist once with pip,
extracts only the converter into the cache (~/.cache/tunelab/llama.cpp/), and runs it in a subprocess with its
vendored gguf-py first on PYTHONPATH (PyPI's gguf is too old for it). No llama.cpp file is kept in tunelab.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.files import staged_folder
from tunelab.models.resolve import cache_root

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the sdist whose vendor/llama.cpp holds the converter; tested with it
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes (q4/q5: gguf_quant.py)
_KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE", "conversion/", "gguf-py/")


class ConverterUnavailableError(TunelabError):
    pass


def converter_home(cache_dir: str | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root(cache_dir) / "llama.cpp" / f"llama-cpp-python-{version}"


def find_converter(converter_dir: str | None = None, cache_dir: str | None = None, fetch: bool = True) -> Path:
    """The folder holding convert_hf_to_gguf.py: `converter_dir` (a llama.cpp checkout) or the cached copy,
    fetched now when missing and `fetch` is true."""
    if converter_dir:
        home = Path(converter_dir).expanduser()
        if not (home / "convert_hf_to_gguf.py").is_file() or not (home / "gguf-py").is_dir():
            raise ConverterUnavailableError(
                f"export.converter_dir={home}: expected a llama.cpp checkout with convert_hf_to_gguf.py and gguf-py/"
            )
        return home
    home = converter_home(cache_dir)
    if (home / ".complete").is_file():
        return home
    if not fetch:
        raise ConverterUnavailableError(
            f"the GGUF converter is not in {home}; fetch it once with `tunelab export --fetch-converter` (or "
            "`make setup`), which needs access to PyPI"
        )
    return fetch_converter(cache_dir)


def fetch_converter(cache_dir: str | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Download the llama-cpp-python sdist with pip and keep only llama.cpp's Python converter (~2 MB)."""
    home = converter_home(cache_dir, version)
    if (home / ".complete").is_file():
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
               f"llama-cpp-python=={version}", "-d", tmp]
        log.warning("fetching llama.cpp's GGUF converter: pip download llama-cpp-python==%s (77 MB, once)", version)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise ConverterUnavailableError(
                f"could not download llama-cpp-python=={version} from PyPI to get the GGUF converter:\n{tail}\n"
                "Run `tunelab export --fetch-converter` where PyPI is reachable, or set export.converter_dir to a "
                "llama.cpp checkout"
            )
        with staged_folder(home) as staging:
            _extract_converter(archives[0], staging)
    (home / ".complete").write_text(version, encoding="utf-8")
    return home


def _extract_converter(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/vendor/llama.cpp/", 1)
            if len(parts) != 2 or not parts[1].startswith(_KEEP) or not (member.isfile() or member.isdir()):
                continue
            target = (dest / parts[1]).resolve()
            if not str(target).startswith(str(dest.resolve())):  # never follow ../ out of the cache
                continue
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise ConverterUnavailableError(f"{archive.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")


def convert_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16", converter_dir: str | None = None,
                    cache_dir: str | None = None, overwrite: bool = False) -> Path:
    """Convert a merged Hugging Face folder to one GGUF file of `outtype` (f32, f16, bf16, q8_0). An existing
    `out_file` is refused unless `overwrite`; the file appears under its name only once complete."""
    from tunelab.export.target import refuse_existing_file

    if outtype not in GGUF_TYPES:
        raise TunelabError(f"GGUF type {outtype!r} is not supported; choose from {', '.join(GGUF_TYPES)}")
    refuse_existing_file(out_file, overwrite, written_by_tunelab=False)
    home = find_converter(converter_dir, cache_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(home / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")
    cmd = [sys.executable, str(home / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(partial),
           "--outtype", outtype]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not partial.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise TunelabError(f"GGUF conversion to {outtype} failed for {hf_dir}:\n{tail}")
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file


@dataclass
class GgufInfo:
    architecture: str
    chat_template: str | None
    eos_token: str | None
    bos_token: str | None
    eot_token: str | None
    add_bos: bool | None
    file_type: int | None


def read_gguf_info(path: Path) -> GgufInfo:
    """Chat template and special tokens stored in a GGUF's metadata (read with PyPI's gguf.GGUFReader)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str):
        field = reader.get_field(key)
        return field.contents() if field is not None else None

    tokens = value("tokenizer.ggml.tokens") or []

    def token(key: str) -> str | None:
        index = value(key)
        return tokens[index] if index is not None and index < len(tokens) else None

    return GgufInfo(value("general.architecture"), value("tokenizer.chat_template"),
                    token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.bos_token_id"),
                    token("tokenizer.ggml.eot_token_id"), value("tokenizer.ggml.add_bos_token"),
                    value("general.file_type"))
