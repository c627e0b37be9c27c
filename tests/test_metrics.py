"""Text metrics against values computed by hand (worked out in the comments) on English and Chinese pairs."""

from __future__ import annotations

import math

import pytest

from tunelab.errors import DataError, TunelabError
from tunelab.evaluation import metrics as M


def test_bleu_english_hand_computed():
    # hyp: the cat is on the mat / ref: the cat sat on the mat (6 tokens each, brevity penalty 1)
    # p1 = 5/6 (the x2, cat, on, mat), p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat),
    # p4 = 0/3 -> method 3: 1 / (2^1 * 3) = 1/6.  BLEU = (5/6 * 3/5 * 1/4 * 1/6)^(1/4) = 48^(-1/4)
    assert M.bleu4("the cat is on the mat", "the cat sat on the mat") == pytest.approx(100 * 48 ** -0.25)
    assert 100 * 48 ** -0.25 == pytest.approx(37.9918, abs=1e-4)


def test_bleu_brevity_penalty_and_method3_increments():
    # 4 of 6 tokens, every n-gram matches: BP = exp(1 - 6/4)
    assert M.bleu4("the cat sat on", "the cat sat on the mat") == pytest.approx(100 * math.exp(-0.5))
    # p1 = 4/4; p2, p3, p4 all zero -> 1/(2*3), 1/(4*2), 1/(8*1): (1/384)^(1/4)
    assert M.bleu4("a c b d", "a b c d") == pytest.approx(100 * 384 ** -0.25)
    assert M.bleu4("x y z", "u v w") == 0.0  # no unigram match at all
    assert M.bleu4("", "reference") == 0.0


def test_bleu_identical_short_texts_keep_method3_quirk():
    # 3 tokens: p4 has no 4-gram -> 1/(2*1); LLaMA-Factory (nltk method3) reports the same 84.09, not 100
    assert M.bleu4("c b a", "c b a") == pytest.approx(100 * 0.5 ** 0.25)


def test_bleu_chinese_is_character_level():
    # chars: 今 天 天 气 不 错 vs 今 天 天 气 很 好: p1 = 4/6, p2 = 3/5 (今天 天天 天气), p3 = 2/4, p4 = 1/3
    # BLEU = (4/6 * 3/5 * 2/4 * 1/3)^(1/4) = 15^(-1/4) = 50.81
    assert M.bleu4("今天天气不错", "今天天气很好") == pytest.approx(100 * 15 ** -0.25)
    assert M.bleu_tokens("今天天气很好，去散步。") == list("今天天气很好，去散步。")


def test_bleu_tokens_english_and_mixed():
    assert M.bleu_tokens("The cat, isn't it? 3.5 dollars.") == ["The", "cat", ",", "isn't", "it", "?", "3.5",
                                                                "dollars", "."]
    assert M.bleu_tokens("2023年的GPT-4模型") == ["2023", "年", "的", "GPT-4", "模", "型"]


def test_bleu_matches_nltk_on_same_tokens():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    pred, ref = "我们明天去北京看长城。", "明天我们一起去北京爬长城。"
    expected = sentence_bleu([list(ref)], list(pred), smoothing_function=SmoothingFunction().method3)
    assert M.bleu4(pred, ref) == pytest.approx(100 * expected)  # same as LLaMA-Factory on Chinese without spaces


def test_rouge_english_hand_computed():
    # unigrams: 5 shared of 6/6 -> F 5/6; bigrams 3 of 5/5 -> F 3/5; LCS "the cat on the mat" = 5 -> F 5/6
    scores = M.rouge("The cat, is on the mat", "the cat sat on the mat.")
    assert scores == pytest.approx({"rouge-1": 500 / 6, "rouge-2": 60.0, "rouge-l": 500 / 6})


def test_rouge_english_equals_rouge_score_default():
    from rouge_score.rouge_scorer import RougeScorer

    pred, ref = "A quick brown fox jumps over the lazy dog!", "The quick brown dog jumped over a lazy fox."
    theirs = RougeScorer(["rouge1", "rouge2", "rougeL"]).score(ref, pred)
    ours = M.rouge(pred, ref)
    assert ours["rouge-1"] == pytest.approx(100 * theirs["rouge1"].fmeasure)
    assert ours["rouge-2"] == pytest.approx(100 * theirs["rouge2"].fmeasure)
    assert ours["rouge-l"] == pytest.approx(100 * theirs["rougeL"].fmeasure)


