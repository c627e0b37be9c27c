"""Stage 4 (training): the supervised fine-tuning recipe, read top to bottom in `train`.

tokenizer -> template -> prepare_data -> memory estimate -> model (+ quantization) -> method -> Trainer -> final/.
Runs the same under `torchrun`/`accelerate launch` (data-parallel): rank 0 converts the model and tokenizes once
while the others wait, then every rank reads the shared caches.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config.schema import RunConfig
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.runs.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path | None
    metrics: dict = field(default_factory=dict)
    status: str = "completed"


def train(cfg: RunConfig, resume: bool = False, callbacks: list | None = None, echo: bool = True) -> RunResult:
    """Fine-tune with `cfg`; `resume` continues this config's run from its last complete checkpoint.

    `callbacks` are extra transformers TrainerCallbacks; `echo` prints progress on the main process.
    """
    with ExitStack() as undo:  # hooks and switches the speed options put on the model, undone when training ends
        return _train(cfg, resume, callbacks, echo, undo)


def _train(cfg: RunConfig, resume: bool, callbacks: list | None, echo: bool, undo: ExitStack) -> RunResult:
    from tunelab.data.build import build_sft_data
    from tunelab.methods import check_method_available
    from tunelab.models.load import load_tokenizer, pick_device
    from tunelab.models.resolve import resolve_model_path
    from tunelab.training.speed import plan_speed, set_threads
    from tunelab.training.trackers import check_trackers

    device = pick_device(cfg.model.device)
    check_method_available(cfg.method, device)  # before anything is loaded
    check_trackers(cfg.train.report_to)
    check_combination(cfg)
    precision = plan_precision(cfg, device)
    state = distributed_state(device)
    plan = plan_speed(cfg, device, precision.autocast, uses_packing(cfg), state.num_processes)
    if plan.threads:
        set_threads(plan.threads)
    run, cfg = open_run(cfg, resume, state)
    say = print if echo and state.is_main_process else (lambda *_a, **_k: None)
    with state.main_process_first():  # rank 0 converts and tokenizes; the others then hit the caches
        model_path = resolve_model_path(cfg.model)
        data = build_sft_data(cfg, load_tokenizer(cfg.model, model_path))  # what `tunelab data` shows, exactly
    tokenizer, template = data.tokenizer, data.template
    check_memory(cfg, model_path, data, device, precision, say)
    model = load_for_training(cfg, model_path, state.device, precision, say)
    speed = apply_speed_options(model, plan, cfg, say, undo)
    if state.is_main_process:
        run.create()
        run.clean_staging()  # what a killed run left half-written
    state.wait_for_everyone()
    checkpoint = resume_point(run, resume, state, say)
    setup = TrainerSetup(cfg, run, device, precision, echo, callbacks, checkpoint)
    trainer = build_trainer(setup, model, tokenizer, data, sparse_logits=speed.sparse_logits)
    if state.is_main_process:
        run.write_start(cfg, env=_env(device, state, precision, speed), data_stats=dict(data.stats),
                        fingerprint=data.fingerprint, template=template)
        run.update(status="running", run_name=run.path.name, model=cfg.model.name, model_path=str(model_path),
                   model_source=_provenance(model_path),
                   method=cfg.method.name, template=template.name, data_fingerprint=data.fingerprint,
                   started_at=time.strftime("%Y-%m-%dT%H:%M:%S"), world_size=state.num_processes)
    return fit(trainer, run, tokenizer, checkpoint, state, cfg)


# --------------------------------------------------------------------------------------------------- setup
def distributed_state(device: str):
    """accelerate's process state (initializes gloo/nccl under torchrun); one process when not launched."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


