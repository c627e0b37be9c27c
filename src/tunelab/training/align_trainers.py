"""Stage 4b (training): TRL's preference trainers with tunelab's guarantees mixed in, fed tunelab's encoded data.

Each class is `TunelabTrainer` (atomic checkpoints, NaN guard; training/trainer.py) placed before a TRL trainer in
the MRO, plus one override that makes TRL take the already-tokenized columns as they are (prompt/chosen/rejected
ids rendered by tunelab's template and masking) instead of applying its own chat template:

- DPOTrainer / KTOTrainer: `_prepare_dataset` returns tokenized data untouched (KTO adds its KL rotation);
- CPOTrainer (SimPO) / ORPOTrainer: `tokenize_row` builds their row from the ids;
- RewardTrainer skips tokenization by itself when `chosen_ids`/`rejected_ids` are present.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tunelab.config.schema import RunConfig
from tunelab.patches.trl_logprobs import completion_only_log_probs
from tunelab.training.align import DEFAULT_BETA, REFERENCE_ADAPTER, init_source, reference_model_needed
from tunelab.training.sft import Precision, TrainerSetup, add_monitoring, training_arguments
from tunelab.training.stages import Stage
from tunelab.training.trainer import TunelabTrainer

log = logging.getLogger(__name__)

PAIRED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")


def is_tokenized(dataset, columns: tuple[str, ...]) -> bool:
    return dataset is not None and set(columns) <= set(dataset.column_names)


# ------------------------------------------------------------------------------------- completion-only log-probs
class CompletionOnlyLogProbs:
    """Mixin for TRL trainers using the fused lm_head: the loss (and its reference forward) scores completions only
    when the run's `train.sparse_logits` is on."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with completion_only_log_probs(self.sparse_logits):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


# -------------------------------------------------------------------------------------------------------- trainers
class TunelabDPOTrainer(CompletionOnlyLogProbs, TunelabTrainer, DPOTrainer):
    def __init__(self, *args, reference_free: bool = False, **kwargs):
        self.reference_free = reference_free  # read by _precompute_ref_logps, called inside DPOTrainer.__init__
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if is_tokenized(dataset, PAIRED_COLUMNS):  # tunelab's template already rendered and tokenized it
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.reference_free:  # a uniform reference: log-probs 0, so the reward is beta * the policy's log-prob
            zeros = [0.0] * len(dataset)
            return dataset.add_column("ref_chosen_logps", zeros).add_column("ref_rejected_logps", zeros)
        return super()._precompute_ref_logps(dataset, name, batch_size)


