"""Evaluation stage, preference data: how often a model prefers the chosen reply to the rejected one, and by how much.

Three scores per pair, each a (chosen, rejected) couple whose difference is the pair's margin:

- `reward_*`: the implicit DPO reward beta * (log p_policy(y|x) - log p_ref(y|x)), summed over the reply's tokens
  (Rafailov et al. 2023, eq. 5; TRL's `rewards/chosen`). The reference is the model the run started from: the base
  with the adapter disabled, the base plus the `init_from` adapter for an SFT -> DPO chain, or the base model for
  full tuning. A model that is not a run (a plain base) is its own reference: its implicit reward is 0 by
  definition, every pair ties, accuracy 0.5 and margin 0.
- `rm_*`: a reward model's scalar score (stage rm, a sequence-classification head).
- `logp_*`: the reference-free preference, defined for ANY model: the mean per-token log-likelihood of each reply.
  It is what makes `--compare base aligned` meaningful: the base gets a real accuracy, not a tie by definition.

Accuracy counts a pair as 1 when its margin is positive, 0.5 on a tie, 0 otherwise; the margin is chosen minus
rejected, averaged over pairs. The tokens scored are exactly the reply tokens training puts loss on (the prompt is
rendered by the same template and encoder, tunelab.data.preference.encode_preference).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunelab.errors import DataError, TunelabError
from tunelab.runs.rundir import ADAPTER_CONFIG, adapter_folder

if TYPE_CHECKING:
    from tunelab.config.schema import RunConfig

DEFAULT_BETA = 0.1  # TRL's DPOConfig default, used when the run records no align.beta
SCORE_KINDS = ("reward", "rm", "logp")


@dataclass
class PreferencePair:
    """One encoded pair: the prompt ids (identical for both replies) and each reply's trained ids."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""


@dataclass
class PairScores:
    """Raw per-pair measurements; `scores(beta)` turns them into chosen/rejected/margin per kind."""

    tokens_chosen: int  # tokens scored in each reply
    tokens_rejected: int
    logp_chosen: float | None = None  # log-likelihood summed over the chosen reply's tokens (None: no LM head)
    logp_rejected: float | None = None
    ref_logp_chosen: float | None = None  # the same under the reference model (None: no reference)
    ref_logp_rejected: float | None = None
    rm_chosen: float | None = None  # reward model scores (stage rm)
    rm_rejected: float | None = None

    def scores(self, beta: float) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.logp_chosen is not None and self.logp_rejected is not None:
            out["logp_chosen"] = self.logp_chosen / self.tokens_chosen
            out["logp_rejected"] = self.logp_rejected / self.tokens_rejected
        if None not in (self.logp_chosen, self.ref_logp_chosen, self.logp_rejected, self.ref_logp_rejected):
            out["reward_chosen"] = beta * (self.logp_chosen - self.ref_logp_chosen)
            out["reward_rejected"] = beta * (self.logp_rejected - self.ref_logp_rejected)
        if self.rm_chosen is not None and self.rm_rejected is not None:
            out["rm_chosen"], out["rm_rejected"] = self.rm_chosen, self.rm_rejected
        for kind in SCORE_KINDS:
            if f"{kind}_chosen" in out:
                out[f"{kind}_margin"] = out[f"{kind}_chosen"] - out[f"{kind}_rejected"]
        return out


def pair_accuracy(margin: float) -> float:
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


