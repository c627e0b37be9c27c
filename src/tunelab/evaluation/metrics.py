"""Evaluation stage: text metrics on generated predictions (BLEU-4, ROUGE-1/2/L, exact match, regex/contains).

Pure functions of (prediction, reference) strings, one registry of metric names. How each metric tokenizes
English and Chinese text is documented in docs/metrics.md; tests pin the numbers against hand computations.
Scores of BLEU and ROUGE are on a 0-100 scale (as sacrebleu and LLaMA-Factory report them); exact match and
checks are 0 or 1 per example, so their mean is a fraction.
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from tunelab.errors import DataError, TunelabError
from tunelab.registry import Registry

# Han ideographs (CJK Unified Ideographs, extensions A-F, compatibility ideographs): the characters that
# jieba segments into words. Other scripts are split into words by the regex below.
_HAN = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+)")
# A word for ROUGE outside Han text: a run of letters/digits (Unicode-aware; on ASCII text this is exactly
# rouge-score's default tokenizer: lowercase, split on anything that is not [a-z0-9]).
_WORD = re.compile(r"[^\W_]+")
_SPACE = re.compile(r"\s+")

MODEL_METRICS = ("loss", "perplexity")  # computed from the model's logits, not from generated text
# Pairwise accuracy and margin on chosen/rejected pairs (evaluation/preference.py): computed on preference data
# whatever the list says; naming it alone (`--metrics preference`) skips generation and the loss.
PREFERENCE_METRIC = "preference"


def _install_hint(package: str) -> TunelabError:
    return TunelabError(f"this metric needs the `{package}` package: pip install 'tunelab[eval]'")


# ---------------------------------------------------------------------------------------------- tokenizers
@lru_cache(maxsize=2)
def _bleu_tokenizer(chinese: bool):
    try:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
        from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh
    except ImportError as e:
        raise _install_hint("sacrebleu") from e
    return TokenizerZh() if chinese else Tokenizer13a()


def has_chinese(text: str) -> bool:
    """True when `text` holds a character sacrebleu's `zh` tokenizer splits off (Han, CJK/full-width punctuation)."""
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return any(TokenizerZh._is_chinese_char(ch) for ch in text)


def bleu_tokens(text: str, chinese: bool | None = None) -> list[str]:
    """BLEU tokens, exactly sacrebleu's: `13a` (mteval-v13a: words and punctuation split, case kept) for English
    and other text without Chinese characters, `zh` (every Chinese character and full-width punctuation mark is a
    token, the rest goes through the same regexes) when `chinese` is true. `chinese=None` decides from `text`.

    The two differ on more than Chinese characters: `zh` does not pad the line with spaces as 13a does, so
    a final `42.` stays one token there. English text must therefore never go through `zh`.
    """
    if chinese is None:
        chinese = has_chinese(text)
    return _bleu_tokenizer(bool(chinese))(text).split()


@lru_cache(maxsize=1)
def _jieba():
    try:
        import jieba
    except ImportError as e:
        raise _install_hint("jieba") from e
    jieba.setLogLevel(60)  # its "Building prefix dict" banner is noise in a report
    return jieba


def rouge_tokens(text: str) -> list[str]:
    """ROUGE tokens: Han runs are segmented into words by jieba (precise mode), everything else is split into
    lower-cased runs of letters and digits. Punctuation and whitespace are never tokens."""
    tokens: list[str] = []
    for i, part in enumerate(_HAN.split(text)):
        if i % 2:  # odd parts are the captured Han runs
            tokens.extend(w for w in _jieba().lcut(part) if _WORD.search(w))
        else:
            tokens.extend(_WORD.findall(part.lower()))
    return tokens


class _RougeTokenizer:
    """Adapter so rouge-score's scorer uses our tokenization (it calls `.tokenize(text)`)."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text)


def normalize_answer(text: str) -> str:
    """Exact match compares texts after Unicode NFKC, trimming and collapsing whitespace; case is kept."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


