"""LenVM-guided decoding: one decoding step shared by a batched engine, a ``transformers`` logits
processor and a vLLM logits processor.

    from lenvm.decoding import Control, Engine, Request, SamplingParams
    engine = Engine(model, tokenizer, lenvm=lenvm, num_candidates=8)
    [result] = engine.generate([Request("Describe the sea.", SamplingParams(temperature=0.7),
                                        control=Control("equal_to", target=64))])

Modules: ``params`` (what a request asks for), ``policies`` (candidates, values -> distribution),
``scorers`` (how each LenVM kind values candidates), ``streams`` (KV-cached forwards), ``step``
(the shared step), ``sequence`` and ``batch`` (the engine's per-request and per-batch state),
``engine`` (the scheduler loop), ``hf`` (``transformers`` processors).
"""

from lenvm.decoding.engine import Engine, Scheduler
from lenvm.decoding.hf import LengthStoppingCriteria, LenVMLogitsProcessor
from lenvm.decoding.params import Control, Request, Result, SamplingParams

__all__ = [
    "Control",
    "Engine",
    "LenVMLogitsProcessor",
    "LengthStoppingCriteria",
    "Request",
    "Result",
    "SamplingParams",
    "Scheduler",
]
