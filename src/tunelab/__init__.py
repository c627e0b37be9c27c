"""tunelab: fine-tune large language models from data to deployment."""

__version__ = "0.1.0"