def test_rouge_chinese_uses_jieba_words():
    assert M.rouge_tokens("今天天气很好") == ["今天天气", "很", "好"]
    assert M.rouge_tokens("今天天气不错") == ["今天天气", "不错"]
    # 1 shared word of 2 (pred) and 3 (ref): P 1/2, R 1/3, F = 2PR/(P+R) = 0.4; no shared bigram; LCS 1 -> 0.4
    assert M.rouge("今天天气不错", "今天天气很好") == pytest.approx({"rouge-1": 40.0, "rouge-2": 0.0, "rouge-l": 40.0})


def test_rouge_tokens_mixed_text_drop_punctuation():
    assert M.rouge_tokens("Hello, World! 你好世界。") == ["hello", "world", "你好", "世界"]
    assert M.rouge_tokens("Ünïcode café") == ["ünïcode", "café"]  # not dropped as rouge-score's ASCII filter would


def test_exact_match_normalization():
    assert M.exact_match("  Paris\n", "Paris") == 1.0
    assert M.exact_match("paris", "Paris") == 0.0  # case matters
    assert M.exact_match("ＡＢＣ  1", "ABC 1") == 1.0  # NFKC folds full-width forms
    assert M.exact_match("北京。", "北京") == 0.0


def test_checks_contains_and_regex():
    contains, regex = M.make_checks([{"kind": "contains", "pattern": "巴黎"}, {"kind": "regex", "pattern": r"^\d+$"}])
    assert contains.name == "contains:巴黎" and contains("首都是巴黎。") == 1.0 and contains("Paris") == 0.0
    assert regex("42") == 1.0 and regex("42 apples") == 0.0
    with pytest.raises(TunelabError, match="invalid regular expression"):
        M.make_checks([{"kind": "regex", "pattern": "("}])


def test_score_and_aggregate():
    checks = M.make_checks([{"kind": "contains", "pattern": "mat"}])
    per = M.score_predictions(["the cat sat on the mat", "dog"], ["the cat sat on the mat", "the cat"],
                              ["loss", "bleu", "rouge", "exact_match"], checks)
    assert per[0]["exact_match"] == 1.0 and per[0]["bleu-4"] == pytest.approx(100.0)
    assert per[1] == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "exact_match": 0.0,
                      "contains:mat": 0.0}
    agg = M.aggregate(per)
    assert agg["exact_match"] == 0.5 and agg["bleu-4"] == pytest.approx(50.0) and agg["contains:mat"] == 0.5
    assert "loss" not in agg


def test_empty_reference_names_the_example():
    with pytest.raises(DataError, match=r"eval\.jsonl:2: the reference answer is empty"):
        M.score_predictions(["a", "b"], ["x", "  "], ["bleu"], sources=["eval.jsonl:1", "eval.jsonl:2"])


def test_unknown_metric_lists_known_ones():
    with pytest.raises(TunelabError, match="unknown metric.*bleuu.*known: loss, perplexity, bleu"):
        M.score_predictions(["a"], ["a"], ["bleuu"])


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        M.register_metric("bleu", lambda p, r: {})


def test_documented_known_pairs():
    """The pairs in docs/metrics.md, so the documented numbers cannot drift from the code."""
    pred, ref = "A quick brown fox jumped over the lazy dog.", "The quick brown fox jumps over the lazy dog."
    # 13a tokens: 1-4-gram matches 8/10, 6/9, 4/8, 2/7, brevity penalty 1
    assert M.bleu4(pred, ref) == pytest.approx(100 * (8 / 10 * 6 / 9 * 4 / 8 * 2 / 7) ** 0.25)
    assert round(M.bleu4(pred, ref), 2) == 52.54
    assert M.rouge(pred, ref) == pytest.approx({"rouge-1": 700 / 9, "rouge-2": 62.5, "rouge-l": 700 / 9})

    pred, ref = "今天天气不错，我们一起去公园散步。", "今天天气很好，我们去公园散步吧。"
    assert round(M.bleu4(pred, ref), 2) == 43.82
    assert M.rouge(pred, ref) == pytest.approx({"rouge-1": 200 / 3, "rouge-2": 400 / 13, "rouge-l": 200 / 3})


