"""The vision-language path, timed: rollouts with images, training every kind, prediction and
guided decoding, on generated shape images (:func:`lenvm.testing.shape_images`).

By default the generator is a tiny random Qwen2.5-VL built into the results folder
(:func:`lenvm.testing.tiny_vlm`): the figures are the cost of lenvm's own machinery around a
vision-language model (image loading and processing, multimodal positions, pixel inputs in the
streams and in training), not of a real model. ``--model`` names a real one (a folder or hub id of
the Qwen2-VL family) instead. Each stage's result is logged as it finishes and a rerun with the
same settings skips the stages done.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenvm.bench.common import WARMUP_TOKENS, Run, markdown_table
from lenvm.cli import options

if TYPE_CHECKING:  # the model loads with the benchmark, not with the command line
    from lenvm.model import Kind

TABLE = "table.md"
TINY = "tiny-vlm"  # --model default: a tiny random Qwen2.5-VL built in the results folder
# --model's default and help (the generator-loading flags of `lenvm bench`, see lenvm.cli)
MODEL_FLAG = (
    TINY,
    "vision-language generator: folder or hub id (default: a tiny random Qwen2.5-VL, built here)",
)
KINDS: tuple[Kind, ...] = ("attached", "q", "standalone")


def run_vision(
    out: str | os.PathLike,
    *,
    model: str = TINY,
    images: int = 32,
    n: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    target: int = 16,
    epochs: int = 2,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Time each stage of the vision-language path and write ``results.json`` and ``table.md``."""
    from lenvm import vision
    from lenvm.dataset import held_out_prompts
    from lenvm.decoding import Control, Engine, Request, SamplingParams
    from lenvm.hub import load_generator
    from lenvm.io import InputError
    from lenvm.model import LengthValueModel
    from lenvm.prompts import read_prompts
    from lenvm.rollouts import rollout
    from lenvm.testing import shape_images, tiny_vlm
    from lenvm.training import TrainConfig, train

    # Checked before sampling: a training batch or target these samples cannot meet failed only
    # after the rollouts.
    held_out = len(held_out_prompts([str(i) for i in range(images)], TrainConfig.eval_fraction))
    if (images - held_out) * n < batch_size:
        raise InputError(
            f"batch size {batch_size} is more than the {(images - held_out) * n} completions training gets "
            f"({images} images less {held_out} held out, x {n}): lower it, or raise images or n"
        )
    if (why := Control("equal_to", target=target).unreachable(max_new_tokens)) is not None:
        raise InputError(why)
    settings = {"model": model, "images": images, "n": n, "max_new_tokens": max_new_tokens}
    settings.update(batch_size=batch_size, target=target, epochs=epochs, dtype=dtype)
    with Run(out, settings) as run:
        root = Path(out)
        location = str(tiny_vlm(root / "tiny-vlm", eos_logit=3.0)) if model == TINY else model
        prompts_file = shape_images(root / "shapes", n=images)
        generator = load_generator(location, device=device, dtype=dtype)
        prompts = read_prompts(prompts_file)
        sampling = SamplingParams(max_new_tokens=max_new_tokens, seed=0)
        warmed = False

        def stage(key: str, work) -> dict[str, Any]:
            nonlocal warmed
            if key not in run.done:
                if not warmed:
                    # As `lenvm bench speed` does: one short untimed decode over images first, so
                    # that one-off costs (lazy imports, the image processor's first call,
                    # allocations) are not timed as the first stage's.
                    short = SamplingParams(max_new_tokens=min(WARMUP_TOKENS, max_new_tokens), seed=0)
                    _decode(Engine(*generator), [Request(p, short) for p in prompts[:batch_size]], batch_size)
                    warmed = True
                started = time.perf_counter()
                figures = work()
                run.add([{"key": key, "seconds": round(time.perf_counter() - started, 3), **figures}])
            return run.done[key]

        def rollouts() -> dict[str, Any]:
            s = rollout(
                generator, prompts, run.path("rollouts.jsonl"), n, sampling, batch_size, progress=progress
            )
            return {
                "completions": s.completions_written,
                "tokens": s.tokens_generated,
                "finished": s.finished,
            }

        def encode() -> dict[str, Any]:
            encoded = [vision.encode(generator[1], p) for p in prompts]
            return {"prompts": len(encoded), "image_tokens": sum(e.image_tokens for e in encoded)}

        rows = [stage("encode prompts (load and process images)", encode), stage("rollouts", rollouts)]

        def training(kind: Kind):
            def work() -> dict[str, Any]:
                config = TrainConfig(
                    kind=kind, epochs=epochs if kind != "standalone" else 1, batch_size=batch_size, bf16=False
                )
                shared = generator if kind != "standalone" else None
                result = train(
                    run.path("rollouts.jsonl"),
                    location,
                    run.path(f"lenvm-{kind}"),
                    config,
                    generator=shared,
                    progress=progress,
                    device=device,
                    dtype=dtype,
                    overwrite=True,  # a resumed run trains a kind again
                )
                return {"positions_per_second": round(result.tokens_per_second), "epochs": config.epochs}

            return work

        rows += [stage(f"train {kind}", training(kind)) for kind in KINDS]
        lenvms = {
            kind: LengthValueModel.from_pretrained(
                run.path(f"lenvm-{kind}"), generator=generator, dtype=dtype
            )
            for kind in KINDS
        }
        rows += [stage(f"predict {kind}", lambda k=kind: _predict(lenvms[k], prompts)) for kind in KINDS]
        requests = [Request(p, sampling, control=Control("equal_to", target=target)) for p in prompts]
        plain = [Request(p, sampling) for p in prompts]
        rows.append(stage("decode plain", lambda: _decode(Engine(*generator), plain, batch_size)))
        for kind in KINDS:
            engine = Engine(*generator, lenvm=lenvms[kind])
            rows.append(stage(f"decode equal_to {kind}", lambda e=engine: _decode(e, requests, batch_size)))
        results = {
            "benchmark": "vision",
            "settings": settings,
            "image_tokens_per_prompt": rows[0]["image_tokens"] / rows[0]["prompts"],
            "stages": rows,
        }
        run.write_json("results.json", results)
        run.write_text(TABLE, _markdown(results))
    return results


