"""Optional packages a backend or notifier type needs (a ``pip install 'rollbackd[EXTRA]'``).

``validate`` says a rules file is usable only when ``run`` can start with it: a backend whose
package is not installed is an error at load, naming the extra, not an import error at start.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "missing_extra"]

# (what, type) -> (the module imported, the extra that installs it)
EXTRAS: dict[tuple[str, str], tuple[str, str]] = {
    ("backend", "kubernetes"): ("kubernetes", "kubernetes"),
}


def missing_extra(what: str, type_name: str) -> str | None:
    """Why ``type_name`` (a ``what``: backend, notifier) cannot be used here, or None."""
    needed = EXTRAS.get((what, type_name))
    if needed is None:
        return None
    module, extra = needed
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # blocked, or a broken entry in sys.modules
        found = False
    if found:
        return None
    return f"{what} {type_name} needs the {extra!r} extra: pip install 'rollbackd[{extra}]'"
