"""Data sources, the first step of the data stage: files, folders, LLaMA-Factory registries -> Conversations.

Reads JSON, JSONL, CSV, Parquet, plain text and `datasets.save_to_disk` folders. Every record that cannot be used
becomes a Reject naming its file, line (or record index), field and what was expected; files that cannot be read
at all (broken JSON, non-UTF-8 JSON or CSV) raise DataError with the same detail.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.schema import DatasetSpec
from tunelab.data.formats import (
    FormatOptions,
    RecordError,
    detect_format,
    get_format,
    known_formats,
    make_substituter,
    substitute_conversation,
)
from tunelab.data.types import LoadResult, Reject
from tunelab.errors import DataError

log = logging.getLogger(__name__)
REGISTRY_FILE = "dataset_info.json"
LF_DEFAULT_FORMATTING = "alpaca"  # dataset_info.json's default `formatting` (LLaMA-Factory)
TEXT_FORMAT = "text"  # an alpaca entry of plain-text files (or only a prompt column) is read as text
SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_SKIP = re.compile(r"[\s,]*")


@dataclass
class DatasetSource:
    """Where one configured dataset's records come from and how to read them."""

    name: str
    files: list[Path]
    format: str = "auto"
    options: FormatOptions = field(default_factory=FormatOptions)
    max_samples: int | None = None
    text_unit: str = "line"


# ------------------------------------------------------------------------------------------------------ resolving
def read_registry(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / REGISTRY_FILE
    if not path.is_file():
        raise DataError(f"no {REGISTRY_FILE} in {dataset_dir} (data.dataset_dir); datasets given by name are "
                        f"looked up there")
    try:
        registry = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(registry, dict):
        raise DataError(f"{path}: expected an object mapping dataset names to entries")
    return registry


def resolve_source(spec: DatasetSpec, dataset_dir: str | Path | None, preference: bool = False) -> DatasetSource:
    """Where a dataset's records are and how to read them; `preference` (alignment stages) accepts the
    ranking/KTO datasets supervised fine-tuning refuses."""
    if spec.ranking and not preference:
        raise DataError(f"dataset {spec.path or spec.name!r} has ranking: true (chosen/rejected answers, for the "
                        "alignment stages); supervised fine-tuning needs one answer per prompt")
    if spec.name is not None:
        source = _from_registry(spec.name, dataset_dir, preference)
    else:
        source = DatasetSource(spec.path, _expand_path(spec.path))
    if spec.format != "auto":
        source.format = spec.format
    source.options = FormatOptions({**source.options.columns, **spec.columns}, {**source.options.tags, **spec.tags})
    caps = [c for c in (source.max_samples, spec.max_samples) if c]
    source.max_samples = min(caps) if caps else None
    source.text_unit = spec.text_unit
    if source.format == "auto" and source.files and all(SUFFIXES.get(f.suffix) == "text" for f in source.files):
        source.format = "text"
    return source


def _from_registry(name: str, dataset_dir: str | Path | None, preference: bool = False) -> DatasetSource:
    if dataset_dir is None:
        raise DataError(f"dataset {name!r} is given by name but data.dataset_dir is not set (the folder holding "
                        f"{REGISTRY_FILE})")
    registry = read_registry(dataset_dir)
    where = f"{Path(dataset_dir) / REGISTRY_FILE}: dataset {name!r}"
    if name not in registry:
        raise DataError(f"{where} is not registered; known: {', '.join(sorted(registry)) or '(none)'}")
    entry = registry[name]
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with file_name, formatting, columns")
    if "file_name" not in entry:
        hub = [k for k in _HUB_KEYS if k in entry]
        raise DataError(f"{where} has no file_name" + (f" (only {hub[0]}: {entry[hub[0]]!r}); download it and add a "
                                                        "local file_name" if hub else ""))
    columns = dict(entry.get("columns") or {})
    _refuse_unsupported(where, entry, columns, preference)
    formatting = entry.get("formatting", "auto" if preference else LF_DEFAULT_FORMATTING)  # preference: detected
    known = _preference_format_choices() if preference else known_formats()
    if formatting not in known:
        raise DataError(f"{where}: formatting {formatting!r} is not supported; expected one of the registered "
                        f"formats: {', '.join(known)}")
    files = _expand_path(str(Path(dataset_dir) / entry["file_name"]))
    is_text = not preference and (set(columns) == {"prompt"} or all(SUFFIXES.get(f.suffix) == "text" for f in files))
    fmt = TEXT_FORMAT if formatting == LF_DEFAULT_FORMATTING and is_text else formatting
    return DatasetSource(name, files, fmt, FormatOptions(columns, dict(entry.get("tags") or {})),
                         entry.get("num_samples"))


def _preference_format_choices() -> list[str]:
    from tunelab.data.preference_formats import dataset_format_choices

    return dataset_format_choices()


def _refuse_unsupported(where: str, entry: dict, columns: dict, preference: bool = False) -> None:
    preference_data = entry.get("ranking") or "chosen" in columns or "rejected" in columns
    if preference_data and not preference:
        raise DataError(f"{where} is a preference dataset (ranking: chosen/rejected answers) for DPO-style "
                        "training; supervised fine-tuning needs one answer per prompt")
    if "kto_tag" in columns and not preference:
        raise DataError(f"{where} is a KTO dataset (good/bad labels per answer); supervised fine-tuning would "
                        "learn the bad answers too")
    media = [k for k in ("images", "videos", "audios") if k in columns]
    if media:
        raise DataError(f"{where} has {', '.join(media)}: multimodal data is not supported")


def _expand_path(path: str) -> list[Path]:
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no files match {path}")
        return files
    p = Path(path).expanduser()
    if p.is_file() or _is_saved_dataset(p):
        return [p]
    if p.is_dir() and (p / REGISTRY_FILE).is_file():
        names = ", ".join(sorted(read_registry(p))[:8])
        raise DataError(f"{p} is a dataset registry folder ({REGISTRY_FILE}): set data.dataset_dir: {p} and list "
                        f"its datasets by name (e.g. {names})")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"folder {p} has no data files ({', '.join(SUFFIXES)})")
        return files
    raise DataError(f"dataset file not found: {p}")


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def source_files(spec: DatasetSpec, dataset_dir: str | Path | None, preference: bool = False) -> list[Path]:
    """Every file a dataset reads (for the cache fingerprint), registry included."""
    files = resolve_source(spec, dataset_dir, preference).files
    if spec.name is not None:
        files = [Path(dataset_dir) / REGISTRY_FILE, *files]
    out = []
    for f in files:
        out += sorted(x for x in f.rglob("*") if x.is_file()) if f.is_dir() else [f]
    return out


