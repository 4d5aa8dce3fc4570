from __future__ import annotations

import importlib
import inspect
import pkgutil

import secure_channel


def test_all_is_complete() -> None:
    """Every public class and function defined in the package's modules is exported."""
    defined: set[str] = set()
    for info in pkgutil.iter_modules(secure_channel.__path__):
        module = importlib.import_module(f"secure_channel.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if obj.__module__ == module.__name__:
                defined.add(name)
    assert defined - set(secure_channel.__all__) == set()


def test_all_names_resolve() -> None:
    for name in secure_channel.__all__:
        assert hasattr(secure_channel, name), name
