"""``transformers`` integration: LenVM guidance inside ``model.generate``.

    processor = LenVMLogitsProcessor(lenvm, Control("equal_to", target=64), num_candidates=8)
    model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                   logits_processor=[processor])

``generate`` applies its own temperature/top-k/top-p warpers AFTER user processors, where they
would distort the policy's distribution: give the sampling settings to the processor (it
truncates before picking candidates) and leave ``generate``'s warpers neutral, as above. With
``do_sample=False``, ``generate`` takes the argmax of the policy's distribution (guided greedy).

The processor keeps its own LenVM KV cache between calls and feeds only the new token: the
chosen candidate's cache entry from the previous call is kept, so a step costs one
candidate-block forward (a standalone LenVM, or an attached one running its own pass over the
generator's body) or one single-token forward (q kind). Prompts must be left-padded, as
``generate`` wants for decoder-only models; leading ``pad_token_id`` tokens are taken as padding.
A call whose ids do not extend the previous call's starts over, so one processor can serve
several ``generate`` calls in turn. Equal To answers that do not end naturally are kept as they
are: resampling their end (``Control.retries``) and ``best_of`` are the engine's.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, StoppingCriteria

from lenvm.decoding import policies
from lenvm.decoding.engine import Control, Request
from lenvm.decoding.scoring import Stream
from lenvm.io import InputError, is_int
from lenvm.model import LengthValueModel


class LenVMLogitsProcessor(LogitsProcessor):
    """Re-weights ``generate``'s scores by a length control: non-candidates get ``-inf`` and each
    candidate the log of its policy probability (one-hot rules leave only the chosen token).
    A hard cap of the control (``Control.cap``) leaves only EOS once reached."""

    def __init__(
        self,
        lenvm: LengthValueModel,
        control: Control,
        num_candidates: int = 8,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        pad_token_id: int | None = None,
    ):
        if not isinstance(control, Control) or not control.active:
            raise InputError("LenVMLogitsProcessor needs an active Control (not kind 'none')")
        if control.best_of > 1 or control.retries:
            raise InputError(
                "best_of and retries need the decoding engine (lenvm.decoding.Engine): a logits "
                "processor sees one step of one answer at a time"
            )
        if not is_int(num_candidates) or num_candidates < 1:
            raise InputError(f"num_candidates must be a positive integer, got {num_candidates!r}")
        # Validated like an engine request's sampling settings.
        Request("-", temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        self.lenvm = lenvm.eval()
        self.control = control
        self.num_candidates = num_candidates
        self.sampling = (temperature or 1.0, top_k, top_p, min_p)
        eos = lenvm.config.eos_token_ids or [lenvm.tokenizer.eos_token_id]
        self.eos = torch.tensor(eos, device=lenvm.device)
        self.pad_token_id = lenvm.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.reset()

    def reset(self) -> None:
        """Forget the sequences seen so far."""
        self._stream: Stream | None = None  # the LenVM over every column of input_ids seen so far
        self._hidden: torch.Tensor | None = None  # [B, H] head features at the last token (q kind)
        self._block: torch.Tensor | None = None  # [B, k] candidates fed and pending in the cache
        self._done: torch.Tensor | None = None  # [B] rows that emitted EOS (generate pads them)
        self._seen: torch.Tensor | None = None  # the input_ids of the last call, all in the cache
        self._prompt_width = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, width = input_ids.shape
        input_ids = input_ids.to(self.eos.device)
        seen = self._seen
        if (
            seen is None
            or seen.shape[0] != batch
            or width <= seen.shape[1]
            or not torch.equal(input_ids[:, : seen.shape[1]], seen)
        ):
            self._start(input_ids)  # a new generate() call
        else:
            self._advance(input_ids[:, seen.shape[1] :])
        self._seen = input_ids
        step = width - self._prompt_width

        logits = scores.float().to(self.eos.device)
        temperature, top_k, top_p, min_p = self.sampling

        def per_row(x, dtype):
            return torch.full((batch,), x, dtype=dtype, device=logits.device)

        temp = per_row(temperature, torch.float32)
        probs = policies.truncate(
            logits,
            temp,
            per_row(top_k, torch.long) if top_k > 0 else None,
            per_row(top_p, torch.float32) if top_p < 1 else None,
            per_row(min_p, torch.float32) if min_p > 0 else None,
        )
        wants_eos = per_row(True, torch.bool) if self.control.wants_eos else None
        ids, cand_probs = policies.top_candidates(
            logits, probs, self.num_candidates, self.eos, wants_eos, temp
        )
        eos = torch.isin(ids, self.eos)
        if self.lenvm.config.kind == "q":
            values = self.lenvm.next_values_from_hidden(self._hidden, ids)
        else:
            values = self.lenvm.values_from_hidden(self._stream.forward(ids).features)
            self._block = ids
        cands = policies.Candidates(ids, cand_probs, values.float().masked_fill(eos, 0.0), eos)
        c = self.control
        dist = policies.apply(
            c.kind,
            c.rule,
            cands,
            per_row(step, torch.long),
            per_row(c.target or 0, torch.long),
            per_row(c.beta or 0.0, torch.float64),
            self.lenvm.gamma,
        )
        out = torch.full_like(logits, -float("inf"))
        if c.cap is not None and step >= c.cap:
            out.scatter_(1, self.eos[logits[:, self.eos].argmax(-1)][:, None], 0.0)
        else:
            out.scatter_(1, ids, dist.log().float())
        return out.to(scores.dtype).to(scores.device)

    def _start(self, input_ids: torch.Tensor) -> None:
        """Prefill every row's prompt (leading padding stripped)."""
        self.reset()
        rows = []
        for row in input_ids.tolist():
            start = next((i for i, t in enumerate(row) if t != self.pad_token_id), len(row) - 1)
            rows.append(row[start:])
        self._stream, hidden = Stream.prefill(self.lenvm.body, rows, self.lenvm.feature_layer)
        self._hidden = hidden.features
        self._done = torch.zeros(len(rows), dtype=torch.bool, device=self.eos.device)
        self._prompt_width = input_ids.shape[1]

    def _advance(self, new: torch.Tensor) -> None:
        """Bring the cache up to date with the tokens ``generate`` appended since the last call."""
        last = new[:, -1]
        if self._block is not None:
            match = self._block == new[:, :1]
            # Rows that ended earlier get padding appended; their cache no longer matters.
            if new.shape[1] == 1 and bool((match.any(-1) | self._done).all()):
                self._stream.keep(match.to(torch.int8).argmax(-1))
                new = new[:, 1:]
            else:
                self._stream.discard()
            self._block = None
        for j in range(new.shape[1]):
            self._hidden = self._stream.forward(new[:, j : j + 1]).features[:, 0]
            self._stream.keep()
        self._done |= torch.isin(last, self.eos)


class LengthStoppingCriteria(StoppingCriteria):
    """Stops every row once it has ``max_new_tokens`` generated tokens after a prompt of
    ``prompt_length`` columns (the padded input width): a hard length cap for ``generate``."""

    def __init__(self, prompt_length: int, max_new_tokens: int):
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = input_ids.shape[1] - self.prompt_length >= self.max_new_tokens
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
