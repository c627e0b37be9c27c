"""Stage 4b (training): preference alignment (dpo, orpo, simpo, kto, rm) on TRL's trainers, read top to bottom in
`train_alignment`.

It is the SFT recipe (training/sft.py) with three differences: the data is preference data encoded by tunelab's own
template and masking (data/preference.py), the trainer is TRL's (with tunelab's atomic checkpoints and NaN guard
mixed in, align_trainers.py), and a reference model may be needed. With an adapter the reference is the same weights
with the adapter disabled (no second copy); starting from an SFT adapter (`method.init_from`) it is that SFT adapter,
kept frozen beside the trained one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError
from tunelab.training.sft import (
    Precision,
    RunResult,
    apply_speed_options,
    distributed_state,
    fit,
    open_run,
    plan_precision,
    resume_point,
)
from tunelab.training.stages import Stage, get_stage

log = logging.getLogger(__name__)

DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a pre-trained adapter


# -------------------------------------------------------------------------------------------------- entry points
def train_dpo(cfg: RunConfig, resume: bool = False, callbacks: list | None = None, echo: bool = True) -> RunResult:
    return train_alignment(cfg, get_stage("dpo"), resume, callbacks, echo)


def train_orpo(cfg: RunConfig, resume: bool = False, callbacks: list | None = None, echo: bool = True) -> RunResult:
    return train_alignment(cfg, get_stage("orpo"), resume, callbacks, echo)


def train_simpo(cfg: RunConfig, resume: bool = False, callbacks: list | None = None, echo: bool = True) -> RunResult:
    return train_alignment(cfg, get_stage("simpo"), resume, callbacks, echo)


def train_kto(cfg: RunConfig, resume: bool = False, callbacks: list | None = None, echo: bool = True) -> RunResult:
    return train_alignment(cfg, get_stage("kto"), resume, callbacks, echo)


def train_rm(cfg: RunConfig, resume: bool = False, callbacks: list | None = None, echo: bool = True) -> RunResult:
    return train_alignment(cfg, get_stage("rm"), resume, callbacks, echo)


# ---------------------------------------------------------------------------------------------------------- recipe
def train_alignment(cfg: RunConfig, stage: Stage, resume: bool = False, callbacks: list | None = None,
                    echo: bool = True) -> RunResult:
    """Align with `cfg` as `stage` says; `resume` continues this config's run from its last complete checkpoint."""
    with ExitStack() as undo:  # hooks and switches the speed options put on the model, undone when training ends
        return _train_alignment(cfg, stage, resume, callbacks, echo, undo)


def _train_alignment(cfg: RunConfig, stage: Stage, resume: bool, callbacks: list | None, echo: bool,
                     undo: ExitStack) -> RunResult:
    from tunelab.data.templates import apply_template, resolve_template
    from tunelab.methods import check_method_available
    from tunelab.models.load import load_tokenizer, pick_device
    from tunelab.models.resolve import resolve_model_path
    from tunelab.training.speed import plan_speed, set_threads
    from tunelab.training.trackers import check_trackers

    device = pick_device(cfg.model.device)
    check_method_available(cfg.method, device)
    check_trackers(cfg.train.report_to)
    check_alignment(cfg, stage)
    precision = plan_precision(cfg, device)
    state = distributed_state(device)
    plan = plan_speed(cfg, device, precision.autocast, False, state.num_processes)
    # TRL pads chosen and rejected rows in one batch (no packing); sparse_logits: TRL's fused lm_head on completion
    # positions only (patches/trl_logprobs.py; DPO and KTO)
    plan = dataclasses.replace(plan, sparse_logits=plan.sparse_logits and stage.name in ("dpo", "kto"),
                               packed_attention=False)
    if plan.threads:
        set_threads(plan.threads)
    run, cfg = open_run(cfg, resume, state)
    say = print if echo and state.is_main_process else (lambda *_a, **_k: None)
    with state.main_process_first():
        model_path = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(cfg.model, model_path)
        template = resolve_template(cfg.data.template, tokenizer, cfg.data.enable_thinking)
        apply_template(tokenizer, template)
        data = prepare_stage_data(cfg, tokenizer, template, stage)
    check_alignment_memory(AlignRun(cfg, stage, model_path, device, precision, say), data)
    model = load_policy(AlignRun(cfg, stage, model_path, state.device, precision, say), tokenizer)
    speed = apply_speed_options(model, plan, cfg, say, undo)
    if state.is_main_process:
        run.create()
        run.clean_staging()
    state.wait_for_everyone()
    checkpoint = resume_point(run, resume, state, say)
    reference = describe_reference(cfg, stage)
    say(f"reference: {reference.detail}")
    from tunelab.training.align_trainers import AlignSetup, build_align_trainer

    trainer = build_align_trainer(AlignSetup(cfg, stage, run, model, tokenizer, data, device, precision, model_path,
                                             callbacks, echo, checkpoint, sparse_logits=speed.sparse_logits))
    if state.is_main_process:
        from tunelab.training.sft import _env, _provenance

        run.write_start(cfg, env=_env(device, state, precision, speed), data_stats=dict(data.stats),
                        fingerprint=data.fingerprint, template=template)
        run.update(status="running", run_name=run.path.name, stage=stage.name, model=cfg.model.name,
                   model_path=str(model_path), model_source=_provenance(model_path), method=cfg.method.name,
                   template=template.name, data_fingerprint=data.fingerprint,
                   started_at=time.strftime("%Y-%m-%dT%H:%M:%S"), world_size=state.num_processes,
                   init_from=init_source(cfg), reference=reference.kind)
    return fit(trainer, run, tokenizer, checkpoint, state, cfg)


