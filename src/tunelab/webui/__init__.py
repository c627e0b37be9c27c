"""Web UI: `tunelab webui` (create_ui and launch_ui in tunelab.webui.app); imports gradio only when built."""
