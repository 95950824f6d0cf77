"""LenVM-guided decoding: a batched engine, control policies, and a ``transformers`` integration.

from lenvm.decoding import Engine, Request, Control
engine = Engine(model, tokenizer, lenvm=lenvm, num_candidates=8)
[result] = engine.generate([Request("Describe the sea.", control=Control("equal_to", target=64))])
"""

from lenvm.decoding.engine import Control, Engine, Request, Result
from lenvm.decoding.hf import LengthStoppingCriteria, LenVMLogitsProcessor

__all__ = ["Control", "Engine", "LenVMLogitsProcessor", "LengthStoppingCriteria", "Request", "Result"]
