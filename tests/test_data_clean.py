"""Cleaning keeps what users wrote: by default only a message's outer whitespace is trimmed; the opt-in whitespace
rule rewrites prose only, never fenced code or indented lines."""

from __future__ import annotations

from tunelab.config.schema import CleanConfig
from tunelab.data.clean import clean_conversations, normalize_whitespace
from tunelab.data.types import Conversation, Message

CODE = "Here is the table:\n\n```python\nrows = [\n    (1,    'one'),   # aligned\n    (22,   'two'),\n]\n\n\n\nprint(rows)  \n```\n"
LIST = "Steps:\n\n1.  Open the file.\n2.  Read it.\n\n\n3.  Close  it.  "
POEM = "Roses  are red,\n    violets   are blue."


def conv(reply: str, prompt: str = "Show me.") -> Conversation:
    return Conversation([Message("user", prompt), Message("assistant", reply)])


def test_default_trims_only_the_outer_whitespace():
    convs = [conv(CODE), conv(LIST), conv(POEM, "  padded prompt \n"), conv("plain")]
    kept, report = clean_conversations(convs, CleanConfig(dedup=False))
    assert [c.messages[1].content for c in kept] == [CODE.strip(), LIST.strip(), POEM, "plain"]
    assert kept[2].messages[0].content == "padded prompt"
    assert report["trim (changed)"] == 3 and "normalize_whitespace (changed)" not in report


def test_trim_off_changes_nothing_and_documents_are_untouched():
    doc = Conversation([], text="  a document  \n")
    kept, _ = clean_conversations([conv("  x  "), doc], CleanConfig(trim=False, dedup=False))
    assert kept[0].messages[1].content == "  x  " and kept[1].text == "  a document  \n"
    kept, _ = clean_conversations([doc], CleanConfig(dedup=False))
    assert kept[0].text == "  a document  \n"


def test_opt_in_normalization_keeps_fenced_code_and_indented_lines():
    fenced = CODE[CODE.index("```"):].rstrip("\n")
    out = normalize_whitespace("Look  at   this:  \n\n\n\n" + CODE)
    assert out.startswith("Look at this:\n\nHere is the table:\n\n```") and out.endswith(fenced)
    assert normalize_whitespace(POEM) == "Roses are red,\n    violets   are blue."
    assert normalize_whitespace("~~~\na    b\n~~~\nx  y") == "~~~\na    b\n~~~\nx y"
    assert normalize_whitespace("```\nunclosed    fence\n\n\n\n  end") == "```\nunclosed    fence\n\n\n\n  end"
    kept, report = clean_conversations([conv(LIST)], CleanConfig(normalize_whitespace=True))
    assert kept[0].messages[1].content == "Steps:\n\n1. Open the file.\n2. Read it.\n\n3. Close it."
    assert report == {"normalize_whitespace (changed)": 1, "drop_empty": 0, "dedup": 0}
