"""Training a LenVM from rollouts.

Two paths share the data, the loss and the evaluation:

- **frozen backbone** (kinds ``attached`` and ``q``, or ``standalone`` with ``freeze_backbone``):
  hidden states are computed once, then only the head trains, on shuffled token positions.
- **full fine-tuning** (``standalone``): an ``accelerate`` loop, so the same code runs on one CPU,
  several GPUs or hosts under ``accelerate launch`` (DDP, FSDP, DeepSpeed).

Loss: squared error averaged over every supervised position of the effective batch (token
mean; per-sequence averaging would re-weight by 1/L and change the regression target).
Checkpoints are written atomically beside the output folder and an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lenvm import vision
from lenvm.dataset import (
    Batch,
    DatasetReport,
    Example,
    TruncatedPolicy,
    collate,
    examples_from_records,
    position_targets,
    split_by_prompt,
)
from lenvm.evaluation import length_metrics
from lenvm.io import InputError, atomic_path, write_json
from lenvm.model import KINDS, Kind, LengthValueModel, right_pad
from lenvm.prompts import image_references
from lenvm.returns import gamma_from_lengths


@dataclass
class TrainConfig:
    """Training settings; ``None`` means "the default for this path"."""

    kind: Kind = "attached"
    gamma: float | None = None  # None: the p99 rule over the training completions
    truncated: TruncatedPolicy = "bootstrap"
    eval_fraction: float = 0.1
    freeze_backbone: bool | None = None  # None: frozen for attached/q, trained for standalone
    epochs: int | None = None  # None: 30 for a frozen backbone, 2 (the paper's) otherwise
    lr: float | None = None  # None: 1e-3 for a frozen backbone, 2e-5 (the paper's) otherwise
    batch_tokens: int = 4096  # frozen path: positions per step
    batch_size: int = 8  # full path: sequences per process per micro-batch
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    bf16: bool = True  # head path: bf16 autocast; full path: accelerate mixed precision
    head_hidden_size: int | None = None
    feature_layer: int | None = None  # None: the kind's default (model.default_feature_layer)
    max_length: int | None = None
    seed: int = 0
    checkpoint_every: int = 200  # full path: optimizer steps between checkpoints

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.gamma is not None and not 0.0 < self.gamma < 1.0:
            raise InputError(f"gamma must lie in (0, 1), got {self.gamma}")
        if self.freeze_backbone is None:
            self.freeze_backbone = self.kind != "standalone"
        if not self.freeze_backbone and self.kind != "standalone":
            raise InputError("only a standalone LenVM trains its backbone; attached ones are frozen")
        if self.epochs is None:
            self.epochs = 30 if self.freeze_backbone else 2
        if self.lr is None:
            self.lr = 1e-3 if self.freeze_backbone else 2e-5
        for name in ("epochs", "batch_tokens", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1")
        if not self.lr > 0:
            raise InputError("learning rate must be positive")


@dataclass
class TrainResult:
    path: Path
    gamma: float
    metrics: dict[str, float]
    data: DatasetReport
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_second: float = 0.0  # supervised positions per second of the training loop


def train(
    rollouts: str | os.PathLike | list[dict[str, Any]],
    base: str,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    generator=None,
    progress: bool = True,
    eval_rollouts: str | os.PathLike | list[dict[str, Any]] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
) -> TrainResult:
    """Train a LenVM on ``rollouts`` (a JSONL path or loaded records) and save it to ``out``.

    ``base`` is the generator for an attached/q LenVM and the starting backbone for a
    standalone one; ``generator`` may pass it already loaded as ``(model, tokenizer)`` (it stays
    where it is). ``device`` and ``dtype`` apply to the models this call loads (default device:
    the generator's, else the first accelerator, else the CPU).
    ``eval_rollouts`` are held-out completions of other prompts (for example many samples of
    each, for a steady ground truth); when given, every record of ``rollouts`` trains and
    ``config.eval_fraction`` is not used.
    """
    config = config or TrainConfig()
    records = _records(rollouts)
    if not records:
        raise InputError("no rollout records to train on")
    held_records = _records(eval_rollouts) if eval_rollouts is not None else None
    if held_records is not None:
        shared = {str(r.get("prompt_id")) for r in records} & {str(r.get("prompt_id")) for r in held_records}
        if shared:
            raise InputError(
                f"{len(shared)} prompt(s) are in both the training and the evaluation rollouts, "
                f"for example {sorted(shared)[0]!r}: held-out prompts must not be trained on"
            )
    gamma = config.gamma or gamma_from_lengths([r["num_tokens"] for r in records])
    torch.manual_seed(config.seed)  # the head's initialization, so that a resumed run matches
    lenvm = LengthValueModel.from_base(
        base,
        kind=config.kind,
        gamma=gamma,
        generator=generator,
        head_hidden_size=config.head_hidden_size,
        feature_layer=config.feature_layer,
        dtype=dtype,
        device=device,
    )
    if not lenvm.sees_images and any(
        image_references(r.get("prompt")) for r in records + (held_records or [])
    ):
        raise InputError(f"the rollouts' prompts have images, which {str(base)!r} (text-only) cannot read")
    _check_token_ids(records + (held_records or []), lenvm)
    examples, report = examples_from_records(
        records, lenvm.config.eos_token_ids, config.truncated, config.max_length
    )
    if held_records is None:
        train_set, eval_set = split_by_prompt(examples, config.eval_fraction, config.seed)
    else:
        train_set = examples
        eval_set, _ = examples_from_records(held_records, lenvm.config.eos_token_ids, config.truncated)
    lenvm.config.generator = records[0].get("generator")
    lenvm.config.sampling = records[0].get("sampling")
    out = Path(out)
    work = out.with_name(out.name + ".checkpoints")
    fingerprint = _run_fingerprint(records + (held_records or []), base, config, gamma)

    started = time.perf_counter()
    trainer = HeadTrainer if config.freeze_backbone else FullTrainer
    losses, eval_values, tokens_seen, loop_seconds = trainer(lenvm, config, work, fingerprint, progress).fit(
        train_set, eval_set
    )
    seconds = time.perf_counter() - started
    # Optimisation throughput (supervised positions per second of this run's training loop),
    # without the one-off hidden-state pass of head training.
    tokens_per_second = tokens_seen / loop_seconds if loop_seconds > 0 else 0.0
    baseline = float(np.mean([e.length for e in train_set if e.finished] or [e.length for e in train_set]))
    metrics = length_metrics(eval_set, eval_values, gamma, baseline) if eval_set else {}
    metrics["baseline_length"] = baseline
    if not _is_main_process():
        return TrainResult(out, gamma, metrics, report, losses, seconds, tokens_per_second)
    lenvm.config.training = {
        **{k: v for k, v in dataclasses.asdict(config).items() if v is not None},
        "gamma": gamma,
        "data": report.to_dict(),
        "train_completions": len(train_set),
        "eval_completions": len(eval_set),
        "metrics": metrics,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens_per_second, 1),
    }
    lenvm.save_pretrained(out)
    write_json(out / "training_log.json", {"losses": losses, "metrics": metrics})
    plot_losses(losses, out / "loss.png")
    shutil.rmtree(work, ignore_errors=True)
    return TrainResult(out, gamma, metrics, report, losses, seconds, tokens_per_second)


def _records(rollouts: str | os.PathLike | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(rollouts, str | os.PathLike):
        from lenvm.rollouts import read_rollouts

        return read_rollouts(rollouts)
    return rollouts


def _check_token_ids(records: list[dict[str, Any]], lenvm: LengthValueModel) -> None:
    vocab = lenvm.backbone.get_input_embeddings().weight.shape[0]
    for i, r in enumerate(records):
        top = max(r["prompt_token_ids"] + r["completion_token_ids"], default=0)
        if top >= vocab:
            raise InputError(
                f"rollout record {i + 1} holds token id {top}, beyond the vocabulary ({vocab}) of "
                f"{lenvm.config.base_model!r}: were the rollouts made with another tokenizer?"
            )


def _run_fingerprint(records, base, config: TrainConfig, gamma: float) -> str:
    """Identifies a run so that a checkpoint is only resumed by the same run."""
    blob = json.dumps(
        [
            len(records),
            records[0].get("completion_token_ids"),
            records[-1].get("completion_token_ids"),
            str(base),
            dataclasses.asdict(config),
            gamma,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _images(lenvm: LengthValueModel, examples: list[Example], device=None) -> dict[str, torch.Tensor]:
    """The forward keyword arguments with the pixel inputs of ``examples``' prompt images."""
    rows = [(e.input_ids, e.images) for e in examples]
    return vision.forward_images(lenvm.tokenizer, rows, device or lenvm.device)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE (value space)")
    ax.set_yscale("log")
    ax.set_title("LenVM training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


class _Checkpoint:
    """One atomically replaced checkpoint file, valid only for the run that wrote it."""

    def __init__(self, work: Path, fingerprint: str):
        self.path = work / "checkpoint.pt"
        self.fingerprint = fingerprint

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            raise InputError(
                f"{self.path.parent} holds a checkpoint of a different training run; remove it to start over"
            )
        return state

    def save(self, **state) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"fingerprint": self.fingerprint, **state}, tmp)