# ------------------------------------------------------------------------------------------------- metrics
def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 (uniform weights, brevity penalty) with Chen & Cherry smoothing method 3, 0-100.

    Both texts are tokenized as sacrebleu would with `tokenize="zh"` when the reference holds Chinese characters,
    else with its default `13a`. Method 3 (NIST geometric smoothing) replaces the k-th zero n-gram precision by 1 / (2^k * hyp_ngrams), as
    nltk's `SmoothingFunction().method3` and LLaMA-Factory do. No unigram match at all gives 0.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    chinese = has_chinese(reference)  # the reference's language picks the tokenizer, as sacrebleu's user does
    hyp, ref = bleu_tokens(prediction, chinese), bleu_tokens(reference, chinese)
    if not hyp or not ref:
        return 0.0
    return 100.0 * sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3)


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError as e:
        raise _install_hint("rouge-score") from e
    return RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=_RougeTokenizer())


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 (n-gram overlap) and ROUGE-L (longest common subsequence) F1, 0-100."""
    scores = _rouge_scorer().score(reference, prediction)  # rouge-score takes (target, prediction)
    return {
        "rouge-1": 100.0 * scores["rouge1"].fmeasure,
        "rouge-2": 100.0 * scores["rouge2"].fmeasure,
        "rouge-l": 100.0 * scores["rougeL"].fmeasure,
    }


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


@dataclass(frozen=True)
class Check:
    """A pass/fail test of one prediction: `contains` a text, or matches a `regex` (re.search)."""

    kind: str
    pattern: str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.pattern}"

    def __call__(self, prediction: str) -> float:
        if self.kind == "contains":
            return float(self.pattern in prediction)
        return float(re.search(self.pattern, prediction) is not None)


def make_checks(specs: Iterable) -> list[Check]:
    """Checks from config entries (objects with .kind/.pattern or dicts); a bad regex fails here, not mid-run."""
    checks = []
    for spec in specs:
        kind = spec["kind"] if isinstance(spec, dict) else spec.kind
        pattern = spec["pattern"] if isinstance(spec, dict) else spec.pattern
        if kind not in ("contains", "regex"):
            raise TunelabError(f"eval.checks: unknown kind {kind!r}; expected contains or regex")
        if kind == "regex":
            try:
                re.compile(pattern)
            except re.error as e:
                raise TunelabError(f"eval.checks: invalid regular expression {pattern!r}: {e}") from e
        checks.append(Check(kind, pattern))
    return checks


# ------------------------------------------------------------------------------------------------ registry
TextMetric = Callable[[str, str], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """One metric of `eval.metrics`: what it measures and how to read it.

    `score` maps (prediction, reference) to named scores; the model metrics (loss, perplexity) have none: the
    evaluation's loss pass over the references computes them, with no generation.
    """

    name: str
    score: TextMetric | None
    description: str = ""
    keys: tuple[str, ...] = ()  # the score names it reports (default: its own name)
    higher_is_better: bool = True
    needs_generation: bool = True  # scored on generated predictions (False: from the model's logits)

    @property
    def reports(self) -> tuple[str, ...]:
        return self.keys or (self.name,)


METRICS: Registry[Metric] = Registry("metric")


def register_metric(name: str | Metric, fn: TextMetric | None = None, **info) -> Metric:
    """Register a text metric: fn(prediction, reference) -> {score name: value} (or a Metric entry)."""
    return METRICS.register(name if isinstance(name, Metric) else Metric(name, fn, **info))


def unregister_metric(name: str) -> Metric:
    return METRICS.unregister(name)


def metric_info(name: str) -> Metric:
    return METRICS.get(name)


def get_metric(name: str) -> TextMetric:
    entry = metric_info(name)
    if entry.score is None:
        raise TunelabError(f"metric {name!r} is computed from the model's logits, not from a prediction")
    return entry.score


def known_metrics() -> list[str]:
    return METRICS.names()


def needs_generation(name: str) -> bool:
    return metric_info(name).needs_generation


def lower_is_better(score_name: str) -> bool:
    """Whether a reported score improves downwards (loss, perplexity), by the metric that reports it."""
    return any(score_name in m.reports and not m.higher_is_better for m in METRICS)


def check_metric_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise TunelabError(f"eval.metrics: unknown metric(s) {', '.join(unknown)}; "
                           f"known: {', '.join(known_metrics())}")


register_metric("loss", None, description="mean cross-entropy of the reference answers' tokens",
                higher_is_better=False, needs_generation=False)
register_metric("perplexity", None, description="exp(loss)", higher_is_better=False, needs_generation=False)
register_metric("bleu", lambda p, r: {"bleu-4": bleu4(p, r)}, description="sentence BLEU-4, 0-100",
                keys=("bleu-4",))
register_metric("rouge", rouge, description="ROUGE-1/2/L F1, 0-100", keys=("rouge-1", "rouge-2", "rouge-l"))
register_metric("exact_match", lambda p, r: {"exact_match": exact_match(p, r)},
                description="normalized prediction == reference, 0 or 1")
register_metric(PREFERENCE_METRIC, None, description="pairwise accuracy and mean margin of the chosen vs the rejected "
                "reply (preference data; evaluation/preference.py)", needs_generation=False,
                keys=("reward_accuracy", "reward_margin", "rm_accuracy", "rm_margin", "logp_accuracy", "logp_margin"))


# ------------------------------------------------------------------------------------------------- scoring
def score_example(prediction: str, reference: str, metrics: Sequence[str], checks: Sequence[Check] = ()) -> dict:
    """All requested text scores of one example (model metrics such as loss are skipped here)."""
    scores: dict[str, float] = {}
    for name in metrics:
        if needs_generation(name):
            scores.update(get_metric(name)(prediction, reference))
    for check in checks:
        scores[check.name] = check(prediction)
    return scores


def score_predictions(predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str],
                      checks: Sequence[Check] = (), sources: Sequence[str] | None = None) -> list[dict]:
    """Per-example scores; an empty reference is an error naming the example (it would score 0 silently)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    check_metric_names(metrics)
    for i, ref in enumerate(references):
        if not ref or not ref.strip():
            where = sources[i] if sources and sources[i] else f"example {i}"
            raise DataError(f"{where}: the reference answer is empty; every evaluation example needs a non-empty "
                            "last assistant message to compare the prediction with")
    return [score_example(p, r, metrics, checks) for p, r in zip(predictions, references)]


def aggregate(per_example: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over the examples that have it (sentence-level averaging, as LLaMA-Factory does)."""
    keys: dict[str, None] = {}
    for scores in per_example:
        keys.update(dict.fromkeys(scores))
    out = {}
    for key in keys:
        values = [s[key] for s in per_example if key in s and not math.isnan(s[key])]
        if values:
            out[key] = statistics.fmean(values)
    return out
