"""lenvm: Length Value Models for token-level length prediction and control."""

__version__ = "0.1.0"

from lenvm.model import LengthValueConfig, LengthValueModel  # noqa: E402
from lenvm.returns import (  # noqa: E402
    gamma_for_horizon,
    length_to_value,
    value_to_length,
)

__all__ = [
    "LengthValueConfig",
    "LengthValueModel",
    "gamma_for_horizon",
    "length_to_value",
    "value_to_length",
    "__version__",
]