class HeadTrainer:
    """Frozen backbone: cache the head's features once, then train the head on shuffled positions."""

    def __init__(
        self, lenvm: LengthValueModel, config: TrainConfig, work: Path, fingerprint: str, progress: bool
    ):
        self.lenvm, self.config, self.progress = lenvm, config, progress
        self.checkpoint = _Checkpoint(work, fingerprint)

    @torch.no_grad()
    def features(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Hidden states of every supervised and bootstrap state, with their targets.

        Row ``i`` is one supervised state; ``boot[i]`` is the row of its completion's bootstrap
        state (a row of its own, never supervised) and ``next_row[i]`` the row of the next state
        (-1 after the last one), which the q kind uses for the value of the token taken.
        """
        gamma = self.lenvm.gamma
        feats, mc, discount, boot, next_row, next_token, spans = [], [], [], [], [], [], []
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        bar = tqdm(
            total=sum(len(e.input_ids) for e in examples),
            unit="tok",
            desc="hidden states",
            disable=not self.progress,
        )
        rows = 0
        chunk: list[int] = []
        chunk_tokens = 0

        def flush():
            nonlocal rows
            seqs = [examples[i].input_ids for i in chunk]
            ids, mask, _ = right_pad(seqs, self.lenvm.device)
            images = _images(self.lenvm, [examples[i] for i in chunk])
            hidden = self.lenvm.features(ids, mask, **images)
            for b, i in enumerate(chunk):
                e = examples[i]
                last = e.start + e.num_states + (0 if e.finished else 1)
                feats.append(hidden[b, e.start : last].to(torch.bfloat16).cpu())
                row_mc, row_disc = position_targets(e, gamma)
                mc.append(torch.from_numpy(row_mc).float())
                discount.append(torch.from_numpy(row_disc).float())
                n = e.num_states
                boot.append(torch.full((n,), rows + n if not e.finished else rows))
                nxt = torch.arange(rows + 1, rows + n + 1)
                nxt[-1] = -1
                next_row.append(nxt)
                token_ids = torch.tensor(e.input_ids[e.start + 1 : e.start + n] + [0])
                next_token.append(token_ids)
                spans.append(torch.arange(rows, rows + n))
                if not e.finished:  # the bootstrap state's row carries no target of its own
                    mc.append(torch.zeros(1))
                    discount.append(torch.zeros(1))
                    boot.append(torch.zeros(1, dtype=torch.long))
                    next_row.append(torch.full((1,), -1))
                    next_token.append(torch.zeros(1, dtype=torch.long))
                rows = rows + n + (0 if e.finished else 1)
            bar.update(sum(len(s) for s in seqs))

        for i in order:
            chunk.append(i)
            chunk_tokens += len(examples[i].input_ids)
            if chunk_tokens >= 8192:
                flush()
                chunk, chunk_tokens = [], 0
        if chunk:
            flush()
        bar.close()
        inverse = torch.empty(len(examples), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(examples))
        return {
            "features": torch.cat(feats),
            "mc": torch.cat(mc),
            "discount": torch.cat(discount),
            "boot": torch.cat(boot).long(),
            "next_row": torch.cat(next_row).long(),
            "next_token": torch.cat(next_token).long(),
            "spans": [spans[j] for j in inverse.tolist()],
        }

    def loss(self, data: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """The loss of the positions ``rows``; the cached features stay on the host and each
        batch goes to the head's device."""
        lenvm, feats, device = self.lenvm, data["features"], self.lenvm.device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.bf16)
        with autocast:
            hidden = feats[rows].to(device).float()
            values = lenvm.values_from_hidden(hidden).float()
            with torch.no_grad():
                boot = feats[data["boot"][rows]].to(device).float()
                boot_values = lenvm.values_from_hidden(boot).float()
        targets = data["mc"][rows].to(device) + data["discount"][rows].to(device) * boot_values
        loss = torch.nn.functional.mse_loss(values, targets)
        if lenvm.config.kind == "q":
            nxt = data["next_row"][rows]
            has_next = nxt >= 0
            if has_next.any():
                rows_n, on_device = nxt[has_next], has_next.to(device)
                q_targets = (
                    data["mc"][rows_n].to(device)
                    + data["discount"][rows_n].to(device) * boot_values[on_device]
                )
                taken = data["next_token"][rows][has_next].to(device).unsqueeze(-1)
                with autocast:
                    q_values = lenvm.next_values_from_hidden(hidden[on_device], taken).squeeze(-1).float()
                loss = loss + torch.nn.functional.mse_loss(q_values, q_targets)
        return loss

    def fit(self, train_set: list[Example], eval_set: list[Example]):
        config, lenvm = self.config, self.lenvm
        data = self.features(train_set + eval_set)
        train_rows = torch.cat(data["spans"][: len(train_set)])
        steps_per_epoch = max(1, math.ceil(len(train_rows) / config.batch_tokens))
        total = steps_per_epoch * config.epochs
        params = lenvm.head.parameters()
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = cosine_schedule(optimizer, total, config.warmup_ratio)
        losses: list[float] = []
        start_epoch = 0
        state = self.checkpoint.load()
        if state is not None:
            lenvm.head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            losses, start_epoch = state["losses"], state["epoch"]
        lenvm.head.train()
        bar = tqdm(
            total=total,
            initial=start_epoch * steps_per_epoch,
            desc="training head",
            unit="step",
            disable=not self.progress,
        )
        tokens = 0
        started = time.perf_counter()
        for epoch in range(start_epoch, config.epochs):
            shuffle = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            order = train_rows[torch.randperm(len(train_rows), generator=shuffle)]
            for batch_rows in order.split(config.batch_tokens):
                loss = self.loss(data, batch_rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                tokens += len(batch_rows)
                bar.update()
                bar.set_postfix(
                    loss=f"{losses[-1]:.2e}", tok_s=f"{tokens / (time.perf_counter() - started):.0f}"
                )
            self.checkpoint.save(
                head=lenvm.head.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                losses=losses,
                epoch=epoch + 1,
            )
        bar.close()
        seconds = time.perf_counter() - started
        lenvm.head.eval()
        with torch.no_grad():
            eval_values = [
                lenvm.values_from_hidden(data["features"][span].to(lenvm.device).float())
                .float()
                .cpu()
                .numpy()
                for span in data["spans"][len(train_set) :]
            ]
        return losses, eval_values, tokens, seconds


class FullTrainer:
    """Full fine-tuning of a standalone LenVM with ``accelerate``."""

    def __init__(
        self, lenvm: LengthValueModel, config: TrainConfig, work: Path, fingerprint: str, progress: bool
    ):
        from accelerate import Accelerator

        self.lenvm, self.config, self.work, self.fingerprint = lenvm, config, work, fingerprint
        # Without an accelerator, say cpu=True so that several launched processes still form
        # a (gloo) process group instead of each training alone.
        self.accelerator = Accelerator(
            mixed_precision="bf16" if config.bf16 else "no", cpu=not torch.accelerator.is_available()
        )
        self.progress = progress and self.accelerator.is_main_process

    def windows(self, examples: list[Example], epoch: int) -> list[list[list[Example]]]:
        """This process's micro-batches for each optimizer step of ``epoch``.

        Completions are shuffled across prompts with a seed shared by all processes, then dealt
        out so that every process sees the same number of steps.
        """
        acc, config = self.accelerator, self.config
        order = np.random.default_rng([config.seed, epoch]).permutation(len(examples))
        per_step = config.batch_size * config.grad_accum * acc.num_processes
        steps = max(1, len(order) // per_step)
        windows = []
        for s in range(steps):
            chunk = order[s * per_step : (s + 1) * per_step]
            mine = chunk[acc.process_index :: acc.num_processes]
            micro = [mine[i : i + config.batch_size] for i in range(0, len(mine), config.batch_size)]
            windows.append([[examples[j] for j in m] for m in micro if len(m)])
        return windows

    def micro_loss(self, model, batch: Batch, images: dict | None = None) -> tuple[torch.Tensor, int]:
        """Sum of squared errors over the supervised positions, and their count; ``images``: the
        rows' pixel inputs as forward keyword arguments."""
        values = model(batch.input_ids, batch.attention_mask, **(images or {})).float()
        boot = values.gather(1, batch.boot_index[:, None]).detach()
        targets = batch.mc + batch.discount * boot
        errors = (values - targets)[batch.supervised]
        return (errors**2).sum(), int(batch.supervised.sum())

    def fit(self, train_set: list[Example], eval_set: list[Example]):
        acc, config, lenvm = self.accelerator, self.config, self.lenvm
        gamma = lenvm.gamma
        steps_per_epoch = len(self.windows(train_set, 0))
        total = steps_per_epoch * config.epochs
        optimizer = torch.optim.AdamW(
            lenvm.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        scheduler = cosine_schedule(optimizer, total, config.warmup_ratio)
        model, optimizer = acc.prepare(lenvm, optimizer)
        acc.register_for_checkpointing(scheduler)
        staging = self.work.with_name(self.work.name + ".staging")
        if not self.work.exists() and (staging / "state.json").is_file():
            os.replace(staging, self.work)  # interrupted between the two renames of save()
        state_file = self.work / "state.json"
        step, losses = 0, []
        if state_file.is_file():
            saved = json.loads(state_file.read_text())
            if saved["fingerprint"] != self.fingerprint:
                raise InputError(
                    f"{self.work} holds a checkpoint of a different training run; remove it to start over"
                )
            acc.load_state(str(self.work / "accelerate"))
            step, losses = saved["step"], saved["losses"]
        bar = tqdm(total=total, initial=step, desc="fine-tuning", unit="step", disable=not self.progress)
        tokens = 0
        started = time.perf_counter()
        model.train()
        for epoch in range(step // steps_per_epoch, config.epochs):
            for index, window in enumerate(self.windows(train_set, epoch)):
                if epoch * steps_per_epoch + index < step:
                    continue  # done before the interruption
                batches = [
                    collate(m, gamma, lenvm.tokenizer.pad_token_id or 0).to(acc.device) for m in window
                ]
                images = [_images(lenvm, m, acc.device) for m in window]
                # Token mean over the effective batch: divide by the count over all processes
                # and micro-batches; DDP averages gradients, so scale by the process count.
                local = sum(int(b.supervised.sum()) for b in batches)
                total_tokens = int(acc.reduce(torch.tensor(local, device=acc.device), "sum"))
                scale = acc.num_processes / max(total_tokens, 1)
                step_loss = 0.0
                for i, batch in enumerate(batches):
                    sync = i == len(batches) - 1
                    with contextlib.nullcontext() if sync else acc.no_sync(model):
                        sse, _ = self.micro_loss(model, batch, images[i])
                        acc.backward(sse * scale)
                    step_loss += sse.item() / max(total_tokens, 1)
                acc.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += total_tokens
                losses.append(float(acc.reduce(torch.tensor(step_loss, device=acc.device), "sum")))
                bar.update()
                bar.set_postfix(
                    loss=f"{losses[-1]:.2e}", tok_s=f"{tokens / (time.perf_counter() - started):.0f}"
                )
                if step % config.checkpoint_every == 0 and step < total:
                    self.save(step, losses)
        bar.close()
        seconds = time.perf_counter() - started
        model.eval()
        eval_values = []
        with torch.no_grad():
            for e in eval_set:
                ids = torch.tensor([e.input_ids], device=acc.device)
                values = model(ids, **_images(lenvm, [e], acc.device))
                values = values[0, e.start : e.start + e.num_states].float().cpu().numpy()
                eval_values.append(values)
        acc.wait_for_everyone()
        return losses, eval_values, tokens, seconds

    def save(self, step: int, losses: list[float]) -> None:
        """Accelerate state plus our step counter; the pair is replaced atomically."""
        acc = self.accelerator
        staging = self.work.with_name(self.work.name + ".staging")
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging / "accelerate"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (staging / "state.json").write_text(
                json.dumps({"fingerprint": self.fingerprint, "step": step, "losses": losses})
            )
            shutil.rmtree(self.work, ignore_errors=True)
            os.replace(staging, self.work)
        acc.wait_for_everyone()
