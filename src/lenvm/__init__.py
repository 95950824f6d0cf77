"""lenvm: Length Value Models for token-level length prediction and control.

Everything a user needs is importable from here::

    from lenvm import (Control, Engine, LengthValueModel, Request, SamplingParams, TrainConfig,
                       load_generator, read_prompts, rollout, train)

Names load on first use, so ``import lenvm`` stays quick and imports no optional dependency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lenvm._lazy import lazy_exports

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "LengthValueModel": "lenvm.model",
    "LengthValueConfig": "lenvm.model",
    "load_generator": "lenvm.hub",
    "Prompt": "lenvm.prompts",
    "read_prompts": "lenvm.prompts",
    "rollout": "lenvm.rollouts",
    "read_rollouts": "lenvm.rollouts",
    "TrainConfig": "lenvm.training",
    "train": "lenvm.training",
    "SamplingParams": "lenvm.decoding.params",
    "Control": "lenvm.decoding.params",
    "Request": "lenvm.decoding.params",
    "Result": "lenvm.decoding.params",
    "Engine": "lenvm.decoding.engine",
    "LenVMLogitsProcessor": "lenvm.decoding.hf",
    "token_values": "lenvm.values_view",
    "render_html": "lenvm.values_view",
    "gamma_for_horizon": "lenvm.returns",
    "length_to_value": "lenvm.returns",
    "value_to_length": "lenvm.returns",
    "calibrate": "lenvm.calibration",
    "Calibration": "lenvm.calibration",
    "train_end_head": "lenvm.end_head",
    "TrainResult": "lenvm.training",
    "ValueTrace": "lenvm.values_view",
    "InputError": "lenvm.io",
    "NotALenVMError": "lenvm.model",
    "TokenizerMismatchError": "lenvm.model",
}

__all__ = [
    "Calibration",
    "Control",
    "Engine",
    "InputError",
    "LenVMLogitsProcessor",
    "LengthValueConfig",
    "LengthValueModel",
    "NotALenVMError",
    "Prompt",
    "Request",
    "Result",
    "SamplingParams",
    "TokenizerMismatchError",
    "TrainConfig",
    "TrainResult",
    "ValueTrace",
    "__version__",
    "calibrate",
    "gamma_for_horizon",
    "length_to_value",
    "load_generator",
    "read_prompts",
    "read_rollouts",
    "render_html",
    "rollout",
    "token_values",
    "train",
    "train_end_head",
    "value_to_length",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from lenvm.calibration import Calibration, calibrate
    from lenvm.decoding.engine import Engine
    from lenvm.decoding.hf import LenVMLogitsProcessor
    from lenvm.decoding.params import Control, Request, Result, SamplingParams
    from lenvm.end_head import train_end_head
    from lenvm.hub import load_generator
    from lenvm.io import InputError
    from lenvm.model import LengthValueConfig, LengthValueModel, NotALenVMError, TokenizerMismatchError
    from lenvm.prompts import Prompt, read_prompts
    from lenvm.returns import gamma_for_horizon, length_to_value, value_to_length
    from lenvm.rollouts import read_rollouts, rollout
    from lenvm.training import TrainConfig, TrainResult, train
    from lenvm.values_view import ValueTrace, render_html, token_values
