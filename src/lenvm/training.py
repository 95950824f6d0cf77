"""Training a LenVM from rollouts.

Two paths share the data (:mod:`lenvm.training_data`), the targets
(:func:`lenvm.returns.lambda_returns`), the loss (:mod:`lenvm.losses`) and the evaluation:

- **frozen backbone** (kinds ``attached`` and ``q``, or ``standalone`` with ``freeze_backbone``):
  hidden states are computed once into a memory-mapped file, then only the head trains, on
  shuffled token positions.
- **full fine-tuning** (``standalone``): an ``accelerate`` loop, so the same code runs on one CPU,
  several GPUs or hosts under ``accelerate launch`` (DDP, FSDP, DeepSpeed ZeRO; the package ships
  configurations for each, see :mod:`lenvm.launch`).

Default loss: squared error averaged over every supervised position of the effective batch
(token mean; per-sequence averaging would re-weight by 1/L and change the regression target).
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
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from lenvm.dataset import Batch, DatasetReport, Example, TruncatedPolicy, collate, forward_images
from lenvm.evaluation import PROGRESS_KEYS, length_metrics
from lenvm.figures import save_png, subplots
from lenvm.hub import same_model, torch_dtype
from lenvm.io import (
    InputError,
    RunLock,
    atomic_path,
    check_writable,
    fingerprint,
    is_int,
    is_real,
    plain_numbers,
    write_json,
    write_text,
)
from lenvm.losses import (
    AGGREGATIONS,
    LOSSES,
    Aggregation,
    Loss,
    aggregation_count,
    sampled_states_count,
    state_losses,
    state_weights,
)
from lenvm.model import KINDS, Kind, LengthValueModel, embedding_matrix, refuse_to_replace, right_pad
from lenvm.returns import gamma_from_lengths, lambda_returns, length_to_value
from lenvm.training_data import RolloutSource, TrainingData, shuffled, training_data


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
    # Targets: TD(lambda) returns from the LenVM being trained; 1 is Monte-Carlo (the paper's).
    lam: float = 1.0
    loss: Loss = "mse"
    huber_delta: float = 1.0
    relative_loss_weight: float = 0.0  # see lenvm.losses: relative error of the remaining length
    prompt_weight: float = 1.0  # see lenvm.losses: loss weight of each completion's s_0 state
    aggregation: Aggregation = "token-mean"
    # None: bf16 where the hardware computes it natively (see resolve_bf16), else float32.
    bf16: bool | None = None
    gradient_checkpointing: bool = False  # full path: recompute activations in the backward pass
    head_hidden_size: int | None = None
    feature_layer: int | None = None  # None: the kind's default (model.default_feature_layer)
    max_length: int | None = None
    seed: int = 0
    checkpoint_every: int = 200  # full path: optimizer steps between checkpoints (and evaluations)
    # None: stream rollout files over 256 MiB and datasets folders (lenvm.training_data).
    stream: bool | None = None
    # Head training: keep the cached hidden states here and reuse them in any later run that reads
    # the same ones: the same rollouts and held-out answers, model, dtype, feature layer, truncation
    # and max_length, streamed or not; its other training options may differ (None: a temporary folder).
    features_cache: str | None = None
    shuffle_buffer: int = 10_000  # full path, streamed: completions in the shuffle buffer

    def __post_init__(self) -> None:
        plain_numbers(self)  # the checks below (is_real) and the run's fingerprint take Python numbers only
        if self.kind not in KINDS:
            raise InputError(f"unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.gamma is not None and not 0.0 < self.gamma < 1.0:
            raise InputError(f"gamma must lie in (0, 1), got {self.gamma}")
        for name in ("bf16", "stream", "freeze_backbone"):
            if getattr(self, name) not in (None, True, False):
                raise InputError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        resolved = self._kind_defaults()
        frozen = resolved["freeze_backbone"]
        if not frozen and self.kind != "standalone":
            raise InputError("only a standalone LenVM trains its backbone; attached ones are frozen")
        for name, value in [("epochs", resolved["epochs"])] + [
            (name, getattr(self, name))
            for name in (
                "batch_tokens",
                "batch_size",
                "grad_accum",
                "shuffle_buffer",
                "checkpoint_every",
            )
        ]:
            if not is_int(value) or value < 1:
                raise InputError(f"{name} must be an integer of at least 1, got {value!r}")
        if not is_int(self.seed):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if not (is_real(self.warmup_ratio) and 0.0 <= self.warmup_ratio < 1.0):
            raise InputError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        if not (is_real(resolved["lr"]) and resolved["lr"] > 0):
            raise InputError(f"learning rate must be a positive finite number, got {resolved['lr']!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise InputError(f"lambda must lie in [0, 1], got {self.lam}")
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
        if self.aggregation not in AGGREGATIONS:
            raise InputError(f"unknown aggregation {self.aggregation!r}; expected one of {AGGREGATIONS}")
        if not (is_real(self.huber_delta) and self.huber_delta > 0):
            raise InputError(f"huber_delta must be a positive finite number, got {self.huber_delta!r}")
        if not (is_real(self.relative_loss_weight) and self.relative_loss_weight >= 0):
            raise InputError(
                f"relative_loss_weight must be a finite number >= 0, got {self.relative_loss_weight!r}"
            )
        if not (is_real(self.prompt_weight) and self.prompt_weight > 0):
            raise InputError(f"prompt_weight must be a positive finite number, got {self.prompt_weight!r}")
        if self.head_hidden_size is not None and not (
            is_int(self.head_hidden_size) and self.head_hidden_size >= 1
        ):
            raise InputError(f"head_hidden_size must be at least 1, got {self.head_hidden_size!r}")
        if self.features_cache and not frozen:
            raise InputError("a features cache applies to head training, not to fine-tuning a backbone")
        if self.gradient_checkpointing and frozen:
            raise InputError("gradient checkpointing applies to fine-tuning a backbone, not to head training")

    def _kind_defaults(self) -> dict[str, Any]:
        frozen = self.kind != "standalone" if self.freeze_backbone is None else self.freeze_backbone
        return {
            "freeze_backbone": frozen,
            "epochs": (30 if frozen else 2) if self.epochs is None else self.epochs,
            "lr": (1e-3 if frozen else 2e-5) if self.lr is None else self.lr,
        }

    def resolved(self) -> TrainConfig:
        """A copy with the kind's defaults in place of None (whether the backbone trains, epochs,
        learning rate), checked again. The None stays here, so that a copy of this config with
        another kind (``dataclasses.replace(config, kind=...)``) takes that kind's defaults."""
        return dataclasses.replace(self, **self._kind_defaults())


