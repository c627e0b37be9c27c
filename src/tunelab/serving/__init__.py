"""Deployment stage: an OpenAI-compatible REST server (app.create_app) around an inference engine.

Import `tunelab.serving.app` or `tunelab.serving.server` explicitly; this package imports nothing heavy.
"""
