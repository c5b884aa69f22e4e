"""Optional dependencies: which extra (``pip install 'tuneline[EXTRA]'``) brings which module, and
the error a command gives when the extra it needs is not installed.

``tuneline serve`` needs ``[serve]``; a spec with a ``search`` section needs ``[tune]``, and
``search.backend: ray`` also ``[ray]``, as does ``train.backend: ray``; ``train.method: dpo`` needs
``[dpo]``, ``train.method: qlora`` ``[qlora]`` (bitsandbytes). Everything else runs on the core
install.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from tuneline.errors import Problem, TunelineError

if TYPE_CHECKING:
    from tuneline.spec import Spec

# The modules each extra brings (as imported), in pyproject.toml's [project.optional-dependencies]
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "tune": ("optuna",),
    "ray": ("ray", "optuna"),
    "dpo": ("trl", "datasets"),
    "qlora": ("bitsandbytes",),
}
# The extra to name when a module is missing (optuna: [tune], which [ray] includes)
EXTRA_OF_MODULE: dict[str, str] = {"fastapi": "serve", "starlette": "serve", "uvicorn": "serve",
                                   "prometheus_client": "serve", "optuna": "tune", "ray": "ray",
                                   "trl": "dpo", "datasets": "dpo", "bitsandbytes": "qlora"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import; a module without a spec
        return False


def _error(extra: str, modules: list[str], needed_by: str) -> TunelineError:
    names = ", ".join(modules)
    return TunelineError(Problem(f"{needed_by} needs {names}, from the [{extra}] extra, which is not installed",
                                 hint=f"pip install 'tuneline[{extra}]'"))


def require_extra(extra: str, needed_by: str) -> None:
    """Raise :class:`TunelineError` naming ``extra`` when a module it brings is not installed;
    ``needed_by`` says what needs it (``tuneline serve``). Imports nothing."""
    missing = [m for m in EXTRAS[extra] if not _installed(m)]
    if missing:
        raise _error(extra, missing, needed_by)


def require_extras_for(spec: Spec) -> None:
    """Check the extras ``spec`` needs are installed, before any work: ``[tune]`` for a search,
    ``[ray]`` for a search on Ray, ``[dpo]`` for preference tuning."""
    if spec.search is not None:
        require_extra("tune", "a spec with a `search` section")
        if spec.search.backend == "ray":
            require_extra("ray", "`search.backend: ray`")
    if spec.train.method == "dpo":
        require_extra("dpo", "`train.method: dpo`")
    if spec.train.backend == "ray":
        require_extra("ray", "`train.backend: ray`")
    if spec.train.method == "qlora":
        require_extra("qlora", "`train.method: qlora`")


def missing_extra(exc: ImportError) -> TunelineError | None:
    """The error to show for ``exc`` when the missing module belongs to an extra (None otherwise)."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    return _error(extra, [module], "this command") if extra is not None else None
