"""The run configuration: one validated object per run, read from YAML (see load.py).

Every field carries its documentation in `Field(description=...)`; `tunelab validate` and the web UI read it.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    TypeAdapter,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


# Registries whose names a config field accepts. Each lives in the stage that owns the concept and is read at
# validation time (deferred imports), so an entry registered by user code is accepted like a built-in one.
REGISTRIES = {
    "format": ("tunelab.data.preference_formats", "dataset_format_choices", "record format"),
    "metric": ("tunelab.evaluation.metrics", "known_metrics", "metric"),
    "engine": ("tunelab.inference.engine", "known_engines", "inference engine"),
}


def registered(registry: str) -> list[str]:
    """The names a registry holds now, e.g. registered("format") -> ["auto", "alpaca", ...]."""
    import importlib

    module, function, _what = REGISTRIES[registry]
    return list(getattr(importlib.import_module(module), function)())


def check_registered(registry: str, value: str) -> str:
    known = registered(registry)
    if value not in known:
        raise PydanticCustomError(f"unknown_{registry}", "unknown {what}; known: {known}",
                                  {"what": REGISTRIES[registry][2], "known": ", ".join(known)})
    return value


def Registered(registry: str) -> Any:
    """A str field whose value must be a name the registry holds when the config is validated; the JSON schema
    (and the web UI form) see `"registry": NAME`."""
    return Annotated[str, AfterValidator(functools.partial(check_registered, registry)),
                     Field(json_schema_extra={"registry": registry}), _RegistryJsonSchema(registry)]


class _RegistryJsonSchema:
    """Adds `enum`: the names the registry holds when the JSON schema is generated (web UI, editors)."""

    def __init__(self, registry: str):
        self.registry = registry

    def __get_pydantic_json_schema__(self, core_schema, handler) -> dict:
        return {**handler(core_schema), "enum": registered(self.registry)}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    name: str = Field(
        DEFAULT_MODEL,
        description="Local Hugging Face folder, hub id, or .gguf file. The default resolves offline to the "
        "embedded SmolLM2-135M-Instruct.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` when `name` is a folder.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. auto: float32 on CPU/MPS, bfloat16 on GPUs that support it, else float16."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to run. auto picks cuda, mps, cpu.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model repository (ChatGLM, Baichuan).")
    quantize: Literal["none", "int8", "nf4"] = Field(
        "none", description="Inference only (chat, eval, serve): load the base weights with bitsandbytes in 8-bit "
        "(LLM.int8) or 4-bit NF4; a run's adapter is applied on top. Training refuses it (use method qlora)."
    )
    cache_dir: str | None = Field(None, description="Where converted models are cached (default ~/.cache/tunelab).")


# ------------------------------------------------------------------------------------------------------------ data
class DatasetSpec(Section):
    path: str | None = Field(None, description="A file (json, jsonl, csv, parquet, txt), a folder, or a glob.")
    name: str | None = Field(None, description="A dataset registered in `data.dataset_dir`/dataset_info.json.")
    format: Registered("format") = Field(
        "auto", description="Record format: auto (detected from the first record's keys) or a registered format "
        "(tunelab.data.formats: alpaca, sharegpt, openai, text, ...). Preference data (stages other than sft) also "
        "reads trl (prompt/chosen/rejected) and kto (prompt/completion/label).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping as in LLaMA-Factory (prompt, query, response, history, messages, system, tools; "
        "preference data: chosen, rejected, completion, kto_tag).",
    )
    ranking: bool = Field(
        False, description="A preference dataset (chosen/rejected replies, LLaMA-Factory's `ranking: true`): read by "
        "the alignment stages and preference evaluation, refused by supervised fine-tuning."
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="ShareGPT role tags (role_tag, content_tag, user_tag, assistant_tag, observation_tag, "
        "function_tag, system_tag).",
    )
    max_samples: int | None = Field(None, ge=1, description="Keep at most this many records of this dataset.")
    text_unit: Literal["line", "file"] = Field("line", description="Plain text: one document per line or per file.")

    @model_validator(mode="after")
    def _path_or_name(self) -> DatasetSpec:
        if (self.path is None) == (self.name is None):
            raise ValueError("give exactly one of `path` (a file, folder or glob) or `name` (a registered dataset)")
        return self


class CleanConfig(Section):
    trim: bool = Field(
        True, description="Strip whitespace at the start and end of each message (nothing inside it is changed)."
    )
    normalize_whitespace: bool = Field(
        False, description="Opt-in: also unify line endings, drop trailing spaces, collapse blank-line runs and runs "
        "of spaces/tabs inside a line; fenced code blocks and indented lines are never changed."
    )
    strip_html: bool = Field(False, description="Remove HTML tags and entities (not chat markup like <think>).")
    drop_empty: bool = Field(True, description="Drop records whose prompt or response is empty.")
    dedup: bool = Field(True, description="Drop exact duplicate conversations.")
    min_chars: int = Field(0, ge=0, description="Drop records whose total text is shorter than this.")
    max_chars: int | None = Field(None, ge=1, description="Drop records whose total text is longer than this.")


class DataConfig(Section):
    datasets: list[DatasetSpec] = Field(default_factory=list, description="Datasets to mix, in order.")
    dataset_dir: str | None = Field(
        None, description="Folder with a LLaMA-Factory compatible dataset_info.json, for datasets given by `name`."
    )
    template: str = Field(
        "auto", description="Chat template: auto (the tokenizer's own, else chatml), a registered name, or a path "
        "to a .jinja file."
    )
    system: str | None = Field(None, description="Default system prompt for records that have none.")
    enable_thinking: bool | None = Field(None, description="Qwen3-style templates: render thinking on or off.")
    variables: dict[str, str] = Field(
        default_factory=dict, description="Values substituted for {name}-style placeholders in records "
        "(e.g. name, author for self-cognition data).",
    )
    cutoff_len: int = Field(1024, ge=8, description="Maximum tokens per example; longer ones are truncated "
                            "(plain-text documents: see long_text).")
    long_text: Literal["chunk", "truncate"] = Field(
        "chunk", description="Plain-text documents longer than cutoff_len: split into consecutive cutoff_len-token "
        "examples (nothing lost), or truncate like conversations."
    )
    train_on: Literal["all_assistant", "last_assistant", "everything"] = Field(
        "all_assistant", description="Which tokens carry loss: every assistant turn, only the last, or all tokens."
    )
    packing: bool = Field(True, description="Padding-free packing of examples into one row per batch.")
    val_size: float = Field(0.0, ge=0, description="Validation split: a fraction (<1) or a count (>=1).")
    seed: int = Field(42, description="Seed of the shuffle and split.")
    max_reject_ratio: float = Field(0.05, ge=0, le=1, description="Fail when more than this share is rejected.")
    strict: bool = Field(False, description="Fail on the first bad record instead of skipping it.")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    cache_dir: str | None = Field(
        None, description="Where processed data is cached (default: $TUNELAB_DATA_CACHE, else ~/.cache/tunelab/data)."
    )
    num_proc: int = Field(
        2, ge=1, description="Tokenizer calls run in parallel threads (the Rust tokenizer releases the GIL)."
    )


# ---------------------------------------------------------------------------------------------------------- method
class MethodSection(Section):
    """Base of every method section. A subclass declares `name: Literal["<method>"] = "<method>"` and is named by
    the method's registry entry (tunelab.methods.Method.config); `method: {name: ...}` selects it."""

    name: str = Field(description="Tuning method: one of the registered methods (tunelab.methods).")


