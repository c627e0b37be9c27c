"""`tunelab webui [--host 127.0.0.1] [--port 7860] [--password P]`: the browser UI (tunelab.webui); every flag is a
key of the config's webui section (webui.port=7861 works too)."""

from __future__ import annotations

import argparse

from tunelab.cli.common import Setting, add_override_argument, add_settings, config_from_args
from tunelab.config.load import from_environment

SETTINGS = (
    Setting("--host", "webui.host"),
    Setting("--port", "webui.port"),
    Setting("--password", "webui.password", metavar="P"),
    Setting("--lang", "webui.lang"),
    Setting("--runs-dir", "train.output_dir", note="where the page lists and starts runs"),
    Setting("--model", "model.name", note="pre-filled in the forms"),
    Setting("--threads", "train.threads", note="CPU threads of the page's chat and evaluation; training runs use "
            "their own config's train.threads"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_override_argument(parser)
    parser.add_argument("--config", help="run config YAML whose webui section, model.name, train.output_dir and "
                                         "train.threads give the defaults (other sections are not used by the page's "
                                         "start)")
    add_settings(parser, SETTINGS)


def run(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError

    cfg = config_from_args(args)  # a misspelled override fails before gradio is imported
    try:
        from tunelab.webui.app import create_ui, launch_ui
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "gradio":
            raise TunelabError("the web UI needs gradio: pip install 'tunelab[webui]'") from None
        raise
    web = cfg.webui
    password = from_environment(web.password, "TUNELAB_WEBUI_PASSWORD")
    if web.host not in ("127.0.0.1", "localhost", "::1") and not password:
        print(f"warning: serving on {web.host} without --password: anyone who can reach it can train and run models")
    demo = create_ui(runs_dir=cfg.train.output_dir, lang=web.lang, default_model=cfg.model.name,
                     threads=cfg.train.threads)
    print(f"tunelab web UI on http://{web.host}:{web.port} (Ctrl+C to stop)")
    launch_ui(demo, host=web.host, port=web.port, password=password, block=True, quiet=True)
    return 0
