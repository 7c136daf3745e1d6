"""attnkit: self-attention models and autoregressive generation on PyTorch."""

__version__ = "0.1.0"

from attnkit.errors import AttnkitError  # noqa: F401
from attnkit.config import ModelConfig, preset  # noqa: F401