class LoraConfig(MethodSection):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16, description="LoRA scaling alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )
    rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r).")
    modules_to_save: list[str] = Field(default_factory=list, description="Extra modules trained in full and saved.")
    init_from: str | None = Field(None, description="Start from an existing adapter folder (a new run, not a resume).")


class DoraConfig(LoraConfig):
    name: Literal["dora"] = "dora"  # type: ignore[assignment]


class QLoraConfig(LoraConfig):
    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    bits: Literal[4, 8] = Field(4, description="Quantization bits of the frozen base.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Matmul dtype.")


class FullConfig(MethodSection):
    name: Literal["full"] = "full"


class FreezeConfig(MethodSection):
    name: Literal["freeze"] = "freeze"
    trainable_layers: int = Field(2, ge=0, description="Train the last N decoder layers (0: none).")
    trainable_modules: list[str] = Field(
        default_factory=list, description="Also train parameters whose name contains one of these (e.g. lm_head)."
    )


class PrefixConfig(MethodSection):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(16, ge=1, description="Virtual key/value tokens per layer.")
    projection: bool = Field(True, description="P-Tuning v2 reparameterization through an MLP.")
    encoder_hidden_size: int | None = Field(None, description="Hidden size of the projection MLP (default: model's).")


def registered_method_sections() -> tuple[type[MethodSection], ...]:
    """The config sections of the registered methods, in registration order."""
    # Deferred import: the method registry (stage 3) names the sections defined here, so it is read at validation
    # time, when every built-in and user-registered method is known.
    from tunelab.methods import method_sections

    return tuple(method_sections())