def _predict(lenvm, prompts) -> dict[str, Any]:
    lengths = lenvm.predict_length(prompts)
    return {"prompts": len(lengths)}


def _decode(engine, requests, batch_size: int) -> dict[str, Any]:
    results = engine.generate(requests, batch_size=batch_size)
    return {"requests": len(results), "tokens": sum(r.decoded_tokens for r in results)}


def _markdown(results: dict[str, Any]) -> str:
    rows = []
    for s in results["stages"]:
        if "tokens" in s:
            rate = f"{s['tokens'] / s['seconds']:.0f} tokens/s ({s['tokens']} tokens)"
        elif "positions_per_second" in s:
            rate = f"{s['positions_per_second']:,} positions/s (optimisation, {s['epochs']} epochs)"
        else:
            rate = f"{s['prompts'] / s['seconds']:.0f} prompts/s"
        rows.append((s["key"], f"{s['seconds']:.2f}", rate))
    head = f"{results['image_tokens_per_prompt']:.1f} image tokens per prompt on average\n\n"
    return head + markdown_table(["stage", "seconds", "throughput"], rows)


def add_arguments(p) -> None:
    p.add_argument(
        "--images", type=options.positive_int, default=32, help="generated shape images (one prompt each)"
    )
    p.add_argument("--n", type=options.positive_int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=options.positive_int, default=32, help="longest answer")
    p.add_argument(
        "--batch-size",
        type=options.positive_int,
        default=8,
        help="answers decoded together, and completions per training step",
    )
    p.add_argument(
        "--target", type=options.positive_int, default=16, help="Equal To target of guided decoding"
    )
    p.add_argument(
        "--epochs", type=options.positive_int, default=2, help="head training epochs (fine-tuning: 1)"
    )


def main(args) -> None:
    run_vision(
        args.out,
        model=args.model,
        images=args.images,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        target=args.target,
        epochs=args.epochs,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )
