import pytest


def test_dir_lists_the_lazy_names_and_what_the_package_holds():
    """Tab completion shows the names that load on first use and the submodules imported."""
    import lenvm
    import lenvm.decoding

    listed = dir(lenvm)
    assert listed == sorted(listed)
    assert set(lenvm.__all__) <= set(listed)
    assert {"decoding", "__file__", "__doc__"} <= set(listed)
    assert {"params", "SamplingParams"} <= set(dir(lenvm.decoding))


@pytest.mark.parametrize("module", ["lenvm.hub", "lenvm.rollouts", "lenvm.calibration"])
def test_import_star_binds_the_public_names_and_not_the_hints_stand_ins(module):
    import torch

    names: dict = {"torch": torch, "model": "mine"}
    exec(f"from {module} import *", names)
    assert names["torch"] is torch and names["model"] == "mine"
    assert not {"transformers", "np", "LazyModule", "InputError"} & names.keys()
