def test_dir_lists_the_lazy_names_and_what_the_package_holds():
    """Tab completion shows the names that load on first use and the submodules imported."""
    import lenvm
    import lenvm.decoding

    listed = dir(lenvm)
    assert listed == sorted(listed)
    assert set(lenvm.__all__) <= set(listed)
    assert {"decoding", "__file__", "__doc__"} <= set(listed)
    assert {"params", "SamplingParams"} <= set(dir(lenvm.decoding))