class TunelabKTOTrainer(CompletionOnlyLogProbs, TunelabTrainer, KTOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not is_tokenized(dataset, UNPAIRED_COLUMNS):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.calculate_KL:  # as TRL does: each completion paired with the previous prompt of its batch
            dataset = dataset.map(_rotate_completions, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


def _rotate_completions(batch: dict) -> dict:
    completions = batch["completion_ids"]
    return {**batch, "KL_completion_ids": [completions[-1], *completions[:-1]]}


def pair_row(feature: dict) -> dict:
    """CPO/ORPO's tokenized row (prompt, prompt+chosen, prompt+rejected, labels -100 on the prompt) from the ids."""
    prompt, chosen, rejected = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
    row = {"prompt_input_ids": list(prompt), "prompt_attention_mask": [1] * len(prompt)}
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        row[f"{side}_input_ids"] = list(prompt) + list(reply)
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
        row[f"{side}_labels"] = [-100] * len(prompt) + list(reply)
    return row


class PairTokenCount:
    """CPO/ORPO batches hold chosen_*/rejected_* tensors and no input_ids, so transformers counts no tokens (no
    tokens/s); count both sequences' real tokens, as DPO's attention_mask does, so the stages compare."""

    def _track_num_input_tokens(self, inputs):
        if self.args.include_num_input_tokens_seen == "no" or "chosen_attention_mask" not in inputs:
            return super()._track_num_input_tokens(inputs)
        count = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
        count = torch.as_tensor(count, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()
        return None


class TunelabCPOTrainer(PairTokenCount, TunelabTrainer, CPOTrainer):
    def tokenize_row(self, feature, model=None):
        return pair_row(feature) if "prompt_ids" in feature else super().tokenize_row(feature, model)


class TunelabORPOTrainer(PairTokenCount, TunelabTrainer, ORPOTrainer):
    def tokenize_row(self, feature, model=None):
        return pair_row(feature) if "prompt_ids" in feature else super().tokenize_row(feature, model)


REWARD_RENAMES = {"accuracy": "rewards/accuracies", "margin": "rewards/margins"}  # the names the other stages log


class TunelabRewardTrainer(TunelabTrainer, RewardTrainer):
    def log(self, logs: dict, start_time: float | None = None) -> None:
        for metrics in self._metrics.values():
            for old, new in REWARD_RENAMES.items():
                if old in metrics:
                    metrics[new] = metrics.pop(old)
        super().log(logs, start_time)


# --------------------------------------------------------------------------------------------------------- build
@dataclass
class AlignSetup:
    cfg: RunConfig
    stage: Stage
    run: object  # RunDir
    model: object
    tokenizer: object
    data: object  # PreparedData in TRL's columns
    device: str
    precision: Precision
    model_path: Path
    callbacks: list | None = None
    echo: bool = True
    checkpoint: Path | None = None
    sparse_logits: bool = False  # DPO/KTO: the fused lm_head scores completion positions only


def trl_arguments(config_class, base, **extra):
    """A TRL config (a TrainingArguments subclass) carrying every training argument tunelab chose for SFT
    (training/sft.py's training_arguments), so TRL's own defaults (gradient checkpointing on, lr 1e-6...) never
    leak in, plus the stage's hyper-parameters."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    return config_class(**{**values, **extra})


def stage_arguments(setup: AlignSetup):
    """The TRL config of the stage, from the SFT training arguments plus the `align` section."""
    from tunelab.training.sft import _is_main
    from tunelab.training.trackers import start_trackers

    cfg, a = setup.cfg, setup.cfg.align
    external = [n for n in cfg.train.report_to if n != "tensorboard"]
    if _is_main():
        start_trackers(cfg.train.report_to, setup.run.path, setup.run.path.name, cfg.model_dump(mode="json"),
                       cfg.train.trackers_offline)
    base = training_arguments(TrainerSetup(cfg, setup.run, setup.device, setup.precision, setup.echo),
                              setup.data.validation is not None, external)
    beta = a.beta if a.beta is not None else DEFAULT_BETA.get(setup.stage.name, 0.1)
    name = setup.stage.name
    if name == "dpo":
        losses = [(a.loss_type, 1.0)] + ([("sft", a.sft_weight)] if a.sft_weight > 0 else [])
        return trl_arguments(DPOConfig, base, beta=beta, loss_type=[n for n, _ in losses],
                             loss_weights=[w for _, w in losses], label_smoothing=a.label_smoothing, max_length=None,
                             precompute_ref_log_probs=a.precompute_ref_log_probs or a.reference_free)
    if name == "kto":
        return trl_arguments(KTOConfig, base, beta=beta, desirable_weight=a.desirable_weight,
                             undesirable_weight=a.undesirable_weight, max_length=None,
                             precompute_ref_log_probs=a.precompute_ref_log_probs,
                             train_sampling_strategy="sequential")  # the KL rotation pairs neighbours of a batch
    if name == "simpo":
        return trl_arguments(CPOConfig, base, loss_type="simpo", beta=beta, simpo_gamma=a.simpo_gamma,
                             cpo_alpha=a.cpo_alpha, label_smoothing=a.label_smoothing, max_length=cfg.data.cutoff_len)
    if name == "orpo":
        return trl_arguments(ORPOConfig, base, beta=beta, max_length=cfg.data.cutoff_len)
    if name == "rm":
        return trl_arguments(RewardConfig, base, max_length=None,
                             center_rewards_coefficient=a.center_rewards_coefficient)
    raise ValueError(f"no TRL trainer for stage {name!r}")


TRAINERS = {"dpo": TunelabDPOTrainer, "kto": TunelabKTOTrainer, "simpo": TunelabCPOTrainer,
            "orpo": TunelabORPOTrainer, "rm": TunelabRewardTrainer}


def build_align_trainer(setup: AlignSetup):
    cfg, stage = setup.cfg, setup.stage
    args = stage_arguments(setup)
    kwargs = {"model": setup.model, "args": args, "train_dataset": setup.data.train,
              "eval_dataset": setup.data.validation, "processing_class": setup.tokenizer,
              "keep_checkpoints": cfg.train.save_total_limit, "sparse_logits": setup.sparse_logits}
    if stage.name in ("dpo", "kto") and not cfg.align.reference_free and reference_model_needed(cfg):
        kwargs["ref_model"] = load_reference(cfg, setup.model_path, setup.precision)
    if stage.name == "dpo":
        kwargs["reference_free"] = cfg.align.reference_free
    trainer = TRAINERS[stage.name](**kwargs)
    settle_reference(trainer, cfg)
    add_monitoring(trainer, cfg, setup.run, setup.echo, setup.checkpoint, setup.callbacks)
    if init_source(cfg):
        trainer.add_callback(DropReferenceAdapter())
    return trainer


def load_reference(cfg: RunConfig, model_path: Path, precision: Precision):
    """full/freeze: the frozen starting weights as a second model, loaded the way the policy was."""
    from tunelab.models.load import load_model

    model = load_model(cfg.model, model_path, dtype=precision.dtype)
    model.config.use_cache = False
    model.requires_grad_(False)
    return model.eval()


def peft_model(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model if hasattr(model, "peft_config") else None


def settle_reference(trainer, cfg: RunConfig) -> None:
    """TRL copies a PeftModel's adapter into a frozen "ref" adapter and uses it as the reference. For a NEW adapter
    that copy equals the base (LoRA starts at B = 0), so it is dropped: the reference is then the base with the
    adapter disabled, with no extra weights. From an SFT adapter (`init_from`) the copy IS the SFT model and stays,
    frozen."""
    model = peft_model(trainer)
    if model is None or REFERENCE_ADAPTER not in model.peft_config:
        return
    if init_source(cfg):
        for name, param in model.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                param.requires_grad_(False)
        return
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.delete_adapter(REFERENCE_ADAPTER)
    model.set_adapter("default")
    for name, param in model.named_parameters():  # set_adapter re-marks adapters; keep exactly what was trainable
        param.requires_grad_(name in trainable)


class DropReferenceAdapter(TrainerCallback):
    """final/ holds the trained adapter only: the frozen SFT copy TRL kept as the reference goes before saving."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model = getattr(model, "module", model)
        if model is not None and REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            model.delete_adapter(REFERENCE_ADAPTER)
            model.set_adapter("default")
