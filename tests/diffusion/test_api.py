"""The public API of lambda_split.diffusion is exactly its __all__."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import lambda_split.diffusion as diffusion


def test_all_is_complete_and_resolves() -> None:
    exported = set(diffusion.__all__)
    assert all(getattr(diffusion, name) is not None for name in exported)
    missing = []
    for info in pkgutil.iter_modules(diffusion.__path__):
        module = importlib.import_module(f"lambda_split.diffusion.{info.name}")
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if (inspect.isclass(value) or inspect.isfunction(value)) and name not in exported:
                missing.append(f"{info.name}.{name}")
    assert not missing, f"public but not exported: {missing}"


def test_the_diffusion_package_never_imports_the_server() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lambda_split.diffusion as d; d.resolve_diffusion('tiny-random-sd'); "
        "print(any(m.split('.')[0] == 'server' for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tiny_models_are_identical_across_processes() -> None:
    import os
    import subprocess
    import sys

    from lambda_split.diffusion import resolve_diffusion

    code = (
        "from lambda_split.diffusion import resolve_diffusion as r;"
        "print(r('tiny-random-sd').fingerprint, r('tiny-random-sdxl').fingerprint)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=os.environ | {"OMP_NUM_THREADS": "1"},  # one thread is fastest for tiny models on a shared CPU
    )
    here = [resolve_diffusion(name).fingerprint for name in ("tiny-random-sd", "tiny-random-sdxl")]
    assert out.stdout.split() == here
