"""Models stay where the caller put them: a generator handed to a LenVM or to training keeps its
device and dtype, and the head joins it there. The meta device stands in for an accelerator on
a CPU-only machine: anything moved to the CPU behind the caller's back shows up as a change."""

import pytest
import torch
from conftest import synthetic_records

from lenvm import LengthValueModel, TrainConfig, load_generator, train


def _placement(model):
    return {name: (p.device, p.dtype) for name, p in model.named_parameters()}


def _meta_generator(tiny_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lenvm.hub import load_tokenizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_path))
    return model, load_tokenizer(tiny_path)


@pytest.mark.parametrize("kind", ["attached", "q"])
def test_a_meta_generator_stays_on_meta_and_the_head_joins_it(tiny_path, kind):
    generator = _meta_generator(tiny_path)
    before = _placement(generator[0])
    lenvm = LengthValueModel.from_base(tiny_path, kind=kind, generator=generator)
    assert _placement(generator[0]) == before
    assert {p.device.type for p in lenvm.head.parameters()} == {"meta"}
    assert lenvm.device.type == "meta"


def test_a_standalone_backbone_loads_on_the_device_asked_for(tiny_path):
    lenvm = LengthValueModel.from_base(tiny_path, kind="standalone", device="meta", dtype="bfloat16")
    assert {(p.device.type, p.dtype) for p in lenvm.backbone.parameters()} == {("meta", torch.bfloat16)}
    assert {(p.device.type, p.dtype) for p in lenvm.head.parameters()} == {("meta", torch.float32)}


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta weights hold no data
def test_a_standalone_lenvm_loads_beside_the_generator(tiny_path, tmp_path):
    LengthValueModel.from_base(tiny_path, kind="standalone").save_pretrained(tmp_path / "lenvm")
    generator = _meta_generator(tiny_path)
    lenvm = LengthValueModel.from_pretrained(tmp_path / "lenvm", generator=generator)
    assert lenvm.device.type == "meta"  # the generator's device, not the default one


def test_training_leaves_a_half_precision_generator_as_it_was(tiny_path, tmp_path):
    model, tokenizer = load_generator(tiny_path, dtype=torch.bfloat16)
    before = _placement(model)
    records = synthetic_records(tokenizer, n_per_prompt=2)
    config = TrainConfig(kind="attached", epochs=2, eval_fraction=0.25)
    train(records, str(tiny_path), tmp_path / "lenvm", config, generator=(model, tokenizer), progress=False)
    assert _placement(model) == before
    lenvm = LengthValueModel.from_pretrained(tmp_path / "lenvm", generator=(model, tokenizer))
    assert _placement(model) == before and lenvm.backbone is model
    assert next(lenvm.head.parameters()).dtype == torch.float32
