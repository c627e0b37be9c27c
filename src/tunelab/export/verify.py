"""Export, proof: the exported artifacts prompt and answer like the trained model.

- the exported tokenizer renders the same prompt text as the training template;
- a GGUF reloaded with transformers gives the same greedy answers as the merged folder (q8_0: within tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError

SAMPLE_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name a prime number."},
     {"role": "assistant", "content": "7"},
     {"role": "user", "content": "And another one?"}],
    [{"role": "user", "content": "用一句话介绍北京。"}],
]
# How close a GGUF reloaded with transformers must stay to the merged model, measured while both read the merged
# model's own greedy answers: mean KL divergence of their next-token distributions. f32/f16 keep (nearly) every bit
# of the weights, so their greedy answers must also be identical; bf16 (8-bit mantissa) and q8_0 (8-bit blocks of
# 32) move logits a little, and a near-tie may flip one token of a long answer: their answers are reported only.
# Measured on SmolLM2-135M + LoRA, 3 sample prompts: f16 2.1e-6, bf16 9.4e-5, q8_0 1.5e-3 (92.6% same next token,
# 2/3 identical answers: the Chinese answer takes another word after a near-tie). Tolerances leave ~7-50x room.
# 4/5-bit types (gguf_quant.py) move logits much more; their tolerances are set from the SmolLM2 measurements in
# docs/export.md with the same kind of room.
KL_TOLERANCE = {"f32": 1e-6, "f16": 1e-4, "bf16": 1e-3, "q8_0": 1e-2, "q5_0": 0.1, "q5_1": 0.1, "q4_0": 0.25,
                "q4_1": 0.25, "q6_k": 0.05, "q5_k_m": 0.1, "q4_k_m": 0.25}
EXACT_TYPES = ("f32", "f16")


def template_mismatches(export_dir: Path, template, conversations=SAMPLE_CONVERSATIONS) -> list[str]:
    """Conversations the exported tokenizer renders differently from the training template (empty: identical)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    problems = []
    for conv in conversations:
        for gen in (True, False):
            try:
                expected = template.render(conv, add_generation_prompt=gen)
            except TemplateError:  # a template may reject a conversation shape (e.g. no system role): skip it
                continue
            got = tokenizer.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            if got != expected:
                problems.append(f"{conv[-1]['content'][:30]!r} (generation prompt {gen}): {got!r} != {expected!r}")
    return problems


@dataclass
class RoundTrip:
    gguf: Path
    outtype: str
    identical: int = 0  # greedy answers identical to the merged model's
    total: int = 0
    token_agreement: float = 0.0  # share of answer positions where both pick the same next token
    mean_kl: float = 0.0  # KL(merged || gguf) of the next-token distributions, averaged over answer positions
    answers: list[tuple[str, str]] = field(default_factory=list)  # (merged, gguf) greedy answers

    @property
    def tolerance(self) -> float:
        return KL_TOLERANCE.get(self.outtype, 0.05)

    @property
    def passed(self) -> bool:
        exact = self.outtype not in EXACT_TYPES or self.identical == self.total
        return exact and self.mean_kl <= self.tolerance


def gguf_type(path: Path) -> str:
    return next((t for t in KL_TOLERANCE if path.stem.lower().endswith(t)), "unknown")


def compare_gguf(gguf_path: Path, hf_dir: Path, prompts: list[str] | None = None,
                 max_new_tokens: int = 16) -> RoundTrip:
    """Reload `gguf_path` with transformers (gguf_file=) and compare it with the merged HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if prompts is None:
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                   for c in SAMPLE_CONVERSATIONS]
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=reference.generation_config.eos_token_id)
    result = RoundTrip(gguf_path, gguf_type(gguf_path))
    agree, kl = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            ref_out, got_out = (m.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
                                for m in (reference, reloaded))
            # both models read the merged model's answer: compare their next-token distributions position by position
            ref_logp, got_logp = (m(ref_out).logits[0, ids.shape[1] - 1:-1].float().log_softmax(-1)
                                  for m in (reference, reloaded))
        agree += (ref_logp.argmax(-1) == got_logp.argmax(-1)).tolist()
        kl += (ref_logp.exp() * (ref_logp - got_logp)).sum(-1).tolist()
        texts = [tokenizer.decode(o[0, ids.shape[1]:], skip_special_tokens=True) for o in (ref_out, got_out)]
        result.identical += texts[0] == texts[1]
        result.total += 1
        result.answers.append((texts[0], texts[1]))
    result.token_agreement = sum(agree) / max(len(agree), 1)
    result.mean_kl = sum(kl) / max(len(kl), 1)
    return result