@functools.cache
def _sections_adapter(sections: tuple[type[MethodSection], ...]) -> TypeAdapter:
    """A discriminated union over `sections`: the same checks and messages as a union written out by hand
    (an unknown `name` lists the known ones; a misspelled key names itself and the valid ones)."""
    if len(sections) == 1:
        return TypeAdapter(sections[0])
    return TypeAdapter(Annotated[Union[sections], Field(discriminator="name")])  # noqa: UP007 - built at run time


def _validate_method(value: Any, _handler) -> MethodSection:
    sections = registered_method_sections()
    if isinstance(value, sections):
        return value
    return _sections_adapter(sections).validate_python(value)


class _MethodJsonSchema:
    """JSON schema of `method`: one alternative per registered method, told apart by `name`."""

    def __get_pydantic_json_schema__(self, _core_schema, handler) -> dict:
        members = [handler(section.__pydantic_core_schema__) for section in registered_method_sections()]
        return {"oneOf": members, "discriminator": {"propertyName": "name"}}


# The method section: a registered method's own config class, chosen by `name` (not a closed union, so a
# `register_method` entry is selectable from YAML). SerializeAsAny dumps the chosen class's fields, not the base's.
MethodConfig = Annotated[SerializeAsAny[MethodSection], WrapValidator(_validate_method), _MethodJsonSchema()]
DEFAULT_METHOD = "lora"


# ----------------------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    output_dir: str = Field("runs", description="Runs are written to output_dir/run_name.")
    run_name: str | None = Field(None, description="Run folder name (default: timestamp + model + method).")
    epochs: float = Field(3.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps (overrides warmup_ratio when > 0).")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0: off).")
    seed: int = Field(42)
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: once per epoch).")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: once per epoch).")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evaluations without gain.")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers: tensorboard, wandb, swanlab, mlflow."
    )
    trackers_offline: bool = Field(
        True, description="wandb and swanlab write their runs locally (sync them later); mlflow logs to "
        "<run>/mlflow.db unless MLFLOW_TRACKING_URI is set."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the device supports it fast, else none."
    )
    group_by_length: bool = Field(
        True, description="Padded batches (no packing): batch examples of similar length together, less padding."
    )
    torch_compile: bool = Field(False, description="Compile the model with torch.compile.")
    # speed options (docs/speed.md has each one's measured effect); none changes which tokens are trained
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: one per usable core).")
    bf16_frozen_base: bool = Field(
        True, description="LoRA/DoRA under bf16 autocast: keep the frozen base weights in bf16 (adapters stay fp32)."
    )
    fp32_adapter_output: bool = Field(
        True, description="LoRA/DoRA under autocast: keep adapted layers' outputs in fp32, so small adapter updates "
        "are not rounded away by bf16 (accuracy: bf16 loss within 0.3% of fp32 instead of +1.4%; costs some speed)."
    )
    packed_attention: bool = Field(
        True, description="With packing: attention per packed example instead of one block-diagonal mask (sdpa)."
    )
    sparse_logits: bool = Field(
        True, description="Compute logits and loss only at trained positions (prompt tokens skip the lm_head)."
    )
    fast_dropout: bool = Field(True, description="CPU: LoRA dropout with a cheaper random mask (same distribution).")
    fused_lora: bool = Field(
        True, description="LoRA without autocast (fp32): add the adapter's output into the frozen layer's output "
        "with one addmm."
    )
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed JSON config.")
    fsdp: str | None = Field(None, description="FSDP options string passed to transformers, e.g. 'full_shard auto_wrap'.")
    max_memory_gb: float | None = Field(None, gt=0, description="Fail early when the estimate exceeds this.")

    @model_validator(mode="before")
    @classmethod
    def _yaml_no(cls, data):
        """YAML reads `mixed_precision: no` as false; it means "no"."""
        if isinstance(data, dict) and data.get("mixed_precision") is False:
            data = {**data, "mixed_precision": "no"}
        return data


