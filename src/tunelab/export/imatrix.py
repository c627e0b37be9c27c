"""Export, k-quants: an importance matrix from the run's own training text (llama.cpp's llama-imatrix).

llama-quantize spends its k-quant error budget where activations are large when given an importance matrix (the
mean squared activation per input column of every weight matrix). tunelab computes it on a slice of the run's
training conversations rendered with the run's own template (special tokens parsed as such, as in training), so
the matrix reflects what the model will be prompted with; the held-out conversations the export table scores are
left out. Written to <out>/gguf/imatrix.gguf and reported in the export table. `export.imatrix: false`
(`--no-imatrix`) turns it off; runs without readable training data (a plain adapter or model) get none.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

MAX_TOKENS = 8192  # ~10-30 s of llama-imatrix on 2 cores for a 135M model; enough for a stable matrix
MAX_CONTEXT = 512
MIN_CONTEXT = 64  # llama-imatrix needs 2 contexts of text; below 2 x 64 tokens a matrix means nothing


@dataclass
class ImatrixInfo:
    file: str | None  # relative to the export folder; None when no matrix was made
    examples: int = 0
    tokens: int = 0
    context: int = 0
    reason: str = ""  # why there is none

    def describe(self) -> str:
        if self.file is None:
            return f"k-quants without an importance matrix: {self.reason}"
        return (f"k-quants with an importance matrix from {self.examples} training examples ({self.tokens} tokens, "
                f"context {self.context}, rendered with the run's template): {self.file}")

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_text(conversations, held_out, template, tokenizer, max_tokens: int = MAX_TOKENS) -> tuple[str, int, int]:
    """The first training conversations (held-out ones skipped), rendered with `template`, up to `max_tokens`;
    returns (text, examples, tokens)."""
    skip = {_render(c, template) for c in held_out}
    parts, tokens = [], 0
    for conversation in conversations:
        text = _render(conversation, template)
        if text in skip:
            continue
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if parts and tokens + n > max_tokens:
            break
        parts.append(text)
        tokens += n
    return "".join(parts), len(parts), tokens


def _render(conversation, template) -> str:
    return conversation.text if conversation.is_text else template.render(conversation.to_template_messages())


def context_for(tokens: int) -> int:
    """The largest context (a multiple of 32, at most MAX_CONTEXT) giving llama-imatrix at least 2 chunks; 0 if
    the text is too short."""
    context = min(MAX_CONTEXT, tokens // 2) // 32 * 32
    return context if context >= MIN_CONTEXT else 0


def build_imatrix(art, template, tokenizer, source_gguf: Path, out_file: Path, export_dir: Path) -> ImatrixInfo:
    """Compute <out_file> for the k-quants of `source_gguf` from the run's training text (see the module doc)."""
    if art.run_config is None:
        return ImatrixInfo(None, reason="no run data (exported a plain adapter or model)")
    from tunelab.data.pipeline import load_all
    from tunelab.export.table import held_out_conversations

    try:
        conversations, _, _ = load_all(art.run_config.data)
    except Exception as e:  # noqa: BLE001 - the data may have moved since training: say so, quantize without
        return ImatrixInfo(None, reason=f"run data not readable ({type(e).__name__}: {e})")
    held_out, _ = held_out_conversations(art, template, tokenizer)
    text, examples, tokens = calibration_text(conversations, held_out, template, tokenizer)
    context = context_for(tokens)
    if not context:
        return ImatrixInfo(None, examples=examples, tokens=tokens,
                           reason=f"too little training text ({tokens} tokens; needs {2 * MIN_CONTEXT})")
    text_file = out_file.with_name(f".{out_file.stem}-calibration.txt")
    text_file.write_text(text, encoding="utf-8")
    try:
        run_imatrix(source_gguf, text_file, out_file, context, art.model_cfg.cache_dir)
    finally:
        text_file.unlink(missing_ok=True)
    return ImatrixInfo(str(out_file.relative_to(export_dir)), examples, tokens, context)


def run_imatrix(model: Path, text_file: Path, out_file: Path, context: int, cache_dir: str | None = None) -> Path:
    """`llama-imatrix -m MODEL -f TEXT -o OUT -c CONTEXT -b CONTEXT --parse-special` (a GGUF imatrix)."""
    from tunelab.export.llamacpp_build import find_tool

    tool = find_tool("llama-imatrix", cache_dir, purpose="the importance matrix for k-quants (export.imatrix)")
    # relative names, run in the output folder: the matrix records its dataset's name (and the GGUFs the matrix's)
    cmd = [str(tool), "-m", str(model.resolve()), "-f", text_file.name, "-o", str(out_file.resolve()), "-c",
           str(context), "-b", str(context), "--parse-special", "--no-ppl", "--output-format", "gguf"]
    log.info("computing the importance matrix: %s", " ".join(cmd))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=text_file.parent)
    if proc.returncode != 0 or not out_file.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise TunelabError(f"{tool} failed to compute the importance matrix from {text_file.name}:\n{tail}\n"
                           "Set export.imatrix: false (--no-imatrix) to quantize without one")
    return out_file
