"""blip2_fast: a performance-first BLIP-2 engine, used in place of transformers' BLIP-2 classes."""
from .config import Blip2Config, ConfigError  # noqa: F401

__version__ = "0.1.0"