@dataclass
class AlignRun:
    """What the setup steps of an alignment run share."""

    cfg: RunConfig
    stage: Stage
    model_path: Path
    device: object  # "cpu", "cuda" or the process's torch device
    precision: Precision
    say: object = print  # prints on the main process only


# ----------------------------------------------------------------------------------------------------- checks
def check_alignment(cfg: RunConfig, stage: Stage) -> None:
    """Settings that cannot work for this stage, refused before anything is loaded."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise TunelabError(f"stage {stage.name} runs on TRL, which is not installed: pip install 'tunelab[align]'")
    a = cfg.align
    from tunelab.models.quantized import refuse_training_config

    refuse_training_config(cfg.model)  # model.quantize: bitsandbytes inference only; training has method qlora
    if cfg.method.name == "prefix":
        raise TunelabError(f"stage {stage.name}: method prefix is not supported for alignment (TRL's log-prob "
                           "forward does not pass a prefix cache); use lora, dora, qlora, full or freeze")
    if stage.name == "kto" and cfg.train.batch_size < 2:
        raise TunelabError("stage kto: train.batch_size must be at least 2 (KTO estimates its KL term from the "
                           "other completions of the same batch)")
    if a.reference_free and stage.name != "dpo":
        raise TunelabError(f"align.reference_free applies to stage dpo only (stage is {stage.name})")
    if a.loss_type != "sigmoid" and stage.name != "dpo":
        raise TunelabError(f"align.loss_type applies to stage dpo only (stage is {stage.name}); leave it at sigmoid")
    if stage.name == "rm" and getattr(cfg.method, "init_from", None):
        raise TunelabError("stage rm: method.init_from (a causal-LM adapter) cannot start a reward model; merge "
                           "the SFT adapter first (tunelab export RUN) and set model.name to the merged folder")


def init_source(cfg: RunConfig) -> str | None:
    return getattr(cfg.method, "init_from", None)


# ------------------------------------------------------------------------------------------------------------ data
def prepare_stage_data(cfg: RunConfig, tokenizer, template, stage: Stage):
    """Preference data encoded by tunelab (data/preference.py), in the columns TRL's trainer of `stage` reads."""
    from tunelab.data.preference import prepare_preference_data

    data = prepare_preference_data(cfg.data, tokenizer, template, paired=stage.data == "paired")
    return dataclasses.replace(data, train=to_trl_columns(data.train, stage),
                               validation=to_trl_columns(data.validation, stage) if data.validation else None)


def to_trl_columns(dataset, stage: Stage):
    """tunelab's encoded columns (prompt_input_ids, chosen_input_ids / completion_input_ids...) -> TRL's.

    dpo/orpo/simpo: prompt_ids, chosen_ids, rejected_ids (completion ids without the prompt); kto: prompt_ids,
    completion_ids, label; rm: chosen_ids, rejected_ids = the whole prompt + reply sequence the value head scores.
    """
    if stage.data == "unpaired":
        return dataset.select_columns(["prompt_input_ids", "completion_input_ids", "label"]).rename_columns(
            {"prompt_input_ids": "prompt_ids", "completion_input_ids": "completion_ids"})
    dataset = dataset.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
    if stage.name == "rm":
        return dataset.map(
            lambda row: {"chosen_ids": row["prompt_input_ids"] + row["chosen_input_ids"],
                         "rejected_ids": row["prompt_input_ids"] + row["rejected_input_ids"]},
            remove_columns=dataset.column_names)
    return dataset.rename_columns({"prompt_input_ids": "prompt_ids", "chosen_input_ids": "chosen_ids",
                                   "rejected_input_ids": "rejected_ids"})