@dataclass
class TrainResult:
    """What :func:`train` did: the LenVM's folder, its gamma, the held-out ``metrics`` at the end
    (:func:`lenvm.evaluation.length_metrics`), what the rollouts held (``data``), the loss of every
    optimizer step and the held-out figures logged while training (also in the folder's
    ``training_log.json``)."""

    path: Path
    gamma: float
    metrics: dict[str, float]
    data: DatasetReport
    losses: list[float] = field(default_factory=list)
    seconds_this_run: float = 0.0  # this invocation's: a resumed run's earlier ones are not recorded
    tokens_per_second: float = 0.0  # supervised positions per second of the training loop
    evaluations: list[dict[str, float]] = field(default_factory=list)  # held-out figures while training


@dataclass
class _Fit:
    """What a trainer hands back."""

    losses: list[float]
    eval_values: list[np.ndarray]
    tokens: int
    seconds: float
    evaluations: list[dict[str, float]]
    state_dict: dict[str, torch.Tensor] | None = None  # full weights of a sharded model
    distributed: dict[str, Any] | None = None  # how the full path ran (see FullTrainer.layout)


def train(
    rollouts: str | os.PathLike | list[dict[str, Any]],
    base: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    generator=None,
    progress: bool = True,
    eval_rollouts: str | os.PathLike | list[dict[str, Any]] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    overwrite: bool = False,
) -> TrainResult:
    """Train a LenVM on ``rollouts`` and save it to ``out``.

    ``rollouts`` is a list of records, a rollouts JSONL file or a ``datasets`` folder; a file is
    streamed when ``config.stream`` says so (by default when it is large, see
    :mod:`lenvm.training_data`). ``base`` is the generator for an attached/q LenVM and the
    starting backbone for a standalone one; ``generator`` may pass it already loaded as
    ``(model, tokenizer)`` (it stays where it is; for an attached or q LenVM, whose head reads
    it, one that is another model, by its name or its weights, is refused: see
    :meth:`LengthValueModel.from_base`).
    ``device`` and ``dtype`` apply to the models this call loads (default device: the
    generator's, else the first accelerator, else the CPU).
    ``eval_rollouts`` are held-out completions of other prompts (for example many samples of
    each, for a steady ground truth; they are held in memory); when given, every record of
    ``rollouts`` trains and ``config.eval_fraction`` is not used. A LenVM already at ``out`` (with
    any end head and calibration fitted for it) is replaced only when ``overwrite``; anything else
    there never is.
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise InputError(
            f"config must be a TrainConfig, got {type(config).__name__}: TrainConfig(**settings) makes one "
            "from a dict"
        )
    config = (config or TrainConfig()).resolved()
    if not config.freeze_backbone and torch_dtype(dtype) == torch.float16:
        # Its weights, gradients and optimizer state would all be float16, with no float32 copy or
        # loss scaling: the loss turns NaN within steps, whatever the learning rate.
        raise InputError(
            "a backbone cannot be fine-tuned in float16: load it in float32 (with bf16 on, the default "
            "on GPUs, it trains in mixed precision) or in bfloat16"
        )
    refuse_to_replace(out, "training", lenvm=overwrite)  # before any work
    check_writable(out)
    if config.features_cache and Path(config.features_cache).resolve() == Path(out).resolve():
        raise InputError("the features cache and the LenVM need folders of their own: choose another cache")
    out = Path(out)
    work = out.with_name(out.name + ".checkpoints")
    with _exclusive_run(out, work, config.features_cache):
        trainer_type, other = (
            (HeadTrainer, FullTrainer) if config.freeze_backbone else (FullTrainer, HeadTrainer)
        )
        _refuse_the_other_paths_checkpoint(work, other)  # before any work, as the trainers check their own
        source = RolloutSource(rollouts, config.stream)
        if not source.streamed and not source.records:
            raise InputError("no rollout records to train on")
        eval_source = RolloutSource(eval_rollouts, stream=False) if eval_rollouts is not None else None
        torch.manual_seed(config.seed)  # the head's initialization, so that a resumed run matches
        lenvm = LengthValueModel.from_base(
            base,
            kind=config.kind,
            gamma=config.gamma or 0.5,  # set below, once the rollouts have been scanned
            generator=generator,
            head_hidden_size=config.head_hidden_size,
            feature_layer=config.feature_layer,
            dtype=dtype,
            device=device,
        )
        data = training_data(
            source,
            eval_source,
            lenvm.config.eos_token_ids,
            config.truncated,
            config.max_length,
            config.eval_fraction,
            config.seed,
            vocab_size=embedding_matrix(lenvm.backbone).shape[0],
            vocab_name=lenvm.config.base_model,
            sees_images=lenvm.sees_images,
            tokenizer=lenvm.tokenizer,
            context=lenvm.context,
        )
        if data.report.finished == 0:
            warnings.warn(
                "no training completion ended with EOS: every target is bootstrapped from the head's own "
                "values, so nothing ties them to where answers end (raise max_new_tokens for the rollouts)",
                stacklevel=2,
            )
        if data.repeated:
            warnings.warn(
                f"{data.repeated} rollout records repeat earlier ones (the same prompt, sample index and "
                "tokens: two runs wrote into one file?); each copy counts in training",
                stacklevel=2,
            )
        gamma = config.gamma or gamma_from_lengths(data.gamma_lengths)
        try:  # checked as config.json is when read: refused now, not once trained and unloadable
            lenvm.config = dataclasses.replace(
                lenvm.config,
                gamma=gamma,
                generator=data.policy.get("generator"),
                sampling=data.policy.get("sampling"),
            )
        except InputError as err:
            raise InputError(
                f"the rollouts' generator and sampling go into the LenVM's config, which refuses them: {err}"
            ) from None
        sampled_by = lenvm.config.generator
        if config.freeze_backbone and sampled_by and not same_model(sampled_by, base):
            warnings.warn(
                f"the rollouts were sampled from {sampled_by}, the head reads {base}: it learns how long "
                f"{sampled_by}'s answers are from {base}'s hidden states",
                stacklevel=2,
            )
        config = dataclasses.replace(config, bf16=resolve_bf16(config.bf16, lenvm.device))
        # The model by its weights, not by how it is named: a trailing slash, a link, an alias and its
        # prepared folder are one model; a generator replaced or fine-tuned at the same path is another.
        model = weights_digest(lenvm.backbone)
        held = _examples_digest(data.eval)  # every held-out answer, not only how many
        # A stream trains in its file's order, held answers in a canonical one (ExampleStream): the
        # same records held in another file order are one run, and one features cache.
        held_train = data.train.held  # None when streamed
        records = data.fingerprint_data if held_train is None else [_examples_digest(held_train)]
        trained = _trained_settings(config, lenvm, gamma, source.streamed, eval_source is not None)
        run_fingerprint = fingerprint([*records, held, model, trained])
        # What the cached hidden states depend on: the data, the held-out split, the model and layer
        # (resolved: the default and that same layer named are one cache), and whether the answers
        # are streamed.
        features = [config.kind, lenvm.feature_layer, config.truncated, config.max_length, str(dtype)]
        features_fingerprint = fingerprint([*records, held, model, *features, source.streamed])

        def evaluate(values: list[np.ndarray]) -> dict[str, float]:
            return length_metrics(data.eval, values, gamma, data.baseline_length) if data.eval else {}

        started = time.perf_counter()
        trainer = trainer_type(lenvm, config, work, run_fingerprint, progress)
        fit = trainer.fit(data, evaluate, features_fingerprint)
        seconds_this_run = time.perf_counter() - started
        diverged = next((i for i, x in enumerate(fit.losses) if not math.isfinite(x)), None)
        if diverged is not None:
            raise InputError(
                f"training diverged: the loss was {fit.losses[diverged]} at step {diverged + 1} (learning "
                f"rate {config.lr:g}); nothing was saved to {out}: remove {work} and train with a lower --lr"
            )
        # Optimisation throughput (supervised positions per second of this run's training loop),
        # without the one-off hidden-state pass of head training.
        tokens_per_second = fit.tokens / fit.seconds if fit.seconds > 0 else 0.0
        metrics = evaluate(fit.eval_values)
        metrics["baseline_length"] = data.baseline_length
        result = TrainResult(
            out, gamma, metrics, data.report, fit.losses, seconds_this_run, tokens_per_second, fit.evaluations
        )
        if not is_main_process():
            return result
        lenvm.config.training = {
            **{k: v for k, v in dataclasses.asdict(config).items() if v is not None},
            "gamma": gamma,
            "data": data.report.to_dict(),
            "streamed": source.streamed,
            "train_completions": data.train_completions,
            "eval_completions": len(data.eval),
            "metrics": metrics,
            "seconds_this_run": round(seconds_this_run, 2),
            "tokens_per_second": round(tokens_per_second, 1),
            **({"distributed": fit.distributed} if fit.distributed else {}),
        }
        # The LenVM, its log and its plot land together: an interrupted run leaves no LenVM folder
        # that a rerun would refuse to resume into.
        refuse_to_replace(out, "training", lenvm=overwrite)  # again: nothing may have landed since
        with atomic_path(out) as tmp:
            lenvm.save_pretrained(tmp, state_dict=fit.state_dict)
            log = {"losses": fit.losses, "metrics": metrics, "evaluations": fit.evaluations}
            write_json(tmp / "training_log.json", log)
            plot_losses(fit.losses, tmp / "loss.png", config.loss)
        shutil.rmtree(work, ignore_errors=True)
        return result


def resolve_bf16(requested: bool | None, device: torch.device) -> bool:
    """Whether to train in bf16: ``requested`` when given, else where the hardware has it.

    A CUDA device that reports bf16 support, any other accelerator, and a CPU with native bf16
    instructions (AVX-512 BF16 or AMX) train in bf16; other CPUs emulate bf16 and run slower
    than float32, so they train in float32. Asking for bf16 on a CUDA device without it is an
    error.
    """
    device = torch.device(device)
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if requested and not supported:
            raise InputError(f"bf16 was asked for, but {torch.cuda.get_device_name(device)} lacks it")
    elif device.type == "cpu":
        supported = cpu_has_native_bf16()
    else:
        supported = True
    return supported if requested is None else requested


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of a model's weights (each tensor's name, shape, dtype and first and last
    values): another model, or the same one fine-tuned, gets another."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# What an example holds, without the rollout record it came from: the same answers read from
# another file order hash alike.
_EXAMPLE_CONTENT = [f.name for f in dataclasses.fields(Example) if f.name != "record"]


def _examples_digest(examples: list[Example]) -> str:
    """A short hash of ``examples``, in their order, by what they hold."""
    digest = hashlib.sha256()
    for e in examples:  # one at a time: no text of every token at once
        digest.update(json.dumps([getattr(e, name) for name in _EXAMPLE_CONTENT], default=str).encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive_run(out: Path, work: Path, features_cache: str | None) -> Iterator[None]:
    """Refuse a second run training into ``out`` (or with the same features cache) while this one
    does: it would truncate the hidden states this one reads and replace its LenVM."""
    if not is_main_process():  # the launched run's main process holds it for all
        yield
        return
    made = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as held:
            held.enter_context(RunLock(work, f"training into {out}"))
            if features_cache and Path(features_cache).resolve() != work.resolve():  # else held already
                Path(features_cache).mkdir(parents=True, exist_ok=True)
                held.enter_context(RunLock(features_cache, "training with this features cache"))
            yield
    finally:
        if made and work.is_dir() and not any(work.iterdir()):
            work.rmdir()  # refused before any work: leave nothing behind


def _trained_settings(
    config: TrainConfig, lenvm: LengthValueModel, gamma: float, streamed: bool, held_out_given: bool
) -> dict[str, Any]:
    """The settings of ``config`` (resolved) that can change what a run trains, for its
    checkpoint's fingerprint; a resumed run may change the others. Defaults enter as what they
    resolve to (the run's gamma, the layer and width of its head, whether it streams), so that a
    default and the same value named are one run."""
    settings = dataclasses.asdict(config)
    settings.update(
        gamma=gamma,
        feature_layer=lenvm.config.feature_layer,
        head_hidden_size=lenvm.config.head_hidden_size,
        stream=streamed,  # a stream is read in its file's order, held answers in a canonical one
    )
    ignored = {
        "features_cache",  # where the hidden states are kept, not what they are
        "checkpoint_every",  # when checkpoints are written and the held-out answers evaluated
        "gradient_checkpointing",  # recomputes the same activations in the backward pass
    }
    if config.freeze_backbone:
        ignored |= {"batch_size", "grad_accum", "shuffle_buffer"}  # fine-tuning's
    else:
        ignored.add("batch_tokens")  # head training's
        if not streamed:
            ignored.add("shuffle_buffer")  # held answers are permuted whole
    if held_out_given:
        ignored.add("eval_fraction")  # nothing is split off
    if config.loss != "huber":
        ignored.add("huber_delta")
    return {k: v for k, v in settings.items() if k not in ignored}


def _images(lenvm: LengthValueModel, examples: list[Example], device=None) -> dict[str, torch.Tensor]:
    """The forward keyword arguments with the pixel inputs of ``examples``' prompt images."""
    return forward_images(lenvm.tokenizer, examples, device or lenvm.device)


def is_main_process() -> bool:
    """False in the other processes of a launched run (accelerate, torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plot_losses(losses: list[float], path: Path, loss: str = "mse") -> None:
    import matplotlib.ticker

    fig, ax = subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, marker="o" if len(losses) == 1 else None)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # no step 1.5
    ax.set_ylabel(f"training loss ({loss}, value space)")
    ax.set_yscale("log")
    ax.set_title("LenVM training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def _marked(marker: Path) -> str | None:
    """The fingerprint a feature store's marker names; None where there is none to read (a store
    is then built again)."""
    try:
        return json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _check_resumable(work: Path, found: str | None, expected: str) -> None:
    """Refuse the checkpoint in ``work`` unless the run fingerprinted ``expected`` wrote it (its
    fingerprint ``found``). A fingerprint cannot tell another run from this one as another lenvm
    version fingerprinted it, so the message names both."""
    if found != expected:
        raise _unresumable(work)


def _refuse_the_other_paths_checkpoint(work: Path, other: type[HeadTrainer | FullTrainer]) -> None:
    """Refuse ``work`` holding what the training path this run does not take (``other``) keeps
    there: another run's checkpoint, which this one could not resume and would remove on finishing."""
    if any((work / name).exists() for name in other.KEEPS):
        raise _unresumable(work)


