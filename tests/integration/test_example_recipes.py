"""The example recipes check against the installed plugins (kinds, options, condition counts)."""
import pytest

from zmagic_core.plugins.registry import Registry


@pytest.mark.parametrize("name", ["celebahq_low_memory", "sd_text_style", "sd_text_style_low_memory"])
def test_example_recipes_check_with_the_installed_plugins(name):
    from pathlib import Path

    from zmagic_core.assembly.build import load_recipe

    reg = Registry()
    path = Path(__file__).resolve().parents[2] / "examples" / "models" / f"{name}.yaml"
    recipe = load_recipe(path, overrides=["device=cpu"], check=False)
    assert {c.kind for c in recipe.conditions} <= set(reg.names("energy"))  # the plugins `make test` installs
    load_recipe(path, overrides=["device=cpu"], registry=reg)  # kinds, options and condition counts