def open_run(cfg: RunConfig, resume: bool, state):
    """Choose the run folder (the same on every rank; created once the run is sure to start), and the config
    naming it."""
    from accelerate.utils import broadcast_object_list

    from tunelab.runs.rundir import RunDir, select_run_dir

    chosen = [str(select_run_dir(cfg, resume).path) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(chosen)  # a timestamped name must not differ between ranks
    run = RunDir(Path(chosen[0]))
    return run, cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_name": run.path.name})})


def check_combination(cfg: RunConfig) -> None:
    """Settings that are each valid but cannot work together, refused before anything is loaded."""
    from tunelab.methods import get_method
    from tunelab.models.quantized import refuse_training_config

    refuse_training_config(cfg.model)  # model.quantize: bitsandbytes inference only; training has method qlora
    if cfg.train.gradient_checkpointing and not get_method(cfg.method.name).supports_gradient_checkpointing:
        # e.g. prefix tuning: transformers drops past_key_values in checkpointed layers, and the prefix IS one
        raise TunelabError(f"method {cfg.method.name} cannot train with train.gradient_checkpointing (the "
                           "recomputed layers would not see what it trains); set train.gradient_checkpointing: false")
    if cfg.train.early_stopping_patience and not cfg.data.val_size:
        log.warning("train.early_stopping_patience is set but data.val_size is 0: no validation, no early stopping")


@dataclass
class Precision:
    dtype: object  # torch dtype of the loaded weights
    autocast: str | None  # "bf16", "fp16" or None


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run ~3-4x faster than fp32 there (docs/pitfalls.md #8)."""
    from tunelab.hardware import cpu_info

    return cpu_info().fast_bf16


def plan_precision(cfg: RunConfig, device: str) -> Precision:
    import torch

    from tunelab.methods import get_method
    from tunelab.models.load import pick_dtype

    dtype = pick_dtype(cfg.model.dtype, device)
    wanted = cfg.train.mixed_precision
    if wanted == "auto":
        if device == "cuda":
            wanted = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            wanted = "bf16" if device == "cpu" and dtype == torch.float32 and cpu_has_fast_bf16() else "no"
    if wanted == "fp16" and device != "cuda":
        raise TunelabError(f"train.mixed_precision: fp16 needs a CUDA GPU (device is {device}); use bf16 or no")
    if wanted == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise TunelabError("train.mixed_precision: this GPU has no bf16; use fp16 or no")
    if wanted == "fp16" and dtype == torch.float16 and get_method(cfg.method.name).trains_base_weights:
        dtype = torch.float32  # fp16 master weights cannot be unscaled by the grad scaler: keep fp32 + autocast
    return Precision(dtype, None if wanted == "no" else wanted)


def longest_example(data) -> int:
    longest = (data.stats.get("length") or {}).get("max")
    return int(longest) if longest else max(len(ids) for ids in data.train["input_ids"])


def check_memory(cfg: RunConfig, model_path: Path, data, device: str, precision: Precision, say) -> None:
    """Print the estimate and refuse a run that cannot fit, before the weights are loaded."""
    from tunelab.training.memory import check_fits, estimate_for_run

    # the worst micro-batch: batch_size of the longest examples (group_by_length puts them together)
    tokens = cfg.train.batch_size * min(cfg.data.cutoff_len, longest_example(data))
    estimate = estimate_for_run(cfg, model_path, device=device, dtype=precision.dtype,
                                mixed_precision=precision.autocast, tokens_per_step=tokens)
    say(estimate.describe())
    check_fits(estimate, cfg.train.max_memory_gb, device)


def load_for_training(cfg: RunConfig, model_path: Path, device, precision: Precision, say):
    from transformers import set_seed

    from tunelab.methods import apply_method, count_parameters, describe_parameters, method_load_kwargs
    from tunelab.models.load import load_model

    set_seed(cfg.train.seed)  # adapter / prefix initialisation draws random numbers: same seed, same start
    extra = method_load_kwargs(cfg.method, str(device))
    model = load_model(cfg.model, model_path, dtype=precision.dtype, **extra)
    model.config.use_cache = False  # a KV cache in training disables packed detection (docs/pitfalls.md #1)
    model = apply_method(model, cfg.method)
    say(f"method {cfg.method.name}: {describe_parameters(*count_parameters(model))}")
    return model


def apply_speed_options(model, plan, cfg: RunConfig, say, undo: ExitStack):
    """The speed levers that apply to this model (training/speed.py); returns the plan as applied. A packed run also
    gets the guard that refuses packed batches with a KV cache (patches.packing). All undone when `undo` closes."""
    from tunelab.patches.packing import refuse_packed_batches_with_cache
    from tunelab.training.speed import apply_speed

    if uses_packing(cfg):
        refuse_packed_batches_with_cache(model, undo)
    applied = apply_speed(model, plan, undo, longest=cfg.data.cutoff_len)
    say(applied.describe())
    return applied


def uses_packing(cfg: RunConfig) -> bool:
    from tunelab.methods import get_method

    return cfg.data.packing and get_method(cfg.method.name).supports_packing


def make_collator(cfg: RunConfig, tokenizer):
    from tunelab.data.collate import make_collator as data_collator

    return data_collator(uses_packing(cfg), tokenizer)


@dataclass
class TrainerSetup:
    """What a stage's trainer is built from: the run, where and how it computes, and the caller's extras."""

    cfg: RunConfig
    run: RunDir
    device: str
    precision: Precision
    echo: bool = True  # progress on the console (main process)
    callbacks: list | None = None  # extra transformers TrainerCallbacks
    checkpoint: Path | None = None  # the checkpoint a resumed run continues from


def training_arguments(setup: TrainerSetup, has_eval: bool, external: list[str]):
    """transformers' TrainingArguments of the run (alignment stages start their TRL config from these)."""
    from transformers import TrainingArguments

    cfg, run, device, precision, echo = setup.cfg, setup.run, setup.device, setup.precision, setup.echo
    t = cfg.train
    grouped = t.group_by_length and not uses_packing(cfg)  # packed batches have no padding to save
    early = bool(t.early_stopping_patience and has_eval)
    eval_strategy = ("steps" if t.eval_steps else "epoch") if has_eval else "no"
    save_strategy, save_steps = ("steps", t.save_steps) if t.save_steps else ("epoch", None)
    if early:  # keeping the best model needs a checkpoint at every evaluation
        save_strategy, save_steps = eval_strategy, t.eval_steps
    return TrainingArguments(
        output_dir=str(run.checkpoints), run_name=run.path.name, seed=t.seed,
        num_train_epochs=t.epochs, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps or t.warmup_ratio,
        lr_scheduler_kwargs={"min_lr_rate": 0.1} if t.scheduler == "cosine_with_min_lr" else None,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        activation_checkpointing=t.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps, logging_first_step=True, logging_nan_inf_filter=False,
        eval_strategy=eval_strategy, eval_steps=t.eval_steps, save_strategy=save_strategy, save_steps=save_steps,
        save_total_limit=None,  # TunelabTrainer rotates checkpoints itself, atomically
        load_best_model_at_end=early, metric_for_best_model="eval_loss" if early else None, greater_is_better=False,
        report_to=external or "none", bf16=precision.autocast == "bf16", fp16=precision.autocast == "fp16",
        use_cpu=device == "cpu", train_sampling_strategy="group_by_length" if grouped else "random",
        torch_compile=t.torch_compile, deepspeed=t.deepspeed, fsdp=t.fsdp or None,
        # a packed row has no padding, but its end-of-turn tokens equal the pad id and "non_padding" would skip them
        include_num_input_tokens_seen="all" if uses_packing(cfg) else "non_padding", remove_unused_columns=False,
        dataloader_pin_memory=device == "cuda", ddp_find_unused_parameters=False, disable_tqdm=not echo,
    )


def build_trainer(setup: TrainerSetup, model, tokenizer, data, sparse_logits: bool = False):
    from tunelab.training.trackers import start_trackers
    from tunelab.training.trainer import TunelabTrainer

    cfg, run = setup.cfg, setup.run
    main = _is_main()
    external = [n for n in cfg.train.report_to if n != "tensorboard"]
    if main:
        start_trackers(cfg.train.report_to, run.path, run.path.name, cfg.model_dump(mode="json"),
                       cfg.train.trackers_offline)
    args = training_arguments(setup, data.validation is not None, external)
    trainer = TunelabTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.validation,
        data_collator=make_collator(cfg, tokenizer), processing_class=tokenizer,
        keep_checkpoints=cfg.train.save_total_limit, sparse_logits=sparse_logits,
    )
    add_monitoring(trainer, cfg, run, setup.echo, setup.checkpoint, setup.callbacks)
    return trainer


def add_monitoring(trainer, cfg: RunConfig, run, echo: bool, checkpoint: Path | None, callbacks) -> None:
    """tunelab's progress bar + console line + metrics.jsonl, run.json updates, TensorBoard, early stopping and the
    caller's callbacks, instead of transformers' printer; every stage's trainer (SFT's, TRL's) gets the same."""
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tunelab.training.callbacks import MonitorCallback, RunStatusCallback
    from tunelab.training.trackers import tensorboard_callback

    for default in (ProgressCallback, PrinterCallback):  # replaced by MonitorCallback (bar + line + JSONL)
        trainer.remove_callback(default)
    extra = [MonitorCallback(run.metrics, echo=echo), RunStatusCallback(run)]
    if _is_main():
        extra.append(tensorboard_callback(run.tb, purge_step=checkpoint_step(checkpoint) + 1 if checkpoint else None))
    if trainer.args.load_best_model_at_end:
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    for callback in extra + list(callbacks or []):
        trainer.add_callback(callback)


def _provenance(model_path: Path) -> dict | None:
    from tunelab.models.resolve import model_provenance

    return model_provenance(model_path)


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _env(device: str, state, precision: Precision, speed) -> dict:
    from dataclasses import asdict

    from tunelab.runs.rundir import env_info

    return {**env_info(device), "world_size": state.num_processes, "dtype": str(precision.dtype).replace("torch.", ""),
            "mixed_precision": precision.autocast or "no", "speed": asdict(speed)}


# ----------------------------------------------------------------------------------------------------- fit
def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def resume_point(run, resume: bool, state, say) -> Path | None:
    """The last complete checkpoint to resume from; what the killed run logged after it is dropped."""
    from tunelab.runs.rundir import latest_checkpoint
    from tunelab.training.callbacks import truncate_metrics

    if not resume:
        return None
    checkpoint = latest_checkpoint(run.checkpoints)
    if checkpoint is None:
        say(f"--resume: {run.path} has no complete checkpoint yet; training from the start")
        return None
    say(f"resuming from {checkpoint}")
    if state.is_main_process:
        truncate_metrics(run.metrics, checkpoint_step(checkpoint))
    return checkpoint


def fit(trainer, run, tokenizer, checkpoint: Path | None, state, cfg: RunConfig) -> RunResult:
    """Train (from `checkpoint` when resuming), save final/, record the outcome in run.json. Ctrl-C or SIGTERM
    stops after the current step with a checkpoint saved (status "stopped"; no final/)."""
    from tunelab.training.callbacks import GracefulStop, NonFiniteLossError
    from tunelab.training.trackers import finish_trackers

    stop = GracefulStop()
    trainer.add_callback(stop)
    stop.install()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLossError as e:
        raise _stopped_on_nan(run, e, state) from None
    except BaseException as e:
        if state.is_main_process:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            run.update(status=status, error=f"{type(e).__name__}: {e}", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        raise
    finally:
        stop.uninstall()
        if state.is_main_process:
            finish_trackers(cfg.train.report_to)
    if stop.stopped_at is not None:
        return _stopped_by_user(trainer, output, run, state, stop.stopped_at)
    final = save_final(trainer, tokenizer, run, state)
    metrics = summarize(trainer, output, run)
    if state.is_main_process:
        _plot(run)
        run.update(status="completed", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), final_dir=str(final),
                   resumed_from=str(checkpoint) if checkpoint else None, metrics=metrics)
    return RunResult(run.path, final, metrics)


def _stopped_by_user(trainer, output, run, state, step: int) -> RunResult:
    from tunelab.runs.rundir import latest_checkpoint

    metrics = summarize(trainer, output, run)
    checkpoint = latest_checkpoint(run.checkpoints)
    if state.is_main_process:
        _plot(run)
        run.update(status="stopped", stopped_at_step=step, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   last_checkpoint=checkpoint.name if checkpoint else None, metrics=metrics)
    return RunResult(run.path, None, metrics, status="stopped")


def _stopped_on_nan(run, error, state) -> TunelabError:
    from tunelab.training.trainer import last_good_checkpoint, set_aside_nonfinite

    good = last_good_checkpoint(run.checkpoints, error.step)
    bad = set_aside_nonfinite(run.checkpoints, error.step) if state.is_main_process else []
    kept = (f"the last good checkpoint (weights that gave a finite loss) is {good}" if good
            else "no checkpoint with weights that gave a finite loss had been saved yet")
    if bad:
        kept += f"; {', '.join(p.name for p in bad)} (saved after the update that broke the weights) set aside"
    message = (f"training stopped: the loss became {error.value} at step {error.step}; {kept}. "
               "Lower train.lr, set train.max_grad_norm, use mixed_precision bf16 instead of fp16, or check the "
               "data for empty or extreme examples.")
    if state.is_main_process:
        run.update(status="failed", error=message, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   last_good_checkpoint=str(good) if good else None, last_checkpoint=good.name if good else None)
    return TunelabError(message)


def save_final(trainer, tokenizer, run, state) -> Path:
    """final/: the adapter (or full model) plus the tokenizer carrying the training template, moved in atomically."""
    from tunelab.training.speed import restore_attention
    from tunelab.training.trainer import publish

    staging = run.path / f".final-{int(time.time())}"
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    restore_attention(model)  # a saved config names a standard kernel, never tunelab's
    base.config.use_cache = True  # training turned the KV cache off; generation needs it back
    trainer.save_model(str(staging))  # every rank calls it (DeepSpeed ZeRO-3 gathers shards); rank 0 writes
    if state.is_main_process:
        tokenizer.save_pretrained(str(staging))
        publish(staging, run.final, trash=run.checkpoints / ".staging")
    state.wait_for_everyone()
    return run.final


def summarize(trainer, output, run) -> dict:
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    metrics = {"global_step": trainer.state.global_step, "train_loss": output.training_loss,
               "final_loss": losses[-1] if losses else None, "eval_loss": evals[-1] if evals else None,
               "runtime_s": output.metrics.get("train_runtime"), "tokens_seen": trainer.state.num_input_tokens_seen}
    speeds = [h["train_tokens_per_second"] for h in history if "train_tokens_per_second" in h]
    metrics["tokens_per_s"] = speeds[-1] if speeds else None  # input tokens per second of this session
    for record in history:  # alignment stages: the last value of TRL's rewards/*, logps/* (and eval_rewards/*)
        metrics.update({k: v for k, v in record.items() if "/" in k})
    return metrics


def _plot(run) -> None:
    from tunelab.training.callbacks import plot_losses

    try:
        plot_losses(run.metrics, run.loss_plot, title=run.path.name)
    except Exception as e:  # noqa: BLE001 - a plot is never worth failing a finished run for
        log.warning("could not draw loss.png: %s", e)
