"""One exception root: every error the packages define is an ImagewarmError, and keeps its builtin."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import controller
import imagewarm
import localcluster
import proxy
import webhook
from imagewarm.errors import ImagewarmError
from imagewarm.kube import Forbidden, NotFound, Unavailable
from imagewarm.reference import InvalidReference
from proxy.cache.errors import DiskFull, NotCached


def defined_errors() -> list[type[BaseException]]:
    found = []
    for package in (imagewarm, proxy, webhook, controller, localcluster):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name.endswith(".__main__"):  # runs the command line
                continue
            loaded = importlib.import_module(module.name)
            for _, value in inspect.getmembers(loaded, inspect.isclass):
                if issubclass(value, BaseException) and value.__module__ == loaded.__name__:
                    found.append(value)
    return found


def test_every_error_the_packages_define_is_an_imagewarm_error() -> None:
    errors = defined_errors()
    assert len(errors) >= 35, [e.__name__ for e in errors]
    outside = [f"{e.__module__}.{e.__qualname__}" for e in errors if not issubclass(e, ImagewarmError)]
    assert outside == []


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (InvalidReference, ValueError),
        (NotFound, LookupError),
        (Forbidden, PermissionError),
        (Unavailable, ConnectionError),
        (NotCached, KeyError),
        (DiskFull, OSError),
    ],
)
def test_the_builtins_callers_catch_are_kept(error: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(error, ImagewarmError) and issubclass(error, builtin)
