"""Opt-in: exported GGUFs run in a real llama.cpp runtime (`make test-llamacpp`; skipped unless
TUNELAB_TEST_LLAMACPP=1). The runtime is llama-cpp-python 0.3.36's own ctypes binding over the llama.cpp libraries
`make llama-cpp` compiled from the same sdist (llamacpp_build.build_python_runtime: one compile, not two).

A zero-LoRA run on the embedded SmolLM2-135M-Instruct with the demo's data (so the k-quants get an importance matrix
from its training text) is exported to every type in TUNELAB_LLAMACPP_TYPES (default f16,q8_0,q4_0,q4_k_m,q5_k_m,
q6_k), then each GGUF is checked against the merged transformers model (fp32):
- f16: the first 16 greedy tokens are identical on every prompt;
- every type: next-token agreement with transformers along its greedy answers (teacher-forced), perplexity on the
  run's held-out examples in llama.cpp next to the transformers one (same tokens), decode tokens/s;
- the binding's chat completion renders the GGUF's template exactly as training rendered it, and answers with the
  same tokens as the hand-rendered prompt.
The table is printed and written to TUNELAB_LLAMACPP_REPORT (default <tmp>/llamacpp_report.md);
TUNELAB_LLAMACPP_EXPORT_TABLE=1 adds the export's own table (GGUFs scored in transformers, ~30 s more per file).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("TUNELAB_TEST_LLAMACPP") != "1":
    pytest.skip("opt-in llama.cpp runtime check: run `make test-llamacpp` (TUNELAB_TEST_LLAMACPP=1)",
                allow_module_level=True)

from tunelab.config.schema import ExportConfig
from tunelab.export.llamacpp_build import python_runtime

TYPES = os.environ.get("TUNELAB_LLAMACPP_TYPES", "f16,q8_0,q4_0,q4_k_m,q5_k_m,q6_k").split(",")
PROMPTS = ["What is the capital of France? Answer in one sentence.", "Who are you?",
           "Reverse the order of these words: apple river stone", "Write two sentences about the sea."]
N_TOKENS = 16
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llama_cpp():
    runtime = python_runtime()
    if not (runtime / ".complete").is_file():
        pytest.fail(f"no llama.cpp Python runtime in {runtime}: run `make test-llamacpp` (builds it once)")
    sys.path.insert(0, str(runtime))
    import llama_cpp

    return llama_cpp


def _bench_export_table():
    spec = importlib.util.spec_from_file_location("bench_export_table", REPO / "bench" / "export_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A zero-LoRA run on SmolLM2 with the demo's data, exported to TYPES (with the export table)."""
    from tunelab.export.pipeline import export_model

    root = tmp_path_factory.mktemp("llamacpp")
    run = _bench_export_table().zero_lora_run(root)  # the same run bench/export_table.py measures
    start = time.perf_counter()
    table = os.environ.get("TUNELAB_LLAMACPP_EXPORT_TABLE") == "1"  # transformers' table too (~30 s per GGUF)
    result = export_model(str(run), ExportConfig(gguf=TYPES, table=table), out=root / "export")
    result.seconds = time.perf_counter() - start
    return result


@pytest.fixture(scope="module")
def reference(export):
    """The merged model in transformers (fp32), its tokenizer, template and held-out conversations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.export.table import held_out_conversations
    from tunelab.inference.template import load_template
    from tunelab.runs.artifacts import resolve_artifact

    tokenizer = AutoTokenizer.from_pretrained(export.out_dir)
    template = load_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(export.out_dir, dtype=torch.float32).eval()
    art = resolve_artifact(export.source, None, device="cpu")
    held_out, label = held_out_conversations(art, template, tokenizer)
    return {"model": model, "tokenizer": tokenizer, "template": template, "held_out": held_out, "label": label}


# ------------------------------------------------------------------------------ helpers: two runtimes
def prompt_ids(ref, question: str) -> list[int]:
    text = ref["template"].render([{"role": "user", "content": question}], add_generation_prompt=True)
    return ref["tokenizer"](text, add_special_tokens=False)["input_ids"]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out, past, step = [], None, torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            result = model(step, past_key_values=past, use_cache=True)
            past, token = result.past_key_values, int(result.logits[0, -1].argmax())
            out.append(token)
            step = torch.tensor([[token]])
    return out


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def nll_sum(logits: np.ndarray, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] given the logits of positions 0..n-2."""
    shifted = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def held_out_ids(ref) -> list[list[int]]:
    texts = [ref["template"].render(c.to_template_messages()) for c in ref["held_out"]]
    return [ref["tokenizer"](t, add_special_tokens=False)["input_ids"] for t in texts]


def hf_perplexity(ref) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in held_out_ids(ref):
            logits = ref["model"](torch.tensor([ids])).logits[0].double().numpy()
            total, count = total + nll_sum(logits, ids), count + len(ids) - 1
    return math.exp(total / count)


def llama_perplexity(llm, ref) -> float:
    total, count = 0.0, 0
    for ids in held_out_ids(ref):
        total, count = total + nll_sum(llama_logits(llm, ids), ids), count + len(ids) - 1
    return math.exp(total / count)


def llama_tokens_per_s(llm, ids: list[int], n: int = 64) -> float:
    llm.reset()
    start = None
    for count, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):  # the binding's sampler, greedy
        if count == 0:
            start = time.perf_counter()  # after the prompt and the first token
        if count == n:
            break
    return n / (time.perf_counter() - start)


