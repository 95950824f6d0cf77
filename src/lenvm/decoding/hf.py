"""``transformers`` integration: LenVM guidance inside ``model.generate``.

    processor = LenVMLogitsProcessor(lenvm, Control("equal_to", target=64), num_candidates=8,
                                     sampling=SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=256))
    model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256,
                   logits_processor=[processor])

``generate`` applies its own temperature/top-k/top-p warpers AFTER user processors, where they
would distort the policy's distribution: give the sampling settings to the processor (it
truncates before picking candidates) and leave ``generate``'s warpers neutral, as above; give it
``generate``'s ``max_new_tokens`` too, which Equal To and At Least end before. With
``do_sample=False``, ``generate`` takes the argmax of the policy's distribution (guided greedy).

Each call is one step of :func:`lenvm.decoding.step.decide`, the engine's own, with the LenVM's
scorer (:mod:`lenvm.decoding.scorers`) running its own KV cache between calls: the chosen
candidate's cache entry from the previous call is kept, so a step costs one candidate-block
forward (a standalone LenVM, or an attached one running its own pass over the generator's body)
or one single-token forward (q kind). Prompts must be left-padded, as
``generate`` wants for decoder-only models; leading ``pad_token_id`` tokens are taken as padding.
A standalone LenVM reads every token it scores with an embedding of its own, which may lack rows
the generator pads its embedding with (past the tokenizer's ids): as in the engine, those ids are
never candidates, and never sampled, and a prompt that holds one is refused. A call whose ids do
not extend the previous call's starts over, so one processor can serve several ``generate`` calls
in turn; only a call on the same prompts right after one whose answers were a single token long
(``max_new_tokens=1``, or every row ending at once) cannot be told from assisted generation going
back to the prompts, and is refused: call ``reset()`` between such calls. Answers to a target
control that do not end naturally are kept as they are: resampling their end
(``Control.retries``) and ``best_of`` are the engine's. Prompts with images are the engine's
too: the processor sees token ids only, not the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from transformers import LogitsProcessor, StoppingCriteria

from lenvm import vision
from lenvm.decoding.params import DEFAULT_MAX_NEW_TOKENS, Control, SamplingParams
from lenvm.decoding.scorers import Scorer, scorer_for
from lenvm.decoding.step import Rows, as_logits, decide, forbid_unreadable, looks_ahead, readable_vocab_size
from lenvm.decoding.streams import attention_span
from lenvm.io import InputError, is_int, outside_vocabulary
from lenvm.model import LengthValueModel, check_lenvm


class LenVMLogitsProcessor(LogitsProcessor):
    """Re-weights ``generate``'s scores by a length control: non-candidates get ``-inf`` and each
    candidate the log of its policy probability (one-hot rules leave only the chosen token).
    A hard cap of the control (``Control.cap``) leaves only EOS once reached. ``sampling`` holds
    the temperature and truncation to apply, and ``generate``'s ``max_new_tokens`` (the target
    rules end an answer before it; its ``seed`` is ``generate``'s business)."""

    def __init__(
        self,
        lenvm: LengthValueModel,
        control: Control,
        num_candidates: int = 8,
        sampling: SamplingParams | None = None,
        pad_token_id: int | None = None,
    ):
        check_lenvm(lenvm, "LenVMLogitsProcessor")
        if not isinstance(control, Control):
            raise InputError(f"LenVMLogitsProcessor takes a Control, got {type(control).__name__}")
        if not control.active:
            raise InputError("LenVMLogitsProcessor needs an active Control (not kind 'none')")
        if control.best_of > 1 or control.retries:
            raise InputError(
                "best_of and retries need the decoding engine (lenvm.decoding.Engine): a logits "
                "processor sees one step of one answer at a time"
            )
        if not is_int(num_candidates) or num_candidates < 2:
            raise InputError(
                f"num_candidates must be an integer of at least 2 (with one, a control has nothing to choose "
                f"from), got {num_candidates!r}"
            )
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise InputError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        sampling = (sampling or SamplingParams()).fitted(DEFAULT_MAX_NEW_TOKENS)  # generate's limit: pass it
        max_new_tokens = cast(int, sampling.max_new_tokens)  # SamplingParams.fitted sets it
        for why in (control.unreachable(max_new_tokens), control.beyond_horizon(lenvm.gamma)):
            if why is not None:
                raise InputError(why)
        self.span = attention_span(lenvm.backbone, "the LenVM's body")  # its context, or a shorter window
        self.lenvm = lenvm.eval()
        self.control = control
        self.num_candidates = num_candidates
        self.sampling = sampling
        self.eos = torch.tensor(
            lenvm.config.eos_token_ids or [lenvm.tokenizer.eos_token_id], device=lenvm.device
        )
        self.pad_token_id = pad_token_id  # None: the tokenizer's at each new call (set it late, as is usual)
        self.reset()

    def reset(self) -> None:
        """Forget the sequences seen so far."""
        self._answers: _Answers | None = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        batch, width = input_ids.shape
        ids = input_ids.to(self.eos.device)
        answers = self._answers
        # Within one generate() call each call adds one column to unfinished rows; anything else
        # (a longer chat that goes on from finished answers included) is a new call.
        if (
            answers is not None
            and answers.seen.shape[0] == batch
            and width == answers.seen.shape[1] + 1
            and torch.equal(ids[:, : answers.seen.shape[1]], answers.seen)
        ):
            self._check_ended(answers, ids[:, -1])
            self._advance(answers, ids[:, answers.seen.shape[1] :])
        else:
            if answers is not None and _reordered(ids, answers.seen):
                raise InputError(
                    "the LenVM logits processor follows each row as one answer; beam search (num_beams > 1) "
                    "reorders rows between steps: decode with sampling or greedy search"
                )
            if answers is not None and _went_back(ids, answers.seen, answers.prompt_width):
                raise InputError(
                    "the LenVM logits processor follows each row as one answer, but these rows went back "
                    "within their answers, as assisted generation (prompt_lookup_num_tokens, "
                    "assistant_model) does between its rounds: it is not supported (for a new generate "
                    "call on these ids, as after answers a single token long, call reset() first)"
                )
            answers = self._answers = self._start(ids)  # a new generate() call
        answers.seen = ids
        answers.rows.step.fill_(width - answers.prompt_width)
        lengths = answers.prompt_lengths + (width - answers.prompt_width)
        if bool((lengths[~answers.done] >= self.span).any()):  # a live row's candidate would go beyond it
            raise InputError(
                f"a row reached {self.span} tokens, the most the LenVM's stream computes as its body "
                "does (its context, or its sliding window: the stream attends to the whole prefix); "
                "lower max_new_tokens or shorten the prompt"
            )

        logits = forbid_unreadable(scores.to(self.eos.device, torch.float32, copy=True), self.lenvm)
        d = decide(logits, answers.rows, answers.scorer, self.num_candidates, self.eos, self.lenvm.gamma)
        answers.candidates = d.ids
        return as_logits(d, answers.rows, logits.shape[-1]).to(scores.dtype).to(scores.device)

    def _start(self, input_ids: torch.Tensor) -> _Answers:
        """Prefill every row's prompt (leading padding stripped)."""
        self.reset()
        pad = self.pad_token_id if self.pad_token_id is not None else self.lenvm.tokenizer.pad_token_id
        rows = []
        for row in input_ids.tolist():
            start = next((i for i, t in enumerate(row) if t != pad), len(row) - 1)
            rows.append(row[start:])
        processor = vision.processor_of(self.lenvm.tokenizer)
        if processor is not None and any(processor.image_token_id in row for row in rows):
            raise InputError(
                "a prompt has images, which the transformers logits processor cannot pass to the "
                "LenVM: guide image prompts with lenvm's engine (lenvm.decoding.Engine)"
            )
        readable = readable_vocab_size(self.lenvm)
        if readable is not None:
            for row in rows:
                if (why := outside_vocabulary(row, readable)) is not None:
                    raise InputError(f"the LenVM reads the prompt with an embedding of its own: {why}")
        lookahead = looks_ahead(self.control, self.sampling)
        n = len(rows)
        return _Answers(
            scorer=scorer_for(self.lenvm).prefill(self.lenvm, rows, lookahead=lookahead),
            rows=Rows.build([self.sampling] * n, [self.control] * n, [0] * n, self.eos.device),
            done=torch.zeros(n, dtype=torch.bool, device=self.eos.device),
            seen=input_ids,
            prompt_width=input_ids.shape[1],
            prompt_lengths=torch.tensor([len(row) for row in rows], device=self.eos.device),
            pad=pad,
        )

    def _check_ended(self, answers: _Answers, column: torch.Tensor) -> None:
        """Rows that ended with one of the LenVM's EOS ids get padding from ``generate`` (or an EOS
        again), and once every row has ended ``generate`` stops. A row that got another token, or
        a step after every row ended, means that ``generate`` stops on fewer EOS ids than the LenVM
        ends answers with."""
        pad = answers.pad if answers.pad is not None else -1
        went_on = answers.done & ~torch.isin(column, self.eos) & (column != pad)
        if bool(went_on.any()) or bool(answers.done.all()):
            ids = self.eos.tolist()
            raise InputError(
                f"generate went on after an answer ended with one of the LenVM's EOS ids {ids}: pass "
                f"eos_token_id={ids} to generate (its generation config stops on fewer of them)"
            )

    def _advance(self, answers: _Answers, new: torch.Tensor) -> None:
        """Bring the cache up to date with the tokens ``generate`` appended since the last call:
        keep the chosen candidate where every row took one (rows that ended earlier get padding
        appended; their cache no longer matters), else feed the new tokens."""
        match = answers.candidates == new[:, :1] if answers.candidates is not None else None
        if match is not None and new.shape[1] == 1 and bool((match.any(-1) | answers.done).all()):
            answers.scorer.advance(match.to(torch.int8).argmax(-1), new[:, 0])
        else:
            answers.scorer.feed(new)
        answers.done |= torch.isin(new[:, -1], self.eos)


