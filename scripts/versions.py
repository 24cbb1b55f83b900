"""Prints the interpreter and the library versions a test run used, on one line.

CI calls it (``make versions``) before each leg so the log says what each leg ran.
"""

import platform
from importlib import metadata

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


print(
    "versions:",
    f"python {platform.python_version()}",
    *(f"{package} {_version(package)}" for package in PACKAGES),
    sep="  ",
)