def _unresumable(work: Path) -> InputError:
    return InputError(
        f"{work} holds a checkpoint this run cannot resume: another training run's (other rollouts, "
        "model, training settings or number of processes), or one written by another lenvm version; "
        "remove it to start over"
    )


def _progress_record(step: int, epoch: float, loss: float, metrics: dict[str, float]) -> dict[str, float]:
    """One entry of the training log's ``evaluations``: held-out figures at a point of training."""
    return {
        "step": step,
        "epoch": epoch,
        "train_loss": loss,
        **{k: metrics[k] for k in PROGRESS_KEYS if k in metrics},
    }


def _progress_line(record: dict[str, float]) -> str:
    shown = [f"{k} {100 * v:.1f}%" for k, v in record.items() if k.startswith(("prompt_mre", "rel_error"))]
    return f"step {record['step']} (epoch {record['epoch']:g}): held-out " + ", ".join(shown)


class _Checkpoint:
    """One atomically replaced checkpoint file, valid only for the run that wrote it."""

    def __init__(self, work: Path, fingerprint: str):
        self.path = work / "checkpoint.pt"
        self.fingerprint = fingerprint

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        _check_resumable(self.path.parent, state.get("fingerprint"), self.fingerprint)
        return state

    def save(self, **state) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"fingerprint": self.fingerprint, **state}, tmp)


