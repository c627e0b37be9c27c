"""The run configuration: one validated object per run, read from YAML (see load.py).

Every field carries its documentation in `Field(description=...)`; `tunelab validate` and the web UI read it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


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
    cache_dir: str | None = Field(None, description="Where converted models are cached (default ~/.cache/tunelab).")


# ------------------------------------------------------------------------------------------------------------ data
class DatasetSpec(Section):
    path: str | None = Field(None, description="A file (json, jsonl, csv, parquet, txt), a folder, or a glob.")
    name: str | None = Field(None, description="A dataset registered in `data.dataset_dir`/dataset_info.json.")
    format: Literal["auto", "alpaca", "sharegpt", "openai", "text"] = Field(
        "auto", description="Record format; auto detects it from the first record's keys."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping as in LLaMA-Factory (prompt, query, response, history, messages, system, tools).",
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
class LoraConfig(Section):
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


class FullConfig(Section):
    name: Literal["full"] = "full"


class FreezeConfig(Section):
    name: Literal["freeze"] = "freeze"
    trainable_layers: int = Field(2, ge=0, description="Train the last N decoder layers (0: none).")
    trainable_modules: list[str] = Field(
        default_factory=list, description="Also train parameters whose name contains one of these (e.g. lm_head)."
    )


class PrefixConfig(Section):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(16, ge=1, description="Virtual key/value tokens per layer.")
    projection: bool = Field(True, description="P-Tuning v2 reparameterization through an MLP.")
    encoder_hidden_size: int | None = Field(None, description="Hidden size of the projection MLP (default: model's).")


MethodConfig = Annotated[
    LoraConfig | DoraConfig | QLoraConfig | FullConfig | FreezeConfig | PrefixConfig, Field(discriminator="name")
]


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
    metrics: list[str] = Field(
        default_factory=lambda: ["loss", "perplexity", "bleu", "rouge", "exact_match"],
        description="Metrics to compute: loss, perplexity, bleu, rouge, exact_match, preference (pairwise accuracy "
        "and margin on chosen/rejected pairs, always computed on preference data; see docs/metrics.md).",
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
        "build; q4_k_m, q5_k_m, q6_k: llama.cpp's llama-quantize on PATH)."
    )
    ollama: bool = Field(False, description="Write an Ollama Modelfile (needs a GGUF; q8_0 is written if none is asked).")
    quantize: Literal["none", "int8", "bnb8", "bnb4"] = Field("none", description="Post-merge quantization.")
    converter_dir: str | None = Field(
        None, description="A llama.cpp checkout with convert_hf_to_gguf.py (default: fetched from the "
        "llama-cpp-python sdist on PyPI into the cache)."
    )


# ----------------------------------------------------------------------------------------------------------- serve
class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Bind address; loopback unless you ask for more.")
    port: int = Field(8000, ge=0, le=65535)
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


# ------------------------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_method_name(cls, data):
        """`method: {r: 16}` means LoRA, the default method."""
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": "lora", **data["method"]}}
        return data
