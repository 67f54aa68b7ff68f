"""Each module's __all__ names exactly its public definitions."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import adapters
import persona
import training


def modules():
    for package in (persona, adapters, training):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            yield info.name


@pytest.mark.parametrize("name", sorted(modules()))
def test_all_is_complete_and_valid(name: str):
    module = importlib.import_module(name)
    declared = getattr(module, "__all__", None)
    if declared is None:
        pytest.skip("no __all__")
    assert all(hasattr(module, item) for item in declared), "names in __all__ that do not exist"
    defined_here = {
        item for item, value in vars(module).items()
        if not item.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == name
    }
    missing = defined_here - set(declared)
    assert not missing, f"public but not in __all__: {sorted(missing)}"