_ROW = np.dtype([("remaining", "<i4"), ("next_token", "<i4"), ("completion", "<i4")])


class FeatureStore:
    """The head's inputs for head training, on disk in the run's checkpoint folder.

    A row per supervised state, plus one for the state at the cut of each cut completion (its
    bootstrap state, never supervised); a completion's rows are contiguous. Per row, memory-mapped
    from files: the hidden vector (bf16), the tokens remaining (0 on a cut state's row), the token
    taken next (the q kind's target) and the completion's index. Per completion, in memory: its
    first row, number of states and whether it finished. So the store's memory is a few bytes per
    completion; rows stay on disk and the page cache keeps what fits. A complete store is reused
    when an interrupted run resumes.
    """

    def __init__(self, folder: Path):
        meta = json.loads((folder / "store.json").read_text())
        self.meta = meta
        self.hidden_size = meta["hidden_size"]
        self.features = np.memmap(folder / "features.bin", dtype=np.int16, mode="r").reshape(
            -1, self.hidden_size
        )
        self.rows = np.memmap(folder / "rows.bin", dtype=_ROW, mode="r")
        table = np.load(folder / "completions.npz")
        self.first_row, self.states, self.finished = table["first_row"], table["states"], table["finished"]
        self.train_completions = meta["train_completions"]

    @classmethod
    def open_or_build(
        cls, folder: Path, fingerprint: str, lenvm: LengthValueModel, train, evaluation, progress: bool
    ) -> FeatureStore:
        marker = folder / "store.json"
        if _marked(marker) == fingerprint:
            return cls(folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        first_row: list[int] = []
        states: list[int] = []
        finished: list[bool] = []
        rows = 0
        total = len(train) + len(evaluation)  # answers: known from the scan, so the bar has an ETA
        bar = tqdm(total=total, desc="hidden states", unit="answer", disable=not progress)
        with (folder / "features.bin").open("wb") as feats, (folder / "rows.bin").open("wb") as cols:

            def flush(chunk: list[tuple[int, Example]]) -> None:
                nonlocal rows
                ids, mask, _ = right_pad([e.input_ids for _, e in chunk], lenvm.device)
                with torch.no_grad():
                    hidden = lenvm.features(ids, mask, **_images(lenvm, [e for _, e in chunk]))
                for b, (index, e) in enumerate(chunk):
                    n = e.num_states
                    last = e.start + n + (0 if e.finished else 1)
                    block = hidden[b, e.start : last].to(torch.bfloat16).cpu()
                    feats.write(block.view(torch.int16).numpy().tobytes())
                    col = np.zeros(last - e.start, dtype=_ROW)
                    col["remaining"][:n] = np.arange(n, 0, -1)
                    col["next_token"][: n - 1] = e.input_ids[e.start + 1 : e.start + n]
                    col["completion"] = index
                    cols.write(col.tobytes())
                    first_row[index] = rows
                    rows += len(col)
                bar.update(len(chunk))

            def numbered(examples):
                for e in examples:
                    first_row.append(-1)
                    states.append(e.num_states)
                    finished.append(e.finished)
                    yield len(first_row) - 1, e

            train_rows_end = 0
            for part in (train, evaluation):
                # Sorted by length within bounded windows: little padding, bounded memory.
                for window in _windows(numbered(part), 1024):
                    chunk, tokens = [], 0
                    for index, e in sorted(window, key=lambda item: len(item[1].input_ids)):
                        chunk.append((index, e))
                        tokens += len(e.input_ids)
                        if tokens >= 8192:
                            flush(chunk)
                            chunk, tokens = [], 0
                    if chunk:
                        flush(chunk)
                if part is train:
                    train_rows_end, train_completions = rows, len(first_row)
        bar.close()
        np.savez(
            folder / "completions.npz",
            first_row=np.asarray(first_row, dtype=np.int64),
            states=np.asarray(states, dtype=np.int64),
            finished=np.asarray(finished, dtype=bool),
        )
        meta = {
            "fingerprint": fingerprint,
            "hidden_size": lenvm.config.hidden_size,
            "rows": rows,
            "train_rows_end": train_rows_end,
            "train_completions": train_completions,
        }
        write_json(folder / "store.json", meta)
        return cls(folder)

    def hidden(self, rows: np.ndarray, device) -> torch.Tensor:
        block = torch.from_numpy(np.ascontiguousarray(self.features[rows]))
        return block.view(torch.bfloat16).to(device).float()

    def train_rows(self) -> np.ndarray:
        """The supervised rows of the training completions (written before the held-out ones)."""
        return np.flatnonzero(self.rows["remaining"][: self.meta["train_rows_end"]] > 0)

    def spans(self, completions: range) -> list[np.ndarray]:
        """The supervised rows of each of ``completions``."""
        return [np.arange(self.first_row[c], self.first_row[c] + self.states[c]) for c in completions]


def _windows(items, size: int):
    window = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


class HeadTrainer:
    """Frozen backbone: cache the head's features once, then train the head on shuffled positions.

    TD(lambda) targets (``lam < 1``) are refreshed at the start of every epoch: one pass of the
    head over every training state's cached features gives ``V`` of every state, from which the
    lambda-correction of each state's target is computed (:func:`lenvm.returns.lambda_returns`)
    and held for the epoch. The bootstrap value at a cut, as with ``lam = 1``, comes from the
    current head at every step.
    """

    # What it keeps in the checkpoint folder: its checkpoint, and the hidden states (a store's own
    # files where the folder is named as the features cache).
    KEEPS = ("checkpoint.pt", "features", "features.bin")

    def __init__(
        self, lenvm: LengthValueModel, config: TrainConfig, work: Path, fingerprint: str, progress: bool
    ):
        self.lenvm, self.config, self.progress = lenvm, config, progress
        self.work, self.fingerprint = work, fingerprint
        self.checkpoint = _Checkpoint(work, fingerprint)
        self.correction: torch.Tensor | None = None

    def _autocast(self):
        return torch.autocast(self.lenvm.device.type, dtype=torch.bfloat16, enabled=bool(self.config.bf16))

    def _state_values(self, rows: np.ndarray) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.lenvm.values_from_hidden(self.store.hidden(rows, self.lenvm.device)).float()

    def targets(self, rows: np.ndarray) -> torch.Tensor:
        """The regression targets of the states ``rows`` (sorted), on the head's device: each
        state's discounted return, bootstrapped where its completion was cut from the current
        head's value at the cut, plus this epoch's TD(lambda) correction."""
        lenvm, store, device = self.lenvm, self.store, self.lenvm.device
        gamma = lenvm.gamma
        cols = store.rows[rows]
        remaining = torch.from_numpy(cols["remaining"].astype(np.float64))
        cut = torch.from_numpy(~store.finished[cols["completion"]])
        boot_values = torch.zeros(len(rows), device=device)  # unused where a completion finished
        if cut.any():
            at_cut = cut.numpy()
            boot_values[cut.to(device)] = self._state_values(rows[at_cut] + cols["remaining"][at_cut])
        mc = length_to_value(remaining, gamma).float().to(device)
        discount = torch.where(cut, gamma**remaining, 0.0).float().to(device)
        targets = mc + discount * boot_values
        if self.correction is not None:
            targets = targets + self.correction[torch.from_numpy(rows)].to(device)
        return targets

    def loss(self, rows: np.ndarray) -> torch.Tensor:
        """The loss of the positions ``rows`` (sorted); each batch goes to the head's device."""
        lenvm, store, config, device = self.lenvm, self.store, self.config, self.lenvm.device
        cols = store.rows[rows]
        completion = cols["completion"]
        remaining = torch.from_numpy(cols["remaining"])
        with self._autocast():
            hidden = store.hidden(rows, device)
            values = lenvm.values_from_hidden(hidden).float()
        targets = self.targets(rows)
        states = torch.from_numpy(store.states[completion])
        at_prompt = torch.from_numpy(cols["remaining"]) == states
        weights = state_weights(states, config.aggregation, at_prompt, config.prompt_weight).to(device)
        count = sampled_states_count(len(rows), self.train_states, self.train_completions, config.aggregation)
        loss = (self._state_losses(values, targets) * weights).sum() / count
        if lenvm.config.kind == "q":
            has_next = remaining > 1
            if has_next.any():
                on_device = has_next.to(device)
                # Q(s, x) for the token x taken is the value of the next state: its target.
                q_targets = self.targets(rows[has_next.numpy()] + 1)
                taken = torch.from_numpy(cols["next_token"][has_next.numpy()].astype(np.int64))
                with self._autocast():
                    q_values = (
                        lenvm.next_values_from_hidden(hidden[on_device], taken.to(device).unsqueeze(-1))
                        .squeeze(-1)
                        .float()
                    )
                q_count = sampled_states_count(
                    int(has_next.sum()), self.train_states, self.train_completions, config.aggregation
                )
                loss = loss + (self._state_losses(q_values, q_targets) * weights[on_device]).sum() / q_count
        return loss

    def _state_losses(self, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = self.config
        return state_losses(values, targets, self.lenvm.gamma, c.loss, c.huber_delta, c.relative_loss_weight)

    def refresh_targets(self) -> None:
        """The lambda-correction of every training state's target, from the current head."""
        store, gamma = self.store, self.lenvm.gamma
        end = int(store.meta["train_rows_end"])
        values = torch.cat(
            [self._state_values(np.arange(a, min(a + 65_536, end))).cpu() for a in range(0, end, 65_536)]
        )
        correction = torch.zeros(end)
        width = int(store.states[: store.train_completions].max()) + 1  # states and the one after
        per_chunk = max(1, 2**20 // width)
        offsets = np.arange(width)
        for start in range(0, store.train_completions, per_chunk):
            chunk = np.arange(start, min(start + per_chunk, store.train_completions))
            first, n, finished = store.first_row[chunk], store.states[chunk], store.finished[chunk]
            within = offsets[None, :] < (n + ~finished)[:, None]  # a cut one's last row: its cut
            index = torch.from_numpy(np.where(within, first[:, None] + offsets[None, :], first[:, None]))
            supervised = torch.from_numpy(offsets[None, :] < n[:, None])
            steps = torch.from_numpy((n[:, None] - offsets[None, :]).clip(min=0).astype(np.float64))
            cut = torch.from_numpy(~finished)
            mc = torch.where(supervised, length_to_value(steps, gamma), 0.0).float()
            discount = torch.where(supervised & cut[:, None], gamma**steps, 0.0).float()
            chunk_values = values[index]
            boot = torch.where(cut, chunk_values[torch.arange(len(chunk)), torch.from_numpy(n)], 0.0)
            full = mc + discount * boot[:, None]
            lam = lambda_returns(mc, discount, boot, chunk_values, supervised, gamma, self.config.lam)
            correction[index[supervised]] = (lam - full)[supervised]
        self.correction = correction

    def eval_values(self, count: int) -> list[np.ndarray]:
        store = self.store
        out = []
        for span in store.spans(range(store.train_completions, store.train_completions + count)):
            out.append(self._state_values(span).cpu().numpy())
        return out

    def fit(self, data: TrainingData, evaluate, features_fingerprint: str) -> _Fit:
        config, lenvm = self.config, self.lenvm
        state = self.checkpoint.load()  # before any work: another run's checkpoint is refused
        folder = Path(config.features_cache) if config.features_cache else self.work / "features"
        self.store = FeatureStore.open_or_build(
            folder, features_fingerprint, lenvm, data.train, data.eval, self.progress
        )
        self.train_states, self.train_completions = data.train_states, data.train_completions
        train_rows = torch.from_numpy(self.store.train_rows())
        steps_per_epoch = max(1, math.ceil(len(train_rows) / config.batch_tokens))
        epochs = cast(int, config.epochs)  # train() resolves the kind's default
        total = steps_per_epoch * epochs
        params = lenvm.head.parameters()
        lr = cast(float, config.lr)  # train() resolves the kind's default
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
        scheduler = cosine_schedule(optimizer, total, config.warmup_ratio)
        losses: list[float] = []
        evaluations: list[dict[str, float]] = []
        start_epoch = 0
        if state is not None:
            lenvm.head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            losses, start_epoch, evaluations = state["losses"], state["epoch"], state.get("evaluations", [])
        bar = tqdm(
            total=total,
            initial=start_epoch * steps_per_epoch,
            desc="training head",
            unit="step",
            disable=not self.progress,
        )
        tokens = 0
        started = time.perf_counter()
        for epoch in range(start_epoch, epochs):
            if config.lam < 1.0:
                lenvm.head.eval()
                self.refresh_targets()
            lenvm.head.train()
            shuffle = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            order = train_rows[torch.randperm(len(train_rows), generator=shuffle)]
            for batch_rows in order.split(config.batch_tokens):
                loss = self.loss(np.sort(batch_rows.numpy()))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                tokens += len(batch_rows)
                bar.set_postfix(
                    loss=f"{losses[-1]:.2e}",
                    tok_s=f"{tokens / (time.perf_counter() - started):.0f}",
                    refresh=False,  # the update redraws, at most every tenth of a second
                )
                bar.update()
            lenvm.head.eval()
            if data.eval:
                record = _progress_record(
                    len(losses),
                    epoch + 1,
                    float(np.mean(losses[-steps_per_epoch:])),
                    evaluate(self.eval_values(len(data.eval))),
                )
                evaluations.append(record)
                if self.progress:
                    tqdm.write(_progress_line(record), file=sys.stderr)
            self.checkpoint.save(
                head=lenvm.head.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                losses=losses,
                epoch=epoch + 1,
                evaluations=evaluations,
            )
        bar.close()
        seconds = time.perf_counter() - started
        lenvm.head.eval()
        return _Fit(losses, self.eval_values(len(data.eval)), tokens, seconds, evaluations)


def _fsdp_on_cpu(accelerator) -> None:
    """Turn a CPU (gloo) process group into an FSDP2 one, as the launch configuration asked.

    ``accelerate`` (1.x) enables its FSDP plugin only for accelerator process groups: on CPU
    processes (``DistributedType.MULTI_CPU``) it drops the plugin and ``prepare`` wraps the
    model in DDP. torch's FSDP2 (``fully_shard``) itself runs on CPU tensors over gloo, so
    the state is switched to FSDP with the plugin the launcher's environment describes, and
    every later step (``prepare``, ``accumulate``, ``clip_grad_norm_``, ``save_state``,
    ``get_state_dict``) takes accelerate's own FSDP2 path.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # an accelerator group (FSDP already) or a single process (nothing to shard)
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise InputError(
            "on CPUs lenvm runs FSDP2 only (fsdp_version: 2, as in the shipped fsdp configuration)"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


class FullTrainer:
    """Full fine-tuning of a standalone LenVM with ``accelerate``.

    TD(lambda) targets come from the model's own values, detached, in the same forward pass.
    """

    # What it keeps in the checkpoint folder: its step, accelerate's state, the next checkpoint staged.
    KEEPS = ("state.json", "accelerate", "staging")

    def __init__(
        self, lenvm: LengthValueModel, config: TrainConfig, work: Path, run_fingerprint: str, progress: bool
    ):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState

        self.lenvm, self.config, self.work = lenvm, config, work
        if PartialState._shared_state and PartialState().num_processes == 1:
            # accelerate keeps one state per process and refuses another precision for a second
            # run in the same session (a notebook); one process has no group to keep: start afresh.
            AcceleratorState._reset_state()
        accelerated = torch.accelerator.is_available()
        if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not accelerated:
            raise InputError(
                "DEEPSPEED was asked for, but there is no GPU: accelerate starts DeepSpeed only on "
                "accelerators. On CPUs use the ddp or fsdp configuration."
            )
        # Without an accelerator, say cpu=True so that several launched processes still form
        # a (gloo) process group instead of each training alone.
        self.accelerator = Accelerator(
            mixed_precision="bf16" if config.bf16 else "no",
            cpu=not accelerated,
            gradient_accumulation_steps=config.grad_accum,
        )
        if os.environ.get("ACCELERATE_USE_FSDP") == "true":
            _fsdp_on_cpu(self.accelerator)
        # The process count deals out each step's completions (windows): a step saved under another
        # count stands for other batches. (Head training takes no part of its batches from it.)
        self.fingerprint = fingerprint([run_fingerprint, self.accelerator.num_processes])
        self.progress = progress and self.accelerator.is_main_process

    def windows(self, train, epoch: int):
        """This process's micro-batches for each optimizer step of ``epoch``.

        Completions are shuffled across prompts with a seed shared by all processes (each reads
        the whole stream), then dealt out so that every process gets ``grad_accum`` micro-batches
        of ``batch_size`` per step; completions left over after the last full step wait for
        another epoch's shuffle.
        """
        acc, config = self.accelerator, self.config
        per_step = config.batch_size * config.grad_accum * acc.num_processes
        steps = len(train) // per_step
        chunk: list[Example] = []
        for e in shuffled(train, [config.seed, epoch], config.shuffle_buffer):
            chunk.append(e)
            if len(chunk) < per_step:
                continue
            mine = chunk[acc.process_index :: acc.num_processes]
            yield [mine[i : i + config.batch_size] for i in range(0, len(mine), config.batch_size)]
            chunk = []
            steps -= 1
            if steps == 0:
                return

    def micro_loss(self, model, batch: Batch, images: dict | None = None) -> torch.Tensor:
        """The weighted sum of the per-state losses of one micro-batch; ``images``: the rows'
        pixel inputs as forward keyword arguments."""
        config = self.config
        gamma = self.lenvm.gamma
        values = model(batch.input_ids, batch.attention_mask, **(images or {})).float()
        boot = values.gather(1, batch.boot_index[:, None]).squeeze(1).detach()
        targets = lambda_returns(batch.mc, batch.discount, boot, values, batch.supervised, gamma, config.lam)
        losses = state_losses(
            values, targets, gamma, config.loss, config.huber_delta, config.relative_loss_weight
        )
        at_prompt = batch.supervised & (batch.supervised.cumsum(1) == 1)
        weights = state_weights(batch.states[:, None], config.aggregation, at_prompt, config.prompt_weight)
        return (losses * weights)[batch.supervised].sum()

    @torch.no_grad()
    def eval_values(self, model, eval_set: list[Example]) -> list[np.ndarray]:
        """Every process runs the same forwards (a sharded model needs all of them)."""
        model.eval()
        out = []
        for e in eval_set:
            device = self.accelerator.device
            values = model(torch.tensor([e.input_ids], device=device), **_images(self.lenvm, [e], device))
            out.append(values[0, e.start : e.start + e.num_states].float().cpu().numpy())
        model.train()
        return out

    def fit(self, data: TrainingData, evaluate, features_fingerprint: str | None = None) -> _Fit:
        acc, config, lenvm = self.accelerator, self.config, self.lenvm
        gamma = lenvm.gamma
        per_step = config.batch_size * config.grad_accum * acc.num_processes
        steps_per_epoch = data.train_completions // per_step
        if steps_per_epoch == 0:
            raise InputError(
                f"one optimizer step takes batch_size x grad_accum x processes = {per_step} completions, "
                f"but there are {data.train_completions} to train on; lower the batch size"
            )
        epochs = cast(int, config.epochs)  # train() resolves the kind's default
        total = steps_per_epoch * epochs
        if acc.is_main_process and (self.work / "staging" / "state.json").is_file():
            self._move_staged()  # save() was interrupted while it moved a whole checkpoint into place
        acc.wait_for_everyone()
        state_file = self.work / "state.json"
        saved = json.loads(state_file.read_text()) if state_file.is_file() else None
        if saved is not None:  # before any work: another run's checkpoint is refused
            _check_resumable(self.work, saved.get("fingerprint"), self.fingerprint)
        if config.gradient_checkpointing:
            backbone = lenvm.backbone
            # Its name from transformers 5.x (which older 5.x releases lack: read whether it is there).
            if (enable := getattr(backbone, "activation_checkpointing_enable", None)) is not None:
                enable({"use_reentrant": False})
            else:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lr = cast(float, config.lr)  # train() resolves the kind's default
        optimizer = torch.optim.AdamW(lenvm.trainable_parameters(), lr=lr, weight_decay=config.weight_decay)
        scheduler = cosine_schedule(optimizer, total, config.warmup_ratio)
        if acc.state.deepspeed_plugin is not None:
            # Without a prepared data loader, DeepSpeed's micro-batch size must be given.
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        model, optimizer = acc.prepare(lenvm, optimizer)
        distributed = self.layout(model)
        acc.register_for_checkpointing(scheduler)
        step, losses, evaluations = 0, [], []
        if saved is not None:
            acc.load_state(str(self.work / "accelerate"))
            step, losses, evaluations = saved["step"], saved["losses"], saved.get("evaluations", [])
        bar = tqdm(total=total, initial=step, desc="fine-tuning", unit="step", disable=not self.progress)
        tokens = 0
        started = time.perf_counter()
        model.train()

        def log_evaluation(epoch: float) -> list[np.ndarray]:
            values = self.eval_values(model, data.eval)
            if data.eval:
                recent = float(np.mean(losses[-steps_per_epoch:]))
                evaluations.append(_progress_record(step, round(epoch, 3), recent, evaluate(values)))
                if self.progress:
                    tqdm.write(_progress_line(evaluations[-1]), file=sys.stderr)
            return values

        for epoch in range(step // steps_per_epoch, epochs):
            for index, window in enumerate(self.windows(data.train, epoch)):
                if epoch * steps_per_epoch + index < step:
                    continue  # done before the interruption
                batches = [
                    collate(m, gamma, lenvm.tokenizer.pad_token_id or 0).to(acc.device) for m in window
                ]
                images = [_images(lenvm, m, acc.device) for m in window]
                # The aggregated loss of the effective batch: each micro-batch's weighted sum over
                # the count across all processes and micro-batches (lenvm.losses). DDP averages
                # gradients over processes and accelerate divides by grad_accum: undo both.
                local = sum(
                    aggregation_count(int(b.supervised.sum()), len(b.states), config.aggregation)
                    for b in batches
                )
                count = float(acc.reduce(torch.tensor(float(local), device=acc.device), "sum"))
                scale = acc.num_processes * config.grad_accum / max(count, 1e-12)
                step_loss = 0.0
                for batch, pixels in zip(batches, images, strict=True):
                    with acc.accumulate(model):
                        weighted = self.micro_loss(model, batch, pixels)
                        acc.backward(weighted * scale)
                    step_loss += weighted.item() / max(count, 1e-12)
                acc.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += int(sum(int(b.supervised.sum()) for b in batches))
                losses.append(float(acc.reduce(torch.tensor(step_loss, device=acc.device), "sum")))
                bar.set_postfix(
                    loss=f"{losses[-1]:.2e}",
                    tok_s=f"{tokens / (time.perf_counter() - started):.0f}",
                    refresh=False,  # the update redraws, at most every tenth of a second
                )
                bar.update()
                if step % config.checkpoint_every == 0 and step < total:
                    log_evaluation(step / steps_per_epoch)
                    self.save(step, losses, evaluations)
            # An epoch that ended on a checkpoint was evaluated there: once per step, resumed or not.
            if step < total and not (evaluations and evaluations[-1]["step"] == step):
                log_evaluation(epoch + 1)
        bar.close()
        seconds = time.perf_counter() - started
        eval_values = log_evaluation(epochs)
        state_dict = acc.get_state_dict(model)
        acc.wait_for_everyone()
        return _Fit(losses, eval_values, tokens, seconds, evaluations, state_dict, distributed)

    def layout(self, model) -> dict[str, Any]:
        """How the prepared model is spread: the engine, the process count and the parameters
        this process holds (a shard of each under FSDP and ZeRO-3, all of them otherwise)."""
        from torch.distributed.tensor import DTensor

        def held(p) -> int:
            if isinstance(p, DTensor):  # FSDP2
                return p.to_local().numel()
            return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()  # ZeRO-3

        acc = self.accelerator
        return {
            "type": acc.distributed_type.value,
            "processes": acc.num_processes,
            "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
            "parameters_on_main_process": sum(held(p) for p in model.parameters()),
        }

    def save(self, step: int, losses: list[float], evaluations: list[dict[str, float]]) -> None:
        """Accelerate state plus our step counter, staged whole in the checkpoint folder, then moved
        into place there. The folder itself stays: the run's lock is held on it."""
        acc = self.accelerator
        staging = self.work / "staging"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging / "accelerate"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "fingerprint": self.fingerprint,
                "step": step,
                "losses": losses,
                "evaluations": evaluations,
            }
            write_text(staging / "state.json", json.dumps(state))  # last: the staged checkpoint is whole
            self._move_staged()
        acc.wait_for_everyone()

    def _move_staged(self) -> None:
        """Replace the checkpoint with the whole one staged, or finish doing so. ``state.json`` goes
        first and comes back last, so that one in the folder always stands beside its whole
        accelerate state."""
        staging = self.work / "staging"
        (self.work / "state.json").unlink(missing_ok=True)
        if (staging / "accelerate").exists():
            shutil.rmtree(self.work / "accelerate", ignore_errors=True)
            os.replace(staging / "accelerate", self.work / "accelerate")
        os.replace(staging / "state.json", self.work / "state.json")
        shutil.rmtree(staging)