def summarize(per_pair: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean chosen/rejected/margin of every kind present, and its pairwise accuracy (ties count half)."""
    out: dict[str, float] = {}
    for kind in SCORE_KINDS:
        margins = [s[f"{kind}_margin"] for s in per_pair if f"{kind}_margin" in s]
        if not margins:
            continue
        out[f"{kind}_accuracy"] = sum(map(pair_accuracy, margins)) / len(margins)
        out[f"{kind}_margin"] = sum(margins) / len(margins)
        for side in ("chosen", "rejected"):
            out[f"{kind}_{side}"] = sum(s[f"{kind}_{side}"] for s in per_pair if f"{kind}_{side}" in s) / len(margins)
    return out


# ------------------------------------------------------------------------------------------------- encoding
def encode_pairs(examples: Sequence[Any], template, tokenizer, cutoff_len: int) -> list[PreferencePair | None]:
    """PreferenceExamples -> PreferencePairs with the data stage's encoder (None where nothing is left to score)."""
    from tunelab.data.preference import encode_preference

    pairs: list[PreferencePair | None] = []
    for example in examples:
        if example.rejected is None:
            raise DataError(f"{example.source or 'a record'}: an unpaired (KTO) example has no rejected reply; "
                            "pairwise accuracy needs chosen and rejected")
        encoded = encode_preference(example, template, tokenizer, cutoff_len)
        if not encoded or not encoded["chosen_input_ids"] or not encoded["rejected_input_ids"]:
            pairs.append(None)
            continue
        pairs.append(PreferencePair(list(encoded["prompt_input_ids"]), list(encoded["chosen_input_ids"]),
                                    list(encoded["rejected_input_ids"]), example.source))
    return pairs


# ------------------------------------------------------------------------------------------------- scoring
def right_padded(examples: Sequence[dict], pad_token_id: int) -> dict:
    """input_ids, attention_mask and labels (-100 on padding) right-padded to the batch's longest row."""
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.tensor(e["input_ids"]) for e in examples]
    return {"input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0),
            "labels": pad_sequence([torch.tensor(e["labels"]) for e in examples], batch_first=True,
                                   padding_value=-100)}


def completion_logps(model, rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                     batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of log p over the completion tokens, their count) for each (prompt_ids, completion_ids) row."""
    from tunelab.evaluation.loss import token_nll

    collate = functools.partial(right_padded, pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": rows[i][0] + rows[i][1], "labels": [-100] * len(rows[i][0]) + rows[i][1]}
                         for i in chunk])
        # use_cache=False: a single forward needs no cache (and a cache disables packed detection, docs/pitfalls.md #1)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
        nll, counts = token_nll(logits, batch["labels"])
        for i, s, n in zip(chunk, nll.tolist(), counts.tolist()):
            out[i] = (-s, int(n))
    return out


def sequence_rewards(model, rows: Sequence[list[int]], pad_token_id: int, batch_size: int = 8) -> list[float]:
    """A reward model's scalar score of each full sequence (its own pooling: the last non-pad token, as in
    training)."""
    collate = functools.partial(right_padded, pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    out: list[float] = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": rows[i], "labels": rows[i]} for i in chunk])
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        for i, value in zip(chunk, logits[:, 0].float().tolist()):
            out[i] = value
    return out


@dataclass
class Reference:
    """What the implicit reward is measured against: `kind` is adapter_disabled, init_adapter, model, uniform
    (log-probs 0) or none (the model itself)."""

    kind: str
    adapter: Path | None = None  # init_adapter: the adapter the run started from
    model: Any = None  # model: a separately loaded reference model
    description: str = ""

    @contextlib.contextmanager
    def active(self, policy) -> Iterator[Any]:
        """Yield the module whose forward is the reference's (the same weights where possible)."""
        if self.kind == "adapter_disabled":
            with policy.disable_adapter():
                yield policy
        elif self.kind == "init_adapter":
            if "reference" not in policy.peft_config:
                policy.load_adapter(str(self.adapter), adapter_name="reference", is_trainable=False)
            active = policy.active_adapter
            policy.set_adapter("reference")
            try:
                yield policy
            finally:
                policy.set_adapter(active)
        elif self.kind == "model":
            yield self.model
        elif self.kind == "uniform":
            yield None
        else:
            raise TunelabError("this model has no reference to measure an implicit reward against")