@dataclass
class _Answers:
    """The rows of the ``generate`` call a processor follows."""

    scorer: Scorer  # the LenVM over every column of input_ids seen so far
    rows: Rows
    done: torch.Tensor  # [B] rows that emitted EOS (generate pads them)
    seen: torch.Tensor  # the input_ids of the last call, all in the cache
    prompt_width: int
    prompt_lengths: torch.Tensor  # [B] each row's prompt, padding stripped
    pad: int | None  # the padding of the rows
    candidates: torch.Tensor | None = None  # [B, k]: the last call's (None until one decided)


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
        stop = torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, stop)  # a bool tensor: the base class's signature names it so


def _went_back(input_ids: torch.Tensor, seen: torch.Tensor, prompt_width: int) -> bool:
    """Whether ``input_ids`` are the rows ``seen`` again, or cut back to some of their generated
    tokens (a new call on the same prompt starts after generated tokens, from the prompt)."""
    width = input_ids.shape[1]
    return (
        input_ids.shape[0] == seen.shape[0]
        and width <= seen.shape[1]
        and (width > prompt_width or width == seen.shape[1])
        and torch.equal(input_ids, seen[:, :width])
    )


def _reordered(input_ids: torch.Tensor, seen: torch.Tensor) -> bool:
    """Whether ``input_ids`` continue the rows ``seen`` one step later in another order (what beam
    search hands a processor), rather than starting a new ``generate`` call."""
    if input_ids.shape != (seen.shape[0], seen.shape[1] + 1):
        return False
    prefixes = input_ids[:, :-1]
    return bool((prefixes[:, None, :] == seen[None, :, :]).all(-1).any(-1).all())
