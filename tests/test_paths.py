"""ds_configs/ and configs/models/ are found in one place: the checkout's top-level folders, else the copies an
installed wheel carries inside the package."""

from dist_subspace.core import paths


def test_a_checkout_uses_its_top_level_folders():
    assert paths.DS_CONFIGS == paths.CHECKOUT / "ds_configs"
    assert paths.MODEL_CONFIGS == paths.CHECKOUT / "configs" / "models"
    assert {p.name for p in paths.DS_CONFIGS.glob("*.json")} >= {"zero2.json", "zero3_bf16.json", "zero3_offload.json"}


def test_an_installed_package_uses_the_copies_inside_it(tmp_path, monkeypatch):
    """Installed, the package's parent is site-packages (no ds_configs/ there): the shipped copies are used, and
    they hold the same files (the wheel's own packaging of them is checked by hand: see docs/launching.md)."""
    monkeypatch.setattr(paths, "CHECKOUT", tmp_path)
    ds, models = paths.shipped("ds_configs"), paths.shipped("configs", "models")
    assert (
        ds == paths.PACKAGE / "_shipped" / "ds_configs" and models == paths.PACKAGE / "_shipped" / "configs" / "models"
    )
    assert sorted(p.name for p in ds.glob("*.json")) == sorted(p.name for p in paths.DS_CONFIGS.glob("*.json"))
    assert sorted(p.name for p in models.glob("*.json")) == sorted(p.name for p in paths.MODEL_CONFIGS.glob("*.json"))