def load_gguf(llama_cpp, path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=2048, logits_all=True, n_threads=2, verbose=False,
                           seed=0)


# ------------------------------------------------------------------------------ the checks
def test_f16_gives_the_first_16_greedy_tokens_of_transformers(llama_cpp, export, reference):
    if "f16" not in export.gguf:
        pytest.skip("f16 not in TUNELAB_LLAMACPP_TYPES")
    llm = load_gguf(llama_cpp, export.gguf["f16"])
    for question in PROMPTS:
        ids = prompt_ids(reference, question)
        expected = hf_greedy(reference["model"], ids, N_TOKENS)
        got = llama_greedy(llm, ids, N_TOKENS)
        assert got == expected, (f"{question!r}: llama.cpp {reference['tokenizer'].decode(got)!r} != "
                                 f"transformers {reference['tokenizer'].decode(expected)!r}")


def test_chat_completion_renders_the_training_template(llama_cpp, export, reference):
    from llama_cpp import llama_chat_format

    path = export.gguf.get("f16") or next(iter(export.gguf.values()))
    llm = load_gguf(llama_cpp, path)
    template = reference["template"]
    assert llm.metadata["tokenizer.chat_template"] == template.jinja
    # the formatter the binding builds from the GGUF (Llama.__init__: metadata template, eos/bos token texts)
    special = {"eos_token": llm._model.token_get_text(llm.token_eos()),
               "bos_token": llm._model.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else ""}
    for question in PROMPTS[:2]:
        messages = [{"role": "user", "content": question}]
        formatter = llama_chat_format.Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], **special)
        assert formatter(messages=messages).prompt == template.render(messages, add_generation_prompt=True)
        answer = llm.create_chat_completion(messages, max_tokens=N_TOKENS, temperature=0.0, top_k=1)
        expected = llama_greedy(llm, prompt_ids(reference, question), N_TOKENS)
        if llm.token_eos() in expected:
            expected = expected[: expected.index(llm.token_eos())]
        text = answer["choices"][0]["message"]["content"]
        assert text == llm.detokenize(expected).decode("utf-8", errors="ignore")


def test_every_type_agreement_perplexity_and_speed_table(llama_cpp, export, reference):
    """The report table: agreement must stay high for 8-bit and above, every file must load and answer."""
    tokenizer = reference["tokenizer"]
    answers = {q: hf_greedy(reference["model"], prompt_ids(reference, q), N_TOKENS) for q in PROMPTS}
    hf_ppl = hf_perplexity(reference)
    rows, f16_ppl = [], None
    for kind, path in export.gguf.items():
        llm = load_gguf(llama_cpp, path)
        agree = total = identical = 0
        for question, answer in answers.items():
            ids = prompt_ids(reference, question)
            logits = llama_logits(llm, ids + answer)
            predicted = logits[len(ids) - 1: len(ids) - 1 + len(answer)].argmax(axis=1)
            agree += int((predicted == np.array(answer)).sum())
            total += len(answer)
            identical += llama_greedy(llm, ids, N_TOKENS) == answer
        ppl = llama_perplexity(llm, reference)
        f16_ppl = ppl if kind == "f16" else f16_ppl
        speed = llama_tokens_per_s(llm, prompt_ids(reference, PROMPTS[-1]))
        rows.append((kind, path.stat().st_size, ppl, agree / total, identical, speed))
        del llm
    table = _format(rows, hf_ppl, f16_ppl, export, reference["label"])
    report = Path(os.environ.get("TUNELAB_LLAMACPP_REPORT", export.out_dir.parent / "llamacpp_report.md"))
    report.write_text(table + "\n", encoding="utf-8")
    print("\n" + table + f"\n(written to {report})")
    for kind, _, ppl, agreement, _, _ in rows:
        assert math.isfinite(ppl) and ppl < 10 * hf_ppl, f"{kind}: perplexity {ppl:.2f} vs transformers {hf_ppl:.2f}"
        if kind in ("f16", "q8_0"):
            assert agreement >= 0.9, f"{kind}: only {agreement:.0%} of next tokens agree with transformers"
    assert tokenizer is not None


def _format(rows, hf_ppl: float, f16_ppl: float | None, export, label: str) -> str:
    header = ("| GGUF | size | perplexity (llama.cpp) | vs transformers | next-token agreement | identical 16-token "
              "answers | tokens/s (llama.cpp) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for kind, size, ppl, agreement, identical, speed in rows:
        lines.append(f"| {kind} | {size / 1e6:.1f} MB | {ppl:.3f} | {ppl - hf_ppl:+.3f} | {agreement:.0%} | "
                     f"{identical}/{len(PROMPTS)} | {speed:.1f} |")
    scored = f"merged model in transformers (fp32): perplexity {hf_ppl:.3f} on the same tokens; {label}, every " \
             "token of each rendered conversation"
    notes = [scored, f"export of {', '.join(export.gguf)} took {export.seconds:.0f} s"]
    if export.imatrix is not None:
        notes.append(export.imatrix.describe())
    if f16_ppl is not None:
        notes.append(f"f16 perplexity in llama.cpp: {f16_ppl:.3f}")
    tables = f"\n\nexport table (transformers):\n{export.table_text}" if export.table_text else ""
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + tables
