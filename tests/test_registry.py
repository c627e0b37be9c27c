"""tunelab.registry.Registry: the one registry type behind methods, stages, formats, templates, metrics, engines."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tunelab.errors import TunelabError
from tunelab.registry import Registry


@dataclass
class Entry:
    name: str
    value: int = 0


def test_register_get_names_and_iteration_keep_registration_order():
    reg: Registry[Entry] = Registry("widget")
    b, a = reg.register(Entry("b", 1)), reg.register(Entry("a", 2))
    assert reg.get("a") is a and reg.names() == ["b", "a"] and list(reg) == [b, a] == reg.entries()
    assert "a" in reg and "c" not in reg and len(reg) == 2
    assert reg.register(3, name="c") == 3  # an entry without a name of its own (preference converters)
    assert reg.unregister("b") is b and reg.names() == ["a", "c"]


def test_sorted_registry_lists_and_iterates_by_name():
    reg: Registry[Entry] = Registry("stage", sort=True)
    for name in ("sft", "dpo", "kto"):
        reg.register(Entry(name))
    assert reg.names() == ["dpo", "kto", "sft"] and [e.name for e in reg] == ["dpo", "kto", "sft"]


def test_errors_name_the_kind_the_name_and_the_known_entries():
    reg: Registry[Entry] = Registry("widget", reserved=("auto",))
    reg.register(Entry("a"))
    with pytest.raises(TunelabError, match=r"^unknown widget 'z'; known: a$"):
        reg.get("z")
    with pytest.raises(ValueError, match=r"^widget 'a' is already registered; known: a$"):
        reg.register(Entry("a"))
    with pytest.raises(ValueError, match="'auto' is already registered"):
        reg.register(Entry("auto"))
    with pytest.raises(TunelabError, match="unknown widget 'z'"):
        reg.unregister("z")
    keyed: Registry[Entry] = Registry("record format", unknown=KeyError)
    with pytest.raises(KeyError, match="unknown record format 'x'; known: "):
        keyed.get("x")


def test_aliases_resolve_and_cannot_shadow_an_entry():
    reg: Registry[Entry] = Registry("chat template")
    qwen = reg.register(Entry("qwen"))
    reg.alias("qwen2.5", "qwen")
    assert reg.get("qwen2.5") is qwen and "qwen2.5" in reg and reg.names() == ["qwen"]
    with pytest.raises(ValueError):
        reg.register(Entry("qwen2.5"))
    with pytest.raises(ValueError):
        reg.alias("qwen", "qwen")
    with pytest.raises(TunelabError):
        reg.alias("x", "missing")


def test_every_tunelab_registry_is_a_registry():
    from tunelab.data.formats import FORMATS
    from tunelab.data.preference_formats import PREFERENCE_FORMATS
    from tunelab.data.templates import TEMPLATES, template_names
    from tunelab.evaluation.metrics import METRICS
    from tunelab.inference.engine import ENGINES
    from tunelab.methods import METHODS
    from tunelab.training.stages import STAGES

    template_names()  # the built-in templates are read on first use
    for reg in (FORMATS, PREFERENCE_FORMATS, TEMPLATES, METRICS, ENGINES, METHODS, STAGES):
        assert isinstance(reg, Registry) and len(reg) >= 2, reg.what