def score_pairs(model, pairs: Sequence[PreferencePair], pad_token_id: int, *, reference: Reference | None = None,
                reward_model=None, batch_size: int = 8) -> list[PairScores]:
    """Log-likelihoods of both replies under `model` (and the reference), and the reward model's scores."""
    rows = [(p.prompt_ids, ids) for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
    policy = ref = rewards = None
    if model is not None:
        with _eval_mode(model), torch.inference_mode():
            policy = completion_logps(model, rows, pad_token_id, batch_size * 2)
            if reference is not None and reference.kind != "none":
                with reference.active(model) as ref_model, _eval_mode(ref_model):
                    ref = completion_logps(ref_model, rows, pad_token_id, batch_size * 2) if ref_model is not None \
                        else [(0.0, len(ids)) for _, ids in rows]  # uniform reference: log-probs 0
    if reward_model is not None:
        with _eval_mode(reward_model), torch.inference_mode():
            rewards = sequence_rewards(reward_model, [a + b for a, b in rows], pad_token_id, batch_size * 2)
    out = []
    for k in range(len(pairs)):
        c, r = 2 * k, 2 * k + 1
        scores = PairScores(len(rows[c][1]), len(rows[r][1]))
        if policy is not None:
            scores.logp_chosen, scores.logp_rejected = policy[c][0], policy[r][0]
        if ref is not None:
            scores.ref_logp_chosen, scores.ref_logp_rejected = ref[c][0], ref[r][0]
        elif policy is not None and reference is not None and reference.kind == "none":
            scores.ref_logp_chosen, scores.ref_logp_rejected = scores.logp_chosen, scores.logp_rejected
        if rewards is not None:
            scores.rm_chosen, scores.rm_rejected = rewards[c], rewards[r]
        out.append(scores)
    return out


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    if model is None:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------- what to compare with
def run_stage(run_config: RunConfig | None) -> str:
    return getattr(run_config, "stage", "sft") if run_config is not None else "sft"


def run_beta(run_config: RunConfig | None) -> float:
    """The run's align.beta where it is DPO's KL strength (dpo, kto); else TRL's DPO default. (orpo's beta is an
    odds-ratio weight and simpo's a reward scale: neither is the beta of the implicit reward.)"""
    beta = getattr(getattr(run_config, "align", None), "beta", None)
    return float(beta) if beta is not None and run_stage(run_config) in ("dpo", "kto") else DEFAULT_BETA


def resolve_reference(engine) -> Reference:
    """The model an engine's implicit reward is measured against (see the module docstring)."""
    artifact = getattr(engine, "artifact", None)
    run_config = getattr(artifact, "run_config", None)
    if getattr(getattr(run_config, "align", None), "reference_free", False) and run_stage(run_config) == "dpo":
        return Reference("uniform", description="uniform (align.reference_free: the run's reference log-probs are 0)")
    if hasattr(engine.model, "disable_adapter"):
        init_from = getattr(getattr(run_config, "method", None), "init_from", None)
        if init_from:
            adapter = init_adapter_path(Path(init_from), getattr(artifact, "run_dir", None))
            return Reference("init_adapter", adapter=adapter,
                             description=f"the base model with the adapter the run started from ({adapter})")
        return Reference("adapter_disabled", description="the base model (the run's adapter disabled)")
    if run_config is not None and getattr(artifact, "adapter_path", None) is None:
        return Reference("model", model=_load_base(run_config, engine),
                         description=f"the base model of the run ({run_config.model.name})")
    return Reference("none", description="none: the model is its own reference, so its implicit reward is 0 by "
                     "definition (every pair ties: accuracy 0.5, margin 0)")


def init_adapter_path(path: Path, run_dir: Path | None = None) -> Path:
    """`init_from` may name a run (its final/ adapter) or an adapter folder; a relative path is tried from here,
    then beside the run (runs/<sft> next to runs/<dpo>)."""
    roots = [path] if path.is_absolute() or run_dir is None else [path, Path(run_dir).parent / path.name]
    for candidate in (adapter_folder(root) for root in roots):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise TunelabError(f"method.init_from {path}: no adapter there (adapter_config.json in it or in its final/); "
                       "the implicit reward needs the model the run started from")


def _load_base(run_config: RunConfig, engine):
    """Full/freeze runs: the base model the run was trained from, a second copy (what training compared with)."""
    from tunelab.models.load import load_model

    model = load_model(run_config.model.model_copy(update={"device": str(engine.device.type)}),
                       dtype=next(engine.model.parameters()).dtype)
    if len(engine.tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(engine.tokenizer))  # training added tokens (their rows stay random)
    return model.eval()


def load_reward_model(run_dir: Path, device: str = "auto", dtype: str = "auto"):
    """(reward model, tokenizer, template) of an rm run: a sequence-classification head on the base, with the
    run's adapter when it has one."""
    from transformers import AutoModelForSequenceClassification

    from tunelab.inference.template import load_template
    from tunelab.models.load import load_tokenizer, pick_device, pick_dtype
    from tunelab.runs.artifacts import resolve_artifact

    art = resolve_artifact(str(run_dir), device=device, dtype=dtype)
    tokenizer = load_tokenizer(art.model_cfg, path=art.tokenizer_path)
    where = pick_device(art.model_cfg.device)
    model = AutoModelForSequenceClassification.from_pretrained(
        art.base_path, num_labels=1, dtype=pick_dtype(art.model_cfg.dtype, where),
        trust_remote_code=art.model_cfg.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    if art.adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(art.adapter_path), is_trainable=False)
    template = load_template(tokenizer, None, art.template_file, art.run_config.data.enable_thinking
                             if art.run_config is not None else None)
    return model.to(where).eval(), tokenizer, template


@dataclass
class RewardEngine:
    """An rm run loaded for evaluation: what evaluate_engine needs from an engine, with a value head instead of
    a language-model head (it scores sequences; it cannot generate, so only preference metrics apply)."""

    model: Any
    tokenizer: Any
    template: Any
    name: str
    artifact: Any = None
    reward_model: bool = True

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)


