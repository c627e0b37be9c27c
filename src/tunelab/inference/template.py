"""Pick the chat template an inference engine or an export renders prompts with: the one recorded with the artifact.

Templates themselves belong to the data stage (tunelab.data.templates); this module only decides which one applies.
"""

from __future__ import annotations

from pathlib import Path


def load_template(tokenizer, name: str | None = None, template_file: Path | None = None,
                  enable_thinking: bool | None = None):
    """The template to prompt with, bound to `tokenizer` (whose chat_template is set to it).

    `name` (a registered name or a .jinja path) overrides; otherwise the tokenizer's own chat_template (what
    training saved with the artifact), else the run's chat_template.jinja, else chatml. `enable_thinking` is
    the run's data.enable_thinking; a recorded template that already sets it (training bakes it in) is kept
    byte for byte.
    """
    from tunelab.data.templates import apply_template, resolve_template

    if name is None:
        recorded = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        if not recorded and template_file is not None:
            name, recorded = str(template_file), template_file.read_text(encoding="utf-8")
        else:
            name = "auto"
        if recorded and "set enable_thinking" in recorded:
            enable_thinking = None
    template = resolve_template(name, tokenizer, enable_thinking=enable_thinking)
    apply_template(tokenizer, template)
    return template
