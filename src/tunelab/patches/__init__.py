"""Every place tunelab relies on a library's internals (private attributes, undocumented behaviour), one module each.

Each module says what it patches, why, and the library versions it was checked against; `in_checked_range` is its
version gate. Outside that range a patch falls back to the library's own, unpatched path, or refuses with a message
naming the versions (`require_checked`) where the unpatched path would silently give wrong results.
tests/test_patches.py holds one test per patch that fails when the library changes under it.

Nothing here runs at import time: a patch is applied to one model or trainer by an explicit call, and what can be
undone (forward hooks, peft's input casting switch) is registered with an ExitStack its caller closes when done.

    trainer_checkpoint   Trainer._get_output_dir / _save_checkpoint (atomic checkpoints)
    trainer_loss         Trainer attributes read by the trained-token loss
    attention            the packed-attention registration and its mask builder
    peft_layers          fp32 adapter outputs (hooks), fast LoRA dropout (module swap), input dtype casting,
                         fused LoRA add (class swap of peft's lora Linear)
    bitsandbytes         Linear4bit.support_avx512bf16_for_cpu (QLoRA on CPU)
    packing              refuses a packed batch run with a KV cache (transformers' packed detection skips it)
    trl_logprobs         trl.trainer.utils._use_triton (completion-only log-probs of DPO/KTO on CPU)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    """The versions of `package` a patch was checked against: `low` <= version < `high` (release numbers only)."""

    package: str
    low: str
    high: str
    tested: str  # the exact version the patch and its test were last run against

    def describe(self) -> str:
        return f"{self.package}>={self.low},<{self.high} (tested with {self.tested})"


def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _release(text: str) -> tuple[int, ...]:
    """(5, 24, 0) from '5.24.0', '5.24.0.dev0', '2.13.0+cpu', '0.50.2rc1'."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@cache
def in_checked_range(checked: Checked, installed: str | None = None) -> bool:
    """True when the installed (or given) version of the package lies in the range the patch was checked against."""
    found = installed if installed is not None else installed_version(checked.package)
    if found is None:
        return False
    return _release(checked.low) <= _release(found) < _release(checked.high)


def require_checked(checked: Checked, what: str) -> None:
    """Refuse, naming the versions, where running `what` unpatched would silently give wrong results."""
    if not in_checked_range(checked):
        found = installed_version(checked.package) or "not installed"
        raise TunelabError(f"{what} relies on internals of {checked.package} that tunelab checked for "
                           f"{checked.describe()}; installed: {found}. Install a version in that range "
                           f"(pip install '{checked.package}>={checked.low},<{checked.high}').")


_warned: set[str] = set()


def skip_outside_range(checked: Checked, what: str) -> bool:
    """True (and one warning per patch) when the patch must not be applied: the library's own path is used."""
    if in_checked_range(checked):
        return False
    if what in _warned:
        return True
    _warned.add(what)
    found = installed_version(checked.package) or "not installed"
    log.warning("%s is off: it relies on internals of %s checked for %s, installed %s", what, checked.package,
                checked.describe(), found)
    return True


TRANSFORMERS = Checked("transformers", "5.0", "6.0", "5.24.0")
PEFT = Checked("peft", "0.17", "1.0", "0.21.2")
BITSANDBYTES = Checked("bitsandbytes", "0.50", "1.0", "0.50.2")
