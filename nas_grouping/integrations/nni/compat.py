"""Import Microsoft NNI (an optional extra) once, quietly, or explain how to install it.

Every ``nni_*`` module of this package imports NNI through :func:`require_nni`,
so a missing NNI always gives the same :class:`MissingDependencyError` with the
install command, and NNI's harmless "is found to be not a nn.Module"
RuntimeWarnings (NNI 3.0 scanning a newer ``torch.nn``) are not shown.
"""

from __future__ import annotations

import warnings
from types import ModuleType

from nas_grouping.errors import MissingDependencyError

__all__ = ["require_nni", "INSTALL_HINT", "SUPPORTED_NNI"]

INSTALL_HINT = 'pip install "nas-grouping[nni]"'
#: the NNI versions this integration was written and tested against
SUPPORTED_NNI = "3.0"


def require_nni() -> ModuleType:
    """Import and return the ``nni`` package with the NAS parts this integration uses.

    Raises:
        MissingDependencyError: NNI or pytorch-lightning is missing, or NNI is not 3.0.x.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is found to be not a nn\.Module.*", category=RuntimeWarning)
            # the order matters: keep isort away
            # isort: off
            import pytorch_lightning  # noqa: F401  (NNI imports it, not the unified `lightning` package)
            import nni
            # nni.nas.strategy first: importing nni.nas.oneshot.pytorch.strategy before it is a circular
            # import that NNI swallows, leaving nni.nas.strategy.DARTS & co. as placeholder classes
            import nni.nas.strategy  # noqa: F401
            import nni.nas.evaluator.pytorch  # noqa: F401
            import nni.nas.nn.pytorch  # noqa: F401
            import nni.nas.oneshot.pytorch.strategy  # noqa: F401
            # isort: on
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise MissingDependencyError(
            f"the NNI integration needs Microsoft NNI {SUPPORTED_NNI} and pytorch-lightning, which could not be "
            f"imported ({missing}: {exc}). Install them with: {INSTALL_HINT}"
        ) from exc
    version = getattr(nni, "__version__", "unknown")
    if not str(version).startswith(SUPPORTED_NNI + ".") and str(version) != SUPPORTED_NNI:
        raise MissingDependencyError(
            f"the NNI integration supports NNI {SUPPORTED_NNI}.x (its one-shot API changed in 3.0), "
            f"found NNI {version}. Install a supported version with: {INSTALL_HINT}"
        )
    return nni
