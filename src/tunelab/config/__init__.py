"""Run configuration: pydantic sections (schema.py) and YAML loading with overrides (load.py)."""

from tunelab.config.load import ConfigError, dump_config, load_config
from tunelab.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "dump_config", "load_config"]
