"""Calls into the bindings, their exceptions turned into the project's own."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import rados
import rbd

from ...core.errors import CephError, NotFound

T = TypeVar("T")


def wrap(what: str, func: Callable[[], T]) -> T:
    """``func()``: a missing pool, image or object raises :class:`NotFound`, other failures :class:`CephError`."""
    try:
        return func()
    except rbd.ImageNotFound as exc:
        raise NotFound(f"{what}: not found") from exc
    except (rados.ObjectNotFound, rbd.ObjectNotFound) as exc:
        raise NotFound(f"{what}: not found ({exc})") from exc
    except (rados.Error, rbd.Error) as exc:
        raise CephError(f"{what}: {exc}") from exc
