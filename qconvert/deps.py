"""Optional libraries and the extra that installs each (pyproject.toml's optional-dependencies).

A backend's own library and extra are declared on the backend (``import_names``, ``extra``);
this table holds the rest.

A missing one is a one-line input error naming the extra, raised before the work that needs
it starts: validation needs torchmetrics only after loading and generating, which would
otherwise end in a ModuleNotFoundError after minutes.
"""

from __future__ import annotations

import importlib.util

from .errors import MissingDependency

EXTRAS = {
    "torchmetrics": "validate",
    "torchvision": "lpips",
}


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules without a spec (a stub): treat it as importable
        return True


def require(package: str) -> None:
    """Raise :class:`MissingDependency` (``pip install 'qconvert[<extra>]'``) if ``package`` is missing."""
    if not installed(package):
        raise MissingDependency(package, EXTRAS[package])


def require_for_validation(backend: str) -> None:
    """Validation loads the output with its backend's library and measures with torchmetrics."""
    from .convert import backend_class

    require("torchmetrics")
    backend_class(backend).require_library()