def load_reward_engine(run_dir: Path, device: str = "auto", dtype: str = "auto") -> RewardEngine:
    from tunelab.runs.artifacts import resolve_artifact

    model, tokenizer, template = load_reward_model(run_dir, device, dtype)
    return RewardEngine(model, tokenizer, template, Path(run_dir).name, resolve_artifact(str(run_dir)))


@dataclass
class PreferenceResult:
    metrics: dict[str, float]  # summarize() over the scored pairs
    per_example: list[dict[str, float]]  # one dict per pair ({} where the pair could not be encoded)
    info: dict[str, Any]


def measure_preference(engine, examples: Sequence[Any], cutoff_len: int, batch_size: int = 8) -> PreferenceResult:
    """Score PreferenceExamples with an engine (HFEngine or RewardEngine): the implicit reward against the
    engine's reference and the reference-free log-likelihood preference, or the reward model's scores."""
    run_config = getattr(getattr(engine, "artifact", None), "run_config", None)
    beta = run_beta(run_config)
    encoded = encode_pairs(examples, engine.template, engine.tokenizer, cutoff_len)
    kept = [i for i, p in enumerate(encoded) if p is not None]
    if not kept:
        raise DataError(f"none of the {len(examples)} preference pairs has a reply token left after encoding "
                        f"(cutoff_len={cutoff_len}); nothing to score")
    pairs = [encoded[i] for i in kept]
    pad = engine.tokenizer.pad_token_id
    info: dict[str, Any] = {"pairs_scored": len(kept), "pairs_skipped": len(examples) - len(kept)}
    if getattr(engine, "reward_model", False):
        raw = score_pairs(None, pairs, pad, reward_model=engine.model, batch_size=batch_size)
        info["scores"] = "reward model (value head)"
    else:
        reference = resolve_reference(engine)
        raw = score_pairs(engine.model, pairs, pad, reference=reference, batch_size=batch_size)
        info.update(beta=beta, reference=reference.description)
    per_example: list[dict[str, float]] = [{} for _ in examples]
    for i, scores in zip(kept, raw):
        per_example[i] = scores.scores(beta)
    return PreferenceResult(summarize([per_example[i] for i in kept]), per_example, info)