# ----------------------------------------------------------------------------------------------------------- align
class AlignConfig(Section):
    """Preference alignment hyper-parameters (`stage: dpo | orpo | simpo | kto | rm`); each goes to TRL's trainer."""

    beta: float | None = Field(
        None, gt=0, description="Strength of the preference term. dpo/kto: the KL penalty beta (default 0.1); orpo: "
        "the odds-ratio weight lambda (default 0.1); simpo: the reward scale beta (default 2.0). Unused by rm."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
                       "apo_zero", "apo_down", "discopop"] = Field(
        "sigmoid", description="dpo: TRL's DPO loss variant (sigmoid: the DPO paper; ipo; hinge (SLiC); robust "
        "(noise-robust DPO, uses label_smoothing); ...)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo (sigmoid, robust) and simpo: assumed share of flipped preference labels."
    )
    sft_weight: float = Field(
        0.0, ge=0, description="dpo: weight of an NLL (SFT) term on the chosen reply added to the preference loss "
        "(RPO; TRL's loss_type 'sft'); 0: off. It keeps greedy answers from collapsing onto what many chosen replies "
        "share once the preference loss is near 0."
    )
    reference_free: bool = Field(
        False, description="dpo: score against a uniform reference (reference log-probs 0): no reference forward."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="dpo/kto: compute the reference log-probs once before training (full/freeze methods then "
        "need no second model copy in memory)."
    )
    simpo_gamma: float = Field(0.5, description="simpo: target reward margin gamma.")
    cpo_alpha: float = Field(
        0.0, ge=0, description="simpo: weight of the NLL term on the chosen reply (0: pure SimPO; 1: CPO-SimPO)."
    )
    desirable_weight: float = Field(1.0, gt=0, description="kto: loss weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: loss weight of undesirable examples.")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="rm: pull the mean reward towards 0 with this weight (None: off)."
    )


# ------------------------------------------------------------------------------------------------------------ eval
class CheckConfig(Section):
    kind: Literal["regex", "contains"] = "contains"
    pattern: str = Field(description="Text (contains) or regular expression (regex) the prediction must match.")


class EvalConfig(Section):
    datasets: list[DatasetSpec] = Field(
        default_factory=list, description="Evaluation data; empty: the run's validation split."
    )
    max_samples: int | None = Field(None, ge=1, description="Evaluate only the first N examples.")
    batch_size: int = Field(8, ge=1, description="Examples per loss forward and per generation batch.")
    max_new_tokens: int = Field(128, ge=1, description="Longest generated answer, in tokens.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (uses temperature and top_p).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (only with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (only with do_sample).")
    metrics: list[Registered("metric")] = Field(
        default_factory=lambda: ["loss", "perplexity", "bleu", "rouge", "exact_match"],
        description="Metrics to compute: registered metrics (tunelab.evaluation.metrics: loss, perplexity, bleu, "
        "rouge, exact_match, preference (pairwise accuracy and margin on chosen/rejected pairs, always computed on "
        "preference data), ...; see docs/metrics.md).",
    )
    checks: list[CheckConfig] = Field(default_factory=list, description="Extra regex/contains checks.")

    output_dir: str | None = Field(None, description="Where reports go (default: <run>/eval, else eval/<model>).")


