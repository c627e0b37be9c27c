"""Evaluation stage, input: turn evaluation data (any format the data stage reads) into prompt/reference pairs.

Each conversation is split before its last assistant message: everything before is the prompt the model answers,
that message is the reference. The whole conversation is kept for the loss, which scores every trained token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunelab.config.schema import DataConfig, DatasetSpec
from tunelab.data.types import Conversation, Message
from tunelab.errors import DataError, TunelabError


@dataclass
class EvalExample:
    conversation: Conversation  # the full record, reference included (for the loss)
    messages: list[dict[str, Any]]  # the prompt: every message before the reference
    reference: str
    pair: Any = None  # preference data: the PreferenceExample (reference = its chosen reply)

    @property
    def rejected(self) -> str | None:
        return self.pair.rejected.content if self.pair is not None and self.pair.rejected is not None else None

    @property
    def source(self) -> str:
        return self.conversation.source

    @property
    def tools(self) -> list[dict] | None:
        return self.conversation.tools


def split_conversation(conv: Conversation, index: int, need_answer: bool = True) -> EvalExample:
    where = conv.source or f"example {index}"
    if conv.is_text:  # plain text (continued pretraining): a loss is defined, an answer to compare with is not
        if need_answer:
            raise DataError(f"{where}: a plain-text record has no prompt and answer; evaluate it with "
                            "eval.metrics=[loss,perplexity] only, or use chat-formatted data")
        return EvalExample(conv, [], "")
    if not conv.messages or conv.messages[-1].role != "assistant":
        last = conv.messages[-1].role if conv.messages else "nothing"
        raise DataError(f"{where}: the last message is from {last}; an evaluation example needs the expected answer "
                        "as its last assistant message (alpaca: an `output` column; sharegpt/openai: a final "
                        "assistant turn)")
    reference = conv.messages[-1].content or ""
    if not reference.strip():
        raise DataError(f"{where}: the reference answer (last assistant message) is empty")
    prompt = conv.messages[:-1]
    if not any(m.role == "user" for m in prompt):
        raise DataError(f"{where}: no user message before the answer; nothing to prompt the model with")
    return EvalExample(conv, [m.to_template_dict() for m in prompt], reference)


def with_system(conv: Conversation, system: str | None) -> Conversation:
    """Give a record without a system message the default one, as training did (data.system)."""
    if not system or conv.is_text or (conv.messages and conv.messages[0].role == "system"):
        return conv
    return replace(conv, messages=[Message("system", system), *conv.messages])


def as_specs(data: Any) -> list[DatasetSpec]:
    if isinstance(data, DatasetSpec):
        return [data]
    if isinstance(data, (str, Path)):
        path = Path(data).expanduser()
        if not path.exists() and not any(ch in str(data) for ch in "*?["):
            raise TunelabError(f"evaluation data not found: {data}")
        return [DatasetSpec(path=str(path.resolve()) if path.exists() else str(data))]
    if isinstance(data, Sequence) and all(isinstance(d, (DatasetSpec, str, Path)) for d in data):
        return [s for d in data for s in as_specs(d)]
    raise TypeError(f"evaluation data must be a path, a DatasetSpec or a list of Conversation, not {type(data)}")


def load_eval_conversations(specs: list[DatasetSpec], data_cfg: DataConfig) -> list[Conversation]:
    """Read records exactly as training reads them (same readers, cleaning, variables and default system prompt),
    but refuse bad records instead of skipping them: a silently thinner evaluation set is a misleading one."""
    from tunelab.data.pipeline import load_all

    # Duplicates stay: the user chose the evaluation set, and its size must match what they gave.
    cfg = data_cfg.model_copy(update={"datasets": specs, "clean": data_cfg.clean.model_copy(update={"dedup": False})})
    conversations, rejects, _ = load_all(cfg)
    if rejects:
        shown = "\n".join(f"  - {r}" for r in rejects[:5])
        more = f"\n  ... and {len(rejects) - 5} more" if len(rejects) > 5 else ""
        raise DataError(f"{len(rejects)} evaluation record(s) cannot be used; fix or remove them:\n{shown}{more}")
    if not conversations:
        raise DataError(f"no evaluation record in {', '.join(str(s.path or s.name) for s in specs)}")
    return conversations


def validation_conversations(data_cfg: DataConfig, template, tokenizer) -> list[Conversation]:
    """The held-out split training made: same loading, encoding filter and seeded shuffle as prepare_data."""
    from tunelab.data.encode import EncodeSettings, encode_batch
    from tunelab.data.pipeline import load_all, split_examples

    conversations, _, _ = load_all(data_cfg)
    # no chunking: a held-out document is one prompt whatever its length
    settings = EncodeSettings(data_cfg.cutoff_len, data_cfg.train_on)
    encoded, _ = encode_batch(conversations, template, tokenizer, settings)
    kept = [c for c, e in zip(conversations, encoded) if e is not None]
    _, held_out = split_examples(kept, data_cfg.val_size, data_cfg.seed)
    return held_out


def build_examples(conversations: Sequence[Conversation], system: str | None = None,
                   max_samples: int | None = None, need_answer: bool = True) -> list[EvalExample]:
    """Prompt/reference pairs; `need_answer=False` (loss-only evaluation) also accepts plain-text records."""
    conversations = list(conversations)[:max_samples] if max_samples else list(conversations)
    if not conversations:
        raise DataError("the evaluation data holds no example")
    return [split_conversation(with_system(c, system), i, need_answer) for i, c in enumerate(conversations)]


# ------------------------------------------------------------------------------------------- preference data
def is_ranking(spec: DatasetSpec, dataset_dir: str | None) -> bool:
    """A dataset of chosen/rejected pairs: `ranking: true` on the spec or in its dataset_info.json entry, or
    (a file given by path) a first record with both `chosen` and `rejected`."""
    import json

    if getattr(spec, "ranking", False):
        return True
    if spec.name is not None:
        try:
            info = json.loads((Path(dataset_dir or ".") / "dataset_info.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return bool(isinstance(info.get(spec.name), dict) and info[spec.name].get("ranking"))
    record = _first_record(Path(spec.path or ""))
    columns = spec.columns or {}
    return isinstance(record, dict) and all(columns.get(k, k) in record for k in ("chosen", "rejected"))


def _first_record(path: Path) -> Any:
    import json

    if not path.is_file() or path.suffix not in (".json", ".jsonl"):
        return None
    try:
        with path.open(encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                line = next((ln for ln in f if ln.strip()), "")
                return json.loads(line) if line else None
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data[0] if isinstance(data, list) and data else None


def as_ranking(spec: DatasetSpec) -> DatasetSpec:
    if "ranking" in DatasetSpec.model_fields and not getattr(spec, "ranking", False):
        return spec.model_copy(update={"ranking": True})
    return spec


def load_preference_pairs(specs: list[DatasetSpec], data_cfg: DataConfig, strict: bool = True) -> list[Any]:
    """PreferenceExamples read by the data stage's preference loader; bad records are refused (strict) or
    skipped, unpaired (KTO) ones too when not strict (they have no pair to rank)."""
    from tunelab.data.preference import load_preference_examples

    examples, rejects = [], []
    for spec in specs:
        result = load_preference_examples(as_ranking(spec), data_cfg.dataset_dir, data_cfg.variables)
        examples += result.examples
        rejects += result.rejects
    if strict and rejects:
        shown = "\n".join(f"  - {r}" for r in rejects[:5])
        more = f"\n  ... and {len(rejects) - 5} more" if len(rejects) > 5 else ""
        raise DataError(f"{len(rejects)} evaluation record(s) cannot be used; fix or remove them:\n{shown}{more}")
    unpaired = [e for e in examples if e.rejected is None]
    if unpaired and strict:
        raise DataError(f"{unpaired[0].source}: an unpaired (KTO) example has no rejected reply; pairwise accuracy "
                        f"needs chosen and rejected ({len(unpaired)} such record(s))")
    examples = [e for e in examples if e.rejected is not None and e.chosen is not None]
    if not examples:
        raise DataError(f"no chosen/rejected pair in {', '.join(str(s.path or s.name) for s in specs)}")
    return examples


def validation_pairs(data_cfg: DataConfig, template, tokenizer) -> list[Any]:
    """The held-out pairs of a preference run: loaded, cleaned, encoded and split as training prepared them
    (data.preference.prepare_preference_data: the same loader, the same encodable examples, val_size and seed)."""
    from jinja2 import TemplateError

    from tunelab.data.pipeline import split_examples
    from tunelab.data.preference import encode_preference, load_all_preference

    examples, _, _ = load_all_preference(data_cfg, paired=True)
    kept = []
    for example in examples:
        try:
            if encode_preference(example, template, tokenizer, data_cfg.cutoff_len) is not None:
                kept.append(example)
        except (ValueError, TemplateError):  # the template refused it (EncodeError...): training rejected it too
            continue
    _, held_out = split_examples(kept, data_cfg.val_size, data_cfg.seed)
    return held_out


def build_preference_examples(pairs: Sequence[Any], system: str | None = None,
                              max_samples: int | None = None) -> list[EvalExample]:
    """One EvalExample per pair: the prompt is the pair's, the reference its chosen reply (generation metrics
    and the loss score the chosen reply), and the pair itself rides along for the preference scores."""
    pairs = list(pairs)[:max_samples] if max_samples else list(pairs)
    if not pairs:
        raise DataError("the evaluation data holds no preference pair")
    out = []
    for i, pair in enumerate(pairs):
        prompt = with_system(pair.prompt, system)
        if system and prompt is not pair.prompt:
            pair = replace(pair, prompt=prompt)
        conversation = replace(prompt, messages=[*prompt.messages, pair.chosen], source=pair.source or prompt.source)
        example = split_conversation(conversation, i)
        out.append(replace(example, pair=pair))
    return out