def test_bleu_agrees_with_sacrebleu_exp_smoothing():
    import sacrebleu

    for pred, ref, tok in [("A quick brown fox jumped over the lazy dog.", "The quick brown fox jumps.", "13a"),
                           ("今天天气不错，我们一起去公园散步。", "今天天气很好，我们去公园散步吧。", "zh")]:
        theirs = sacrebleu.sentence_bleu(pred, [ref], tokenize=tok, smooth_method="exp").score
        assert M.bleu4(pred, ref) == pytest.approx(theirs)


# ------------------------------------------------------------------- BLEU against sacrebleu (independent reference)
# (prediction, reference): English with numbers and punctuation at the ends, Chinese with full-width punctuation,
# mixed text, and empty strings
SACREBLEU_PAIRS = [
    ("The answer is 42.", "The answer is 42."),
    ("I think the answer is 42.", "The answer is 42."),
    ("It costs $3.50, not 4.", "It costs 3.50 dollars, not 4!"),
    ("Version 2.0 (beta) ships in 2024-05.", "Version 2.0 ships in May 2024."),
    ("\"Hello,\" she said: 'world'.", "\"Hello\", she said, 'world'!"),
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("今天天气不错，我们一起去公园散步。", "今天天气很好，我们去公园散步吧。"),
    ("答案是42。", "答案是 42。"),
    ("我用GPT-4写了3.5页（草稿）！", "我用 GPT-4 写了 3.5 页草稿。"),
    ("北京，上海；广州？", "北京、上海；广州。"),
    ("The answer is 42.", "答案是42。"),
    ("", "The answer is 42."),
    ("The answer is 42.", ""),
    ("", ""),
]


def _sacrebleu_tokenize(reference: str) -> str:
    return "zh" if M.has_chinese(reference) else "13a"


def test_bleu_tokens_are_sacrebleu_13a_for_english():
    assert M.bleu_tokens("The answer is 42.") == ["The", "answer", "is", "42", "."]  # zh would keep "42." whole
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    for pred, ref in SACREBLEU_PAIRS:
        for text in (pred, ref):
            expected = (TokenizerZh() if M.has_chinese(text) else Tokenizer13a())(text).split()
            assert M.bleu_tokens(text) == expected, text


@pytest.mark.parametrize("pred,ref", SACREBLEU_PAIRS)
def test_bleu_equals_sacrebleu_sentence_bleu(pred, ref):
    import sacrebleu

    chinese = M.has_chinese(ref)
    hyp_tokens, ref_tokens = M.bleu_tokens(pred, chinese), M.bleu_tokens(ref, chinese)
    unigram_match = bool(set(hyp_tokens) & set(ref_tokens))
    expected = sacrebleu.sentence_bleu(pred, [ref], tokenize=_sacrebleu_tokenize(ref), smooth_method="exp").score
    if len(hyp_tokens) >= 4 and unigram_match:  # where nltk's method 3 and sacrebleu's exp smoothing coincide
        assert M.bleu4(pred, ref) == pytest.approx(expected, abs=1e-9)
    elif not unigram_match:  # no shared token: 0 for us (nltk); sacrebleu smooths it to a small number
        assert M.bleu4(pred, ref) == 0.0 and expected < 5


def test_bleu_tokens_reproduce_sacrebleu_corpus_bleu():
    """Corpus BLEU over our tokens (tokenize="none") equals sacrebleu's corpus BLEU with its own tokenizer."""
    import sacrebleu

    for chinese in (False, True):
        pairs = [(p, r) for p, r in SACREBLEU_PAIRS if M.has_chinese(r) == chinese]
        preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
        ours = sacrebleu.corpus_bleu([" ".join(M.bleu_tokens(p, chinese)) for p in preds],
                                     [[" ".join(M.bleu_tokens(r, chinese)) for r in refs]], tokenize="none")
        theirs = sacrebleu.corpus_bleu(preds, [refs], tokenize="zh" if chinese else "13a")
        assert ours.score == pytest.approx(theirs.score, abs=1e-9)
        assert (ours.sys_len, ours.ref_len, ours.counts) == (theirs.sys_len, theirs.ref_len, theirs.counts)


def test_bleu_reply_ending_with_number_scores_as_sacrebleu():
    # the case: a reply ending with a number scored 21.20 (zh tokens) where sacrebleu gives 29.50-like
    import sacrebleu

    pred, ref = "So the final answer is 42.", "The final answer is 42."
    assert M.bleu4(pred, ref) == pytest.approx(sacrebleu.sentence_bleu(pred, [ref]).score)
