"""Export, optional last step: upload an export folder to the Hugging Face Hub with a model card from run.json.

The card (README.md, written into the export before uploading) names the base model, method, data fingerprint,
metrics and chat template of the run. Uploads go through huggingface_hub's `HfApi.upload_folder`, with the exact
file list of `hub_files` (hidden staging files and tunelab's own reports excluded).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs.rundir import RunDir

EXCLUDED = ("export_table.json",)  # the card carries the table; the json stays local


def hub_files(out_dir: Path) -> list[str]:
    """The paths (relative, sorted) that `push_to_hub` uploads."""
    files = [p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()]
    return sorted(f for f in files if not any(part.startswith(".") for part in f.split("/")) and f not in EXCLUDED)


def model_card(out_dir: Path, run_dir: Path | None, repo_id: str) -> str:
    """README.md for the Hub: YAML header (base_model, library, tags) and what the run did."""
    marker = _read_json(out_dir / "tunelab_export.json")
    run = _read_json(RunDir(run_dir).run_json) if run_dir is not None else {}
    base = marker.get("base_model") or run.get("base_model") or "unknown"
    method = marker.get("method") or run.get("method") or marker.get("kind", "")
    lines = ["---", f"base_model: {base}", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- tunelab", f"- {method}" if method else "- fine-tuned", "---", "",
             f"# {repo_id.split('/')[-1]}", "",
             (f"Fine-tuned from `{base}` with tunelab ({method}); exported as {marker.get('kind', 'a model')} "
             f"in {marker.get('dtype', '?')}."), "",
             "| | |", "|---|---|", f"| base model | `{base}` |", f"| method | {method} |",
             f"| chat template | {marker.get('template', '?')} (stored in tokenizer_config.json) |"]
    fingerprint = run.get("data_fingerprint") or (run.get("data") or {}).get("fingerprint")
    if fingerprint:
        lines.append(f"| data fingerprint | `{fingerprint}` |")
    for name, value in sorted((run.get("metrics") or {}).items()):
        lines.append(f"| {name} | {value:.4g} |" if isinstance(value, (int, float)) else f"| {name} | {value} |")
    if (out_dir / "export_table.md").is_file():
        lines += ["", "## Artifacts", "", (out_dir / "export_table.md").read_text(encoding="utf-8").strip()]
    return "\n".join(lines) + "\n"


def push_to_hub(out_dir: Path, repo_id: str, run_dir: Path | None = None, *, private: bool = True,
                token: str | None = None, api=None):
    """Write README.md (model card) into `out_dir` and upload `hub_files(out_dir)` to `repo_id`."""
    if api is None:
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise TunelabError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
        api = HfApi(token=token)
    (out_dir / "README.md").write_text(model_card(out_dir, run_dir, repo_id), encoding="utf-8")
    files = hub_files(out_dir)
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), allow_patterns=files,
                                 commit_message="Upload model exported by tunelab")
    except Exception as e:
        raise TunelabError(f"could not upload {out_dir} to the Hub repo {repo_id}: {type(e).__name__}: {e}") from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