def longest_sequence(dataset) -> int:
    """Longest prompt + reply of a TRL-column dataset, in tokens."""
    columns = dataset.column_names
    prompts = dataset["prompt_ids"] if "prompt_ids" in columns else None
    replies = [dataset[c] for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in columns]
    longest = 0
    for i, per_row in enumerate(zip(*replies)):
        longest = max(longest, max(len(r) for r in per_row) + (len(prompts[i]) if prompts is not None else 0))
    return longest


# ----------------------------------------------------------------------------------------------------- memory
def check_alignment_memory(run: AlignRun, data) -> None:
    """The SFT estimate for the worst micro-batch (chosen and rejected rows of the longest pairs, or KTO's
    completion + KL rows) plus the reference forward; refuses a run that cannot fit."""
    from tunelab.training.memory import check_fits, estimate_for_run, reference_memory

    cfg, stage, model_path, device, precision = run.cfg, run.stage, run.model_path, str(run.device), run.precision

    rows = 2  # chosen + rejected rows (kto: the completion + its KL row; rm: both scored sequences)
    longest = min(cfg.data.cutoff_len, longest_sequence(data.train))
    tokens = cfg.train.batch_size * rows * longest
    estimate = estimate_for_run(cfg, model_path, device=device, dtype=precision.dtype,
                                mixed_precision=precision.autocast, tokens_per_step=tokens)
    if stage.needs_reference and not cfg.align.reference_free:
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code).num_hidden_layers
        reference = reference_memory(estimate, layers, separate_copy=reference_model_needed(cfg))
        estimate = dataclasses.replace(estimate, reference=reference)
    run.say(estimate.describe())
    check_fits(estimate, cfg.train.max_memory_gb, device)


def reference_model_needed(cfg: RunConfig) -> bool:
    """A second copy of the weights is loaded only when no adapter can be disabled (full/freeze) and the reference
    log-probs are not precomputed before training."""
    from tunelab.methods import get_method

    return get_method(cfg.method.name).trains_base_weights and not cfg.align.precompute_ref_log_probs


# ------------------------------------------------------------------------------------------------------ models
def load_policy(run: AlignRun, tokenizer):
    """The model to train: the causal LM with its method (as for SFT), or for `rm` a value-head model."""
    from tunelab.training.sft import load_for_training

    if run.stage.name != "rm":
        return load_for_training(run.cfg, run.model_path, run.device, run.precision, run.say)
    return load_reward_model(run, tokenizer)


def load_reward_model(run: AlignRun, tokenizer):
    """AutoModelForSequenceClassification with one label (the reward) on the same weights; LoRA's task type is
    then SEQ_CLS (methods/lora.py), which trains and saves the new `score` head beside the adapter."""
    from transformers import AutoModelForSequenceClassification, set_seed

    from tunelab.methods import apply_method, count_parameters, describe_parameters, method_load_kwargs

    cfg, device = run.cfg, run.device
    set_seed(cfg.train.seed)
    extra = method_load_kwargs(cfg.method, str(device))
    model = AutoModelForSequenceClassification.from_pretrained(
        run.model_path, num_labels=1, dtype=run.precision.dtype, attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code, **extra)
    if "quantization_config" not in extra and "device_map" not in extra:
        model.to(device)
    model.config.pad_token_id = tokenizer.pad_token_id  # the reward is read at the last non-pad token
    model.config.use_cache = False
    method = cfg.method
    if method.name == "freeze":  # the new head must learn whatever layers are frozen
        method = method.model_copy(update={"trainable_modules": [*method.trainable_modules, "score"]})
    model = apply_method(model, method)
    run.say(f"method {cfg.method.name} (reward model): {describe_parameters(*count_parameters(model))}")
    return model


@dataclass
class ReferenceInfo:
    """How the reference log-probs of a run are obtained (recorded in the log, checked by the tests)."""

    kind: str  # "disabled-adapter", "frozen-adapter", "separate-model", "precomputed", "none"
    detail: str = ""


def describe_reference(cfg: RunConfig, stage: Stage) -> ReferenceInfo:
    if not stage.needs_reference:
        return ReferenceInfo("none", f"{stage.name} needs no reference model")
    if cfg.align.reference_free:
        return ReferenceInfo("none", "reference_free: reference log-probs are 0")
    if cfg.align.precompute_ref_log_probs:
        return ReferenceInfo("precomputed", "reference log-probs computed once before training")
    if reference_model_needed(cfg):
        return ReferenceInfo("separate-model", f"a frozen copy of {cfg.model.name} (method {cfg.method.name})")
    if init_source(cfg):
        return ReferenceInfo("frozen-adapter", f"the starting adapter {init_source(cfg)} kept frozen")
    return ReferenceInfo("disabled-adapter", "the base model with the adapter disabled (no second copy)")