# -------------------------------------------------------------------------------------------------------- reading
def iter_records(path: Path, text_unit: str = "line") -> Iterator[tuple[str, dict | Reject]]:
    """(source, record) for every record of a file; unusable lines come as Rejects, in order."""
    if _is_saved_dataset(path):
        yield from _read_saved(path)
        return
    kind = SUFFIXES.get(path.suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if kind == "parquet":
        yield from _read_parquet(path)
        return
    data = path.read_bytes()
    if not data.removeprefix(b"\xef\xbb\xbf").strip():
        raise DataError(f"{path}: the file is empty" + (" (only whitespace)" if data.strip() else ""))
    if kind == "json" and data.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"{":
        single = _single_object(path, data)  # one pretty-printed record, else JSON Lines named .json
        if single is not None:
            yield single
            return
        kind = "jsonl"
    if kind == "jsonl":
        yield from _read_jsonl(path, data)
    elif kind == "json":
        yield from _read_json_array(path, _decode(path, data))
    elif kind == "csv":
        yield from _read_csv(path, _decode(path, data))
    else:
        yield from _read_text(path, data, text_unit)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: byte 0x{data[e.start]:02x} (offset {e.start}) is not valid UTF-8; "
                        "save the file as UTF-8") from None


def _utf8_lines(path: Path, data: bytes) -> Iterator[tuple[int, str | Reject]]:
    """Lines of a line-based file; a line with invalid UTF-8 becomes a Reject instead of failing the file."""
    try:
        lines = data.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError:
        lines = None
    raw = data.split(b"\n") if lines is None else lines
    for number, line in enumerate(raw, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield number, Reject(f"{path}:{number}", "", f"byte 0x{line[e.start]:02x} at column {e.start + 1} is "
                                     "not valid UTF-8; save the file as UTF-8", "utf8")
                continue
        yield number, line


def _single_object(path: Path, data: bytes) -> tuple[str, dict | Reject] | None:
    """A .json file holding exactly one JSON object (pretty-printed over many lines) is one record; None when it
    is something else (JSON Lines: several objects, one per line)."""
    try:
        text = data.decode("utf-8-sig")
        record = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    except RecursionError:
        return f"{path}:1", Reject(f"{path}:1", "", _TOO_DEEP, "json")
    return f"{path}:1", _as_record(f"{path}:1", record, text)


_TOO_DEEP = "not usable JSON: nested too deeply (thousands of brackets)"


def _read_jsonl(path: Path, data: bytes) -> Iterator[tuple[str, dict | Reject]]:
    for number, line in _utf8_lines(path, data):
        source = f"{path}:{number}"
        if isinstance(line, Reject):
            yield source, line
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield source, Reject(source, "", f"not valid JSON: {e.msg} (column {e.colno})", "json")
            continue
        except RecursionError:
            yield source, Reject(source, "", _TOO_DEEP, "json")
            continue
        yield source, _as_record(source, record, line)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _as_record(source: str, record, raw: str = "") -> dict | Reject:
    if not isinstance(record, dict):
        return Reject(source, "", f"expected a JSON object (a record), got {type(record).__name__}", "json")
    if _SURROGATE_ESCAPE.search(raw):  # the only way a lone surrogate gets in: a \ud83d escape without its pair
        found = _lone_surrogate(record)
        if found is not None:
            where, char = found
            return Reject(source, where, f"contains a lone UTF-16 surrogate \\u{ord(char):04x} (half of a character, "
                          "e.g. an emoji cut in two); fix the escape or remove it", "utf8")
    return record


def _lone_surrogate(value, where: str = "") -> tuple[str, str] | None:
    """(field path, character) of the first string holding an unpaired surrogate, which no tokenizer can encode."""
    if isinstance(value, str):
        bad = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
        return (where, bad) if bad else None
    if isinstance(value, dict):
        children = [(f"{where}.{k}" if where else k, x) for k, v in value.items() for x in (k, v)]
    elif isinstance(value, list):
        children = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    return next((found for path, child in children if (found := _lone_surrogate(child, path))), None)


def _read_json_array(path: Path, text: str) -> Iterator[tuple[str, dict | Reject]]:
    """Decode a JSON array element by element, so each record knows its line (for error messages)."""
    decoder = json.JSONDecoder()
    pos = _SKIP.match(text, 0).end()
    if text[pos:pos + 1] != "[":
        raise DataError(f"{path}: expected a JSON array of records (or JSON Lines), got {text[pos:pos + 20]!r}")
    pos, line, counted = pos + 1, 1, 0
    if text[_SKIP.match(text, pos).end():].strip() == "]":
        raise DataError(f"{path}: an empty JSON array (no records)")
    while True:
        pos = _SKIP.match(text, pos).end()
        if text[pos:pos + 1] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        source = f"{path}:{line}"
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
        except RecursionError:
            end = _value_end(path, text, pos)
            yield source, Reject(source, "", _TOO_DEEP, "json")
        else:
            yield source, _as_record(source, record, text[pos:end])
        pos = end


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _value_end(path: Path, text: str, pos: int) -> int:
    """End of the JSON value starting at pos, found by counting brackets (for values too deep to decode)."""
    depth = 0
    for m in _TOKEN.finditer(text, pos):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(m.group(0), 0)
        if depth == 0:
            return m.end()
    raise DataError(f"{path}: not valid JSON: a value nested too deeply is never closed")


def _read_csv(path: Path, text: str) -> Iterator[tuple[str, dict | Reject]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    _warn_data_like_header(path, reader.fieldnames or [])
    start = 2  # line 1 is the header
    for row in reader:
        source = f"{path}:{start}"
        start = reader.line_num + 1
        if None in row:  # more cells than header columns
            yield source, Reject(source, "", f"has {len(reader.fieldnames) + len(row[None])} cells but the header has "
                                 f"{len(reader.fieldnames)}", "csv")
            continue
        yield source, {k: v for k, v in row.items() if v is not None}


_KNOWN_COLUMNS = {"instruction", "input", "output", "system", "history", "text", "prompt", "response", "query",
                  "conversations", "messages", "tools", "question", "answer", "context"}
_NUMBER = re.compile(r"[-+]?\d[\d,.]*%?")


def _warn_data_like_header(path: Path, header: list[str]) -> None:
    """csv.DictReader takes the first row as column names: a file without a header row loses its first record and
    names its columns after it. Say which header was assumed when it looks like data."""
    cells = [c.strip() for c in header]
    if not cells or any(c.lower() in _KNOWN_COLUMNS for c in cells):
        return
    data_like = [c for c in cells if not c or _NUMBER.fullmatch(c) or len(c) > 40 or len(c.split()) > 4
                 or c[-1:] in "?.!:" or len(set(cells)) < len(cells)]
    if data_like:
        log.warning("%s: took the first row as the header (columns %s), but it looks like data (%r); a CSV needs a "
                    "header row naming its columns, e.g. instruction,input,output", path,
                    ", ".join(repr(c) for c in header), data_like[0])


def _read_text(path: Path, data: bytes, text_unit: str) -> Iterator[tuple[str, dict | Reject]]:
    if text_unit == "file":
        yield str(path), {"text": _decode(path, data)}
        return
    for number, line in _utf8_lines(path, data):
        source = f"{path}:{number}"
        if isinstance(line, Reject):
            yield source, line
        elif line.strip():
            yield source, {"text": line.rstrip("\r")}


def _read_parquet(path: Path) -> Iterator[tuple[str, dict | Reject]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
    for i, row in enumerate(rows):
        yield f"{path}#{i}", row


def _read_saved(path: Path) -> Iterator[tuple[str, dict | Reject]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    for i, row in enumerate(ds.to_list()):
        yield f"{path}#{i}", row


# ------------------------------------------------------------------------------------------------------- loading
Converter = Callable[[dict], Any]


def convert_records(source: DatasetSource, choose: Callable[[dict], Converter]) -> Iterator[tuple[str, Any]]:
    """(where, converted record or Reject) for every record of `source`, in order; `choose(first usable record)`
    returns the converter used for all of them (the format is detected once). SFT and preference data share it."""
    convert = None
    for path in source.files:
        for where, record in iter_records(path, source.text_unit):
            if not isinstance(record, Reject):
                try:
                    convert = convert or choose(record)
                    record = convert(record)
                except RecordError as e:
                    record = Reject(where, e.field, e.reason, e.rule)
            yield where, record


def load_conversations(spec: DatasetSpec, dataset_dir: str | Path | None = None,
                       variables: dict[str, str] | None = None) -> LoadResult:
    """Read one configured dataset into Conversations; bad records are collected as rejects, not raised."""
    source = resolve_source(spec, dataset_dir)
    result = LoadResult(name=source.name)

    def choose(first: dict) -> Converter:
        fmt = detect_format(first, source.options) if source.format == "auto" else source.format
        options, convert = source.options.for_format(fmt), get_format(fmt)
        return lambda record: convert(record, options)

    for where, conv in convert_records(source, choose):
        result.records_read += 1
        if isinstance(conv, Reject):
            result.rejects.append(conv)
            continue
        conv.source = where
        result.conversations.append(conv)
    if source.max_samples is not None:  # the first N usable records (num_samples / max_samples)
        result.conversations = result.conversations[:source.max_samples]
    substitute = make_substituter(variables or {})
    if substitute is not None:
        for conv in result.conversations:
            substitute_conversation(conv, substitute)
    return result

