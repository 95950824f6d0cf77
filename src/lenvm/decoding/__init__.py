"""LenVM-guided decoding: one decoding step shared by a batched engine, a ``transformers`` logits
processor and a vLLM logits processor.

    from lenvm.decoding import Control, Engine, Request, SamplingParams
    engine = Engine(model, tokenizer, lenvm=lenvm, num_candidates=8)
    [result] = engine.generate([Request("Describe the sea.", SamplingParams(temperature=0.7),
                                        control=Control("equal_to", target=64))])

Modules: ``params`` (what a request asks for), ``policies`` (candidates, values -> distribution),
``scorers`` (how each LenVM kind values candidates), ``streams`` (KV-cached forwards), ``step``
(the shared step), ``sequence`` and ``batch`` (the engine's per-request and per-batch state),
``queue`` (the order waiting requests are admitted in), ``engine`` (the scheduler loop), ``hf``
(``transformers`` processors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lenvm._lazy import lazy_exports

# name -> module that defines it; loaded on first use, so that the request types (``params``) come
# without the engine's torch and transformers (the command line's start-up)
_EXPORTS = {
    "Control": "lenvm.decoding.params",
    "Request": "lenvm.decoding.params",
    "Result": "lenvm.decoding.params",
    "SamplingParams": "lenvm.decoding.params",
    "Engine": "lenvm.decoding.engine",
    "Scheduler": "lenvm.decoding.engine",
    "LenVMLogitsProcessor": "lenvm.decoding.hf",
    "LengthStoppingCriteria": "lenvm.decoding.hf",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from lenvm.decoding.engine import Engine, Scheduler
    from lenvm.decoding.hf import LengthStoppingCriteria, LenVMLogitsProcessor
    from lenvm.decoding.params import Control, Request, Result, SamplingParams
