"""The web UI in a real headless browser: one real server on a free loopback port, driven with Playwright.

Chromium comes from Debian (`apt-get install -y chromium`; browser downloads are impossible here); the tests
skip with that instruction when /usr/bin/chromium is absent. Screenshots of every tab go to $TUNELAB_SCREENSHOTS
(default: a temporary folder) for the README.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
REPO = Path(__file__).parents[1]
TIMEOUT_MS = 120_000  # a training run on 2 shared cores, including its interpreter start

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium: apt-get install -y chromium")

DEMO = REPO / "examples" / "demo" / "data"


def demo_dataset_dir(tmp: Path) -> Path:
    """The bundled demo data folder (examples/demo/data); a minimal stand-in with the same registered names when a
    checkout lacks it, so the UI tests never depend on another part's files being present."""
    if (DEMO / "dataset_info.json").is_file():
        return DEMO
    rows = {"reverse_en_train": [("Reverse the order of these words: red green blue", "blue green red"),
                                 ("Reverse the order of these words: sun moon star", "star moon sun")],
            "reverse_zh_train": [("把这些词倒过来排列：桃子 橙子 小猫", "小猫 橙子 桃子"),
                                 ("把这些词倒过来排列：春 夏 秋", "秋 夏 春")]}
    folder = tmp / "demo-data"
    folder.mkdir()
    for name, pairs in rows.items():
        lines = [json.dumps({"instruction": q, "output": a}, ensure_ascii=False) for q, a in pairs * 3]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    registry = {name: {"file_name": f"{name}.jsonl"} for name in rows}
    (folder / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("TUNELAB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    from tunelab.webui.app import create_ui, launch_ui

    root = tmp_path_factory.mktemp("webui")
    data = demo_dataset_dir(root)
    demo = create_ui(runs_dir=root / "runs", default_model=str(tiny_models["llama"]), dataset_dir=data)
    port = free_port()
    launch_ui(demo, host="127.0.0.1", port=port, block=False, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "ui": demo.tunelab, "root": root, "data": data}
    demo.tunelab.runner.shutdown()
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(server["url"], wait_until="load")
    page.wait_for_selector("#tl-lang")
    yield page
    page.close()


# ------------------------------------------------------------------------------------------------ helpers
def field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("input:not([type=checkbox]), textarea").first


def fill(page, elem_id: str, value) -> None:
    box = field(page, elem_id)
    box.fill(str(value))
    box.dispatch_event("blur")


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def shot(page, shots: Path, name: str) -> None:
    page.wait_for_timeout(300)  # let plots finish drawing
    page.screenshot(path=str(shots / f"webui-{name}.png"), full_page=True)


def wait_text(page, selector: str, needle: str, timeout: int = TIMEOUT_MS) -> str:
    """Wait until `selector` shows `needle`; on timeout, fail with what the page's status boxes say instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("([sel, needle]) => (document.querySelector(sel)?.innerText || '').includes(needle)",
                               arg=[selector, needle], timeout=timeout)
    except PlaywrightTimeout:
        shown = [t for t in page.locator(".tl-msg").all_inner_texts() if t.strip()]
        raise AssertionError(f"{selector} never showed {needle!r}; messages on the page: {shown}") from None
    return page.locator(selector).inner_text()


def wait_run(page, timeout: int = TIMEOUT_MS) -> str:
    """Wait until the Train tab's run leaves running/stopping; returns its final status."""
    page.wait_for_function(
        "() => ['finished', 'failed', 'stopped'].includes("
        "document.querySelector('#train-progress .tl-status')?.dataset.status)", timeout=timeout)
    return page.locator("#train-progress .tl-status").get_attribute("data-status")


def no_traceback(page) -> None:
    assert "Traceback" not in page.content()


# --------------------------------------------------------------------------------------------------- tests
def test_page_loads_and_switches_language(page, shots):
    for name in ("Data", "Train", "Evaluate", "Chat", "Export"):
        assert page.get_by_role("tab", name=name).is_visible()
    page.locator("#tl-lang").get_by_text("中文").click()
    page.get_by_role("tab", name="训练").wait_for()
    assert page.get_by_role("tab", name="数据").is_visible()
    assert page.get_by_role("button", name="处理并预览").is_visible()
    page.locator("#tl-lang").get_by_text("English").click()
    page.get_by_role("tab", name="Train").wait_for()


def choose(page, elem_id: str, value: str) -> None:
    """Pick `value` in a gradio dropdown (type it, then take the matching option)."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).click()


def test_data_tab_previews_the_bundled_data(page, server, shots):
    tab(page, "Data")
    assert field(page, "data-dataset-dir").input_value() == str(server["data"])
    choose(page, "data-name", "reverse_zh_train")
    page.get_by_role("button", name="Prepare and preview").click()
    summary = wait_text(page, "#data-summary", "records read")
    assert "reverse_zh_train" in summary and "rejected" in summary
    page.wait_for_selector("#data-examples .tl-trained")  # trained spans highlighted
    assert "把这些词倒过来排列" in page.locator("#data-examples .tl-context").first.inner_text()
    assert any("\u4e00" <= ch <= "\u9fff" for ch in page.locator("#data-examples .tl-trained").first.inner_text())
    page.wait_for_selector("#data-histogram svg .tl-hist-bar")  # drawn in the page, so its captions translate
    assert "tokens per example" in page.locator("#data-histogram").inner_text()
    shot(page, shots, "data")
    no_traceback(page)
    page.get_by_role("button", name="Use in the Train form").click()
    wait_text(page, "#data-status", "now uses this data")
    tab(page, "Train")
    assert "name: reverse_zh_train" in field(page, "cfg-data-datasets").input_value()


def test_chinese_mode_translates_the_data_summary_and_histogram(page, server, shots):
    tab(page, "Data")
    page.locator("#tl-lang").get_by_text("中文").click()
    page.get_by_role("tab", name="训练").wait_for()
    choose(page, "data-name", "reverse_zh_train")
    page.get_by_role("button", name="处理并预览").click()
    summary = wait_text(page, "#data-summary", "读取记录数")
    assert "records read" not in summary and "项目" in summary  # a two-column table with translated headers
    assert "训练" in page.locator("#data-status").inner_text()
    histogram = page.locator("#data-histogram").inner_text()
    assert "每个样例的 token 数" in histogram and "cutoff_len" in histogram
    shot(page, shots, "data-zh")
    no_traceback(page)
    page.locator("#tl-lang").get_by_text("English").click()
    page.get_by_role("tab", name="Train").wait_for()


def test_an_upload_is_kept_under_the_runs_folder(page, server):
    upload = server["root"] / "uploaded.jsonl"
    upload.write_text('{"instruction": "Say hi", "output": "hi"}\n' * 4, encoding="utf-8")
    tab(page, "Data")
    page.locator("#data-upload input[type=file]").set_input_files(str(upload))
    wait_text(page, "#data-status", "SHA-256")
    kept = Path(field(page, "data-path").input_value())
    assert kept.name == "uploaded.jsonl" and kept.parent.parent == (server["root"] / "runs" / "_data").resolve()
    assert kept.read_bytes() == upload.read_bytes()
    fill(page, "data-path", "")


def test_bad_data_shows_a_readable_error(page, server):
    bad = server["root"] / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ok"}\n{"instruction": \n', encoding="utf-8")
    tab(page, "Data")
    fill(page, "data-path", bad)
    page.get_by_role("button", name="Prepare and preview").click()
    message = wait_text(page, "#data-status .tl-error", "bad.jsonl")
    assert "DataError" in message and ":2" in message  # the file and line of the broken record
    no_traceback(page)
    fill(page, "data-path", "")


def test_train_form_saves_and_loads_yaml(page, server):
    from tunelab.config import load_config

    tab(page, "Train")
    target = server["root"] / "saved.yaml"
    fill(page, "train-yaml-path", target)
    fill(page, "cfg-train-lr", "0.0005")
    page.get_by_role("button", name="Save as YAML").click()
    wait_text(page, "#train-status", "saved.yaml")
    cfg = load_config(target)
    assert cfg.train.lr == 5e-4 and cfg.model.name == server["ui"].default_model
    fill(page, "cfg-train-lr", "0.1")
    page.get_by_role("button", name="Load YAML").click()
    wait_text(page, "#train-status", "Loaded")
    page.wait_for_function("() => document.querySelector('#cfg-train-lr input').value === '0.0005'")


def test_letters_in_a_number_field_are_an_error_not_the_default(page, server):
    tab(page, "Train")
    box = field(page, "cfg-train-lr")
    box.fill("")
    box.press_sequentially("1e")  # what the browser cannot read as a number reaches the server as nothing
    box.dispatch_event("blur")
    page.get_by_role("button", name="Save as YAML").click()
    assert "train.lr: expected a number" in wait_text(page, "#train-status .tl-error", "train.lr")
    fill(page, "cfg-train-lr", "0.001")


def test_bad_config_is_refused_before_starting(page):
    tab(page, "Train")
    fill(page, "cfg-train-batch_size", "0")
    page.get_by_role("button", name="Start").click()
    message = wait_text(page, "#train-status .tl-error", "train.batch_size")
    assert "greater than or equal to 1" in message
    no_traceback(page)
    fill(page, "cfg-train-batch_size", "2")


def _set_short_run(page, name: str, steps: int) -> None:
    fill(page, "cfg-train-run_name", name)
    fill(page, "cfg-train-max_steps", steps)
    fill(page, "cfg-train-batch_size", 2)
    fill(page, "cfg-train-logging_steps", 1)
    fill(page, "cfg-train-save_steps", 2)
    fill(page, "cfg-train-report_to", "")
    fill(page, "cfg-train-lr", "0.001")


@pytest.fixture(scope="module")
def trained_run(page, server, shots) -> Path:
    """A tiny llama trained from the page for a few steps; the loss plot must appear."""
    tab(page, "Train")
    _set_short_run(page, "ui-run", 6)
    page.get_by_role("button", name="Start").click()
    wait_text(page, "#train-status", "Started")
    assert wait_run(page) == "finished", page.locator("#train-log textarea").input_value()[-3000:]
    page.wait_for_selector("#train-loss canvas, #train-loss svg")
    run_dir = server["root"] / "runs" / "ui-run"
    assert (run_dir / "final").is_dir()
    assert "6/6" in page.locator("#train-progress").inner_text()
    shot(page, shots, "train")
    return run_dir


def test_training_from_the_page_writes_a_run(trained_run, page):
    events = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in e for e in events)
    assert "training done" in page.locator("#train-log textarea").input_value()
    # starting the same run name again is refused up front (it holds checkpoints), with what to do instead
    page.get_by_role("button", name="Start").click()
    assert "--resume" in wait_text(page, "#train-status .tl-error", "already holds checkpoints")


def test_stop_ends_the_run(page, server, trained_run):
    tab(page, "Train")
    _set_short_run(page, "ui-stopped", 400)
    page.get_by_role("button", name="Start").click()
    wait_text(page, "#train-progress", "step 1", timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Stop").click()
    assert wait_run(page) == "stopped"
    run_json = json.loads((server["root"] / "runs" / "ui-stopped" / "run.json").read_text())
    assert run_json["status"] != "completed"


def test_chat_streams_an_answer_side_by_side(page, trained_run, shots):
    tab(page, "Chat")
    fill(page, "chat-model", trained_run)
    page.locator("#chat-side input[type=checkbox]").check()
    fill(page, "chat-max-new", 24)
    # count DOM changes of the tuned answer while it streams: a streamed answer arrives in several pieces
    page.evaluate("""() => { window.__mut = 0; new MutationObserver(() => window.__mut++).observe(
        document.querySelector('#chat-tuned'), {subtree: true, childList: true, characterData: true}); }""")
    fill(page, "chat-message", "Hello! 你好")
    page.get_by_role("button", name="Send", exact=True).click()
    wait_text(page, "#chat-status .tl-ok", "Done", timeout=TIMEOUT_MS)
    assert page.evaluate("window.__mut") > 2
    assert "你好" in page.locator("#chat-tuned").inner_text()
    assert page.locator("#chat-basebox").is_visible() and "你好" in page.locator("#chat-basebox").inner_text()
    shot(page, shots, "chat")
    no_traceback(page)


def test_evaluate_and_compare_runs(page, server, trained_run, shots):
    tab(page, "Evaluate")
    page.get_by_role("button", name="Refresh runs").click()
    page.wait_for_timeout(500)
    fill(page, "eval-model", trained_run)
    files = sorted(p for p in server["data"].glob("*.json*") if p.name != "dataset_info.json")
    fill(page, "eval-data", next((p for p in files if "test" in p.name), files[0]))
    fill(page, "eval-max-samples", 3)
    fill(page, "eval-max-new", 16)
    page.get_by_role("button", name="Evaluate", exact=True).click()
    wait_text(page, "#eval-status .tl-ok", "3 examples", timeout=TIMEOUT_MS)
    assert "perplexity" in page.locator("#eval-table").inner_text()
    assert page.locator("#eval-examples .tl-example").count() == 3
    other = trained_run.parent / "ui-run-b"  # a second run folder that differs in one setting
    shutil.copytree(trained_run, other, dirs_exist_ok=True)
    config = other / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8").replace("lr: 0.001", "lr: 0.002"), encoding="utf-8")
    compare = page.locator("#eval-compare-runs input")
    for run in (trained_run, other):
        compare.fill(str(run))
        compare.press("Enter")
    page.get_by_role("button", name="Compare runs").click()
    table = wait_text(page, "#eval-compare-out", "train.lr")
    assert "0.002" in table
    page.wait_for_selector("#eval-compare-plot img")
    shot(page, shots, "evaluate")
    no_traceback(page)


def converter_cached() -> bool:
    """GGUF needs llama.cpp's converter, fetched once from PyPI; without it the export is merge-only."""
    from tunelab.export.gguf import find_converter

    try:
        find_converter(fetch=False)
    except Exception:  # noqa: BLE001 - not cached: merge only
        return False
    return True


def test_export_merges_and_lists_sizes(page, trained_run, shots):
    tab(page, "Export")
    # the run appeared after the page loaded: its run list follows the runs folder without a reload or Refresh
    page.locator("#export-model input").click()
    page.get_by_role("option", name=str(trained_run), exact=True).wait_for(timeout=15_000)
    page.keyboard.press("Escape")
    fill(page, "export-model", trained_run)
    gguf = converter_cached()
    if gguf:
        page.locator("#export-gguf").get_by_text("f16", exact=True).click()
        page.locator("#export-ollama input[type=checkbox]").check()
    page.get_by_role("button", name="Export", exact=True).click()
    wait_text(page, "#export-status .tl-ok", "Done", timeout=TIMEOUT_MS)
    files = page.locator("#export-files").inner_text()
    assert "model.safetensors" in files and "MB" in files and str(trained_run / "export") in files
    assert "chat template: identical to training" in files
    assert (trained_run / "export" / "model.safetensors").is_file()
    if gguf:
        assert "-f16.gguf" in files and "Modelfile" in files
    shot(page, shots, "export")
    no_traceback(page)


def test_password_protects_the_page(browser, tiny_models, tmp_path):
    from tunelab.webui.app import create_ui, launch_ui

    demo = create_ui(runs_dir=tmp_path, default_model=str(tiny_models["llama"]), dataset_dir="")
    port = free_port()
    launch_ui(demo, port=port, password="s3cret", block=False, quiet=True)
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
        page.get_by_label("username").fill("me")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect").wait_for()
        assert page.locator("#tl-lang").count() == 0
        page.get_by_label("username").fill("me")
        page.get_by_label("password").fill("s3cret")
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#tl-lang")
        page.close()
    finally:
        demo.close()
