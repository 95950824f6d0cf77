"""The public API's type hints resolve at run time, as tools that validate or document calls
(``typing.get_type_hints``, ``inspect.get_annotations(eval_str=True)``) read them."""

import inspect
import subprocess
import sys
import types
import typing

import pytest

import lenvm
import lenvm.decoding


def public_callables() -> list[tuple[str, object]]:
    """Every exported name that takes a call, and each public method (properties included) of
    the exported classes and of their lenvm base classes."""
    found = []
    for package in (lenvm, lenvm.decoding):
        for name in package.__all__:
            obj = getattr(package, name)
            if not callable(obj):
                continue
            found.append((f"{package.__name__}.{name}", obj))
            if not inspect.isclass(obj):
                continue
            for klass in obj.__mro__:
                if not klass.__module__.startswith("lenvm."):
                    continue
                for attribute, member in vars(klass).items():
                    if attribute.startswith("_") and attribute not in ("__init__", "__call__"):
                        continue
                    member = member.fget if isinstance(member, property) else member
                    member = getattr(member, "__func__", member)  # staticmethod, classmethod
                    if callable(member):
                        found.append((f"{package.__name__}.{name}.{attribute}", member))
    return found


def hinted_types(hint: object) -> list[object]:
    """``hint`` and, for a generic (``tuple[A, B | None]``), every type inside it."""
    return [hint, *(inner for arg in typing.get_args(hint) for inner in hinted_types(arg))]


PUBLIC = public_callables()


def test_the_walk_covers_the_api():
    names = {name for name, _ in PUBLIC}
    assert {"lenvm.load_generator", "lenvm.calibrate", "lenvm.LengthValueModel.sampling_params"} <= names
    assert len(PUBLIC) > 100


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_every_hint_of_the_public_api_resolves(name, obj):
    hints = typing.get_type_hints(obj)
    if not inspect.isclass(obj):  # a class's own annotations leave out its bases'
        inspect.get_annotations(obj, eval_str=True)
    modules = [t for hint in hints.values() for t in hinted_types(hint) if isinstance(t, types.ModuleType)]
    assert not modules, f"{name}: a hint names a module, not one of its types: {modules}"


def test_hints_name_the_real_types():
    import torch
    import transformers

    from lenvm.model import LengthValueModel

    assert (
        typing.get_type_hints(lenvm.load_generator)["return"]
        == tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]
    )
    assert typing.get_type_hints(lenvm.rollout)["device"] == str | torch.device | None
    assert typing.get_type_hints(lenvm.calibrate)["lenvm"] is LengthValueModel
    assert typing.get_type_hints(lenvm.train_end_head)["lenvm"] is LengthValueModel


def test_resolvable_hints_leave_the_light_modules_light():
    """Modules the command line starts with name torch's and transformers' types in their hints
    without importing them."""
    code = (
        "import sys, lenvm.hub, lenvm.rollouts, lenvm.cli\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
