"""Stage 3 (method): make a loaded model trainable the way `cfg.method` says; one registry entry per method.

    check_method_available(cfg.method, device)     # before anything is loaded
    model = load_model(cfg.model, **method_load_kwargs(cfg.method, device))
    model = apply_method(model, cfg.method)         # PEFT model, or the model with frozen parameters
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.config.schema import MethodSection
from tunelab.errors import TunelabError
from tunelab.registry import Registry

log = logging.getLogger(__name__)


def _always_available(_cfg, _device: str) -> None:
    return None


def _no_load_kwargs(_cfg, _device: str) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    """One tuning method: its config section, what it can do, and how to check, load and apply it.

    Everything outside this package asks the entry, never the method's name: the config accepts `config` under
    `method:`, the web UI builds its form from it, `tunelab runs` shows `summary_keys`, and training, the speed
    plan, the memory estimate and export read the capability flags. A new method is one module plus one
    `register_method` call.
    """

    name: str
    apply: Callable[[Any, Any], Any]  # (model, method_cfg) -> model
    config: type[MethodSection]  # its section, with `name: Literal["<name>"] = "<name>"`
    check: Callable[[Any, str], None] = _always_available  # raises MethodUnavailableError
    load_kwargs: Callable[[Any, str], dict[str, Any]] = _no_load_kwargs  # extra from_pretrained kwargs
    description: str = ""
    summary_keys: tuple[str, ...] = ()  # config fields shown next to the name in `tunelab runs`
    # capabilities
    is_adapter: bool = False  # the trained weights are a peft adapter saved beside the untouched base
    mergeable: bool = False  # the adapter folds into the base weights (export writes one merged model)
    quantized_base: bool = False  # the frozen base is loaded quantized (see base_weight_bytes)
    trains_base_weights: bool = False  # full / freeze: the base weights get gradients and optimizer state
    lora_layers: bool = False  # peft LoRA layers on an unquantized base: the LoRA speed levers apply (speed.py)
    supports_packing: bool = True  # prefix tuning passes a KV cache, which turns off packed-sequence detection
    supports_gradient_checkpointing: bool = True  # prefix tuning: checkpointed layers drop its past_key_values
    # memory estimate: bytes per frozen base weight (quantized_base), and how to apply the method to a model on
    # the meta device when `apply` needs real weights (QLoRA's quantization); default: `apply`
    base_weight_bytes: Callable[[Any], float] | None = None
    apply_unquantized: Callable[[Any, Any], Any] | None = None

    def __post_init__(self) -> None:
        field = self.config.model_fields.get("name")
        if field is None or field.default != self.name:
            raise ValueError(f"method {self.name!r}: its config {self.config.__name__} must declare "
                             f"`name: Literal[{self.name!r}] = {self.name!r}`")
        unknown = [k for k in self.summary_keys if k not in self.config.model_fields]
        if unknown:
            raise ValueError(f"method {self.name!r}: summary_keys {unknown} are not fields of {self.config.__name__}")
        if self.quantized_base and self.base_weight_bytes is None:
            raise ValueError(f"method {self.name!r}: quantized_base needs base_weight_bytes")
        if (self.mergeable or self.lora_layers) and not self.is_adapter:
            raise ValueError(f"method {self.name!r}: mergeable / lora_layers describe adapters; set is_adapter")
        if self.is_adapter and self.trains_base_weights:
            raise ValueError(f"method {self.name!r}: an adapter leaves the base weights frozen")


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    return METHODS.register(method)


def unregister_method(name: str) -> Method:
    """Remove a registered method (tests, plugins reloading); returns its entry."""
    return METHODS.unregister(name)


def get_method(name: str) -> Method:
    return METHODS.get(name)


def known_methods() -> list[str]:
    return sorted(METHODS.names())


def method_sections() -> list[type[MethodSection]]:
    """The config sections `method:` accepts, in registration order (the first ones are the built-ins)."""
    return [method.config for method in METHODS]


def check_method_available(method_cfg, device: str) -> None:
    """Raise MethodUnavailableError (saying why and what to use instead) before any weights are loaded."""
    get_method(method_cfg.name).check(method_cfg, device)


def method_load_kwargs(method_cfg, device: str) -> dict[str, Any]:
    """Extra `from_pretrained` arguments the method needs (QLoRA: quantization_config, device_map)."""
    return get_method(method_cfg.name).load_kwargs(method_cfg, device)


def apply_method(model, method_cfg):
    """Return the model ready to train with `method_cfg` and log its trainable / total parameter counts."""
    model = get_method(method_cfg.name).apply(model, method_cfg)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise TunelabError(f"method {method_cfg.name}: no parameter is trainable; check the method section")
    log.info("method %s: %s", method_cfg.name, describe_parameters(trainable, total))
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count every packed value, as peft does."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":  # two 4-bit values per byte of storage
            n *= 2 * getattr(getattr(param, "quant_storage", None), "itemsize", 1)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def describe_parameters(trainable: int, total: int) -> str:
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"


def _register_builtin() -> None:
    from tunelab.methods import freeze, full, lora, prefix, qlora

    for module in (lora, qlora, full, freeze, prefix):
        for method in module.METHODS:
            register_method(method)


_register_builtin()
