"""`tunelab chat`: one-shot, piped stdin (multi-turn, /clear, /exit) and a real pseudo-terminal session."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from tunelab.cli.main import main
from tunelab.inference.chat import ChatSession
from tunelab.inference.engine import GenerationParams
from tunelab.inference.hf import load_engine

REPO = Path(__file__).parents[1]


def expected_answers(folder: Path, turns: list[str], max_new_tokens: int = 8) -> list[str]:
    session = ChatSession(load_engine(str(folder)), params=GenerationParams(max_new_tokens=max_new_tokens))
    return [session.ask(t).text for t in turns]


def test_one_shot_prompt(tiny_models, capsys):
    folder = tiny_models["qwen2"]
    assert main(["chat", str(folder), "-p", "你好", "--max-new-tokens", "8", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected_answers(folder, ["你好"])[0] + "\n"
    assert "tokens/s" in captured.err


def test_prompt_from_stdin(tiny_models, capsys, monkeypatch):
    folder = tiny_models["qwen2"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+2?\n"))
    assert main(["chat", str(folder), "-p", "-", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected_answers(folder, ["What is 2+2?"])[0] + "\n"


def test_piped_turns_keep_history_until_clear(tiny_models, capsys, monkeypatch):
    folder = tiny_models["llama"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAnd then?\n/clear\nAnd then?\n/exit\nnever asked\n"))
    assert main(["chat", str(folder), "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first, second = expected_answers(folder, ["Hello", "And then?"])
    fresh = expected_answers(folder, ["And then?"])[0]
    assert lines == [first, second, fresh]
    assert second != fresh  # the second turn really saw the first (multi-turn memory)


def test_system_prompt_is_rendered(tiny_models):
    engine = load_engine(str(tiny_models["llama"]))
    session = ChatSession(engine, system="Answer in French.")
    prompt = session.prompt("hi")
    assert "Answer in French." in prompt and prompt.index("Answer in French.") < prompt.index("hi")


def test_history_is_trimmed_to_fit_the_context(tiny_models):
    engine = load_engine(str(tiny_models["llama"]))
    session = ChatSession(engine, params=GenerationParams(max_new_tokens=engine.max_context - 60))
    session.history = [{"role": "user", "content": "word " * 20}, {"role": "assistant", "content": "ok " * 20}] * 3
    prompt = session.prompt("last question")
    assert engine.count_tokens(prompt) <= 60 and "last question" in prompt and len(session.history) < 6


class Terminal:
    """A child process on a pseudo-terminal, read until an expected text appears (a tiny pexpect)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.buffer = ""

    def expect(self, text: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.buffer:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; got {self.buffer[-2000:]!r}")
            try:
                chunk = os.read(self.master, 4096).decode("utf-8", errors="replace")
            except OSError:  # the child closed the terminal
                chunk = ""
            if not chunk:
                raise AssertionError(f"process ended before {text!r}; got {self.buffer[-2000:]!r}")
            self.buffer += chunk
        before, _, self.buffer = self.buffer.partition(text)
        return before

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_interactive_session_in_a_pseudo_terminal(tiny_models):
    folder = tiny_models["llama"]
    first, second = expected_answers(folder, ["Hello", "你好吗"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO / "src")}
    term = Terminal([sys.executable, "-m", "tunelab.cli.main", "chat", str(folder), "--max-new-tokens", "8"], env)
    term.expect("/exit")  # the banner lists the commands
    term.expect("user> ")
    term.send("Hello")
    term.expect("assistant> ")
    assert term.expect("user> ").replace("\r\n", "\n").strip("\n") == first.strip("\n")
    term.send("你好吗")
    term.expect("assistant> ")
    assert term.expect("user> ").replace("\r\n", "\n").strip("\n") == second.strip("\n")
    term.send("/clear")
    term.expect("(conversation cleared)")
    term.send("/exit")
    assert term.close() == 0