# ---------------------------------------------------------------------------------------------------------- export
class ExportConfig(Section):
    output_dir: str | None = Field(None, description="Export folder (default: <run>/export).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Merged weights dtype. auto: the dtype the base model was saved in."
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard.")
    gguf: list[Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"]] = Field(
        default_factory=list, description="GGUF types to write, e.g. [f16, q4_0] (q4_0..q5_1: numpy, no llama.cpp "
        "build; q4_k_m, q5_k_m, q6_k: llama.cpp's llama-quantize, on PATH or built by --build-quantizer)."
    )
    imatrix: bool = Field(
        True, description="k-quants: compute an importance matrix with llama-imatrix from the run's own training "
        "text (rendered with its template) and quantize with it; runs without training data get none."
    )
    ollama: bool = Field(False, description="Write an Ollama Modelfile (needs a GGUF; q8_0 is written if none is asked).")
    quantize: Literal["none", "int8", "bnb8", "bnb4"] = Field("none", description="Post-merge quantization.")
    gptq: bool = Field(
        False, description="Also write a GPTQ W4A16 copy (<out>/gptq/, 4-bit weights, groups of 128) with GPT-QModel, "
        "calibrated on the run's training data; loads in transformers and vLLM (pip install 'tunelab[gptq]')."
    )
    awq: bool = Field(False, description="Also write an AWQ W4A16 copy (<out>/awq/) the same way.")
    calibration_samples: int = Field(
        128, ge=1, description="GPTQ/AWQ: training examples (rendered with the training template) to calibrate on."
    )
    converter_dir: str | None = Field(
        None, description="A llama.cpp checkout with convert_hf_to_gguf.py (default: fetched from the "
        "llama-cpp-python sdist on PyPI into the cache)."
    )
    overwrite: bool = Field(
        False, description="Replace a non-empty output_dir (a previous export) atomically: the old folder stays "
        "until the new export is complete."
    )
    verify: bool = Field(False, description="Reload each GGUF with transformers and compare answers.")
    table: bool = Field(
        True, description="Measure every artifact's size, perplexity and tokens/s (reloads each one)."
    )


# ----------------------------------------------------------------------------------------------------------- serve
class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Bind address; loopback unless you ask for more.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    model_name: str | None = Field(None, description="Name reported by /v1/models (default: the run or model name).")
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer tokens; empty: none needed.")
    api_key_env: str = Field("TUNELAB_API_KEY", description="Environment variable holding more API keys (comma-separated).")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; none by default.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted.")
    max_batch_size: int = Field(8, ge=1, description="Requests generated together in one batch.")
    max_queue: int = Field(64, ge=1, description="Waiting requests before 503.")
    max_new_tokens: int = Field(512, ge=1, description="Default and ceiling of max_tokens.")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long the first queued request waits for others to share its batch."
    )
    engine: Registered("engine") = Field(
        "hf", description="Inference engine that loads and runs the model: one of the registered engines."
    )
    allow_no_auth: bool = Field(
        False, description="Allow a non-loopback host without an API key (anyone on the network can use the model)."
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On Ctrl+C/SIGTERM: seconds requests in flight get to finish; then open streams end "
        "with an error event."
    )


# ------------------------------------------------------------------------------------------------------ generation
class GenerationConfig(Section):
    """How `tunelab chat` (and the web UI's chat, as its starting values) samples an answer."""

    max_new_tokens: int = Field(256, ge=1, description="Longest answer, in tokens.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold; 1: off.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0: off.")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on tokens already generated; 1: off.")
    seed: int | None = Field(None, description="Sampling seed (none: a different answer each time).")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (the template's own always stop).")


# ----------------------------------------------------------------------------------------------------------- webui
class WebUIConfig(Section):
    host: str = Field("127.0.0.1", description="Bind address of the web UI; 127.0.0.1: this machine only (set a "
                      "password before exposing it).")
    port: int = Field(7860, ge=0, le=65535, description="TCP port of the web UI.")
    password: str | None = Field(
        None, description="Require this password on a login page (any user name); none: $TUNELAB_WEBUI_PASSWORD, "
        "else no login."
    )
    lang: Literal["en", "zh"] = Field("en", description="Language of the page at start (switchable in the page).")


# ------------------------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    stage: str = Field(
        "sft", description="Training stage: sft (supervised fine-tuning), dpo, orpo, simpo, kto (preference "
        "alignment on TRL) or rm (a reward model with a value head); README: Alignment."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    webui: WebUIConfig = Field(default_factory=WebUIConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, value: str) -> str:
        from tunelab.training.stages import known_stages  # the registry itself imports nothing heavy

        if value not in known_stages():
            raise ValueError(f"unknown stage {value!r}; known stages: {', '.join(known_stages())}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_method_name(cls, data):
        """`method: {r: 16}` means LoRA, the default method."""
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": DEFAULT_METHOD, **data["method"]}}
        return data
