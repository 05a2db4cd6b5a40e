"""Run a callback right after a module is first imported, in whichever process imports it.

respec extends classes of heavy modules (verl's v1 trainers, vLLM's model runner) that must not be imported just to
register the plug-in; hooking the import keeps ``import respec_plugin`` cheap and still acts before first use.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable


def after_import(module_name: str, callback: Callable[[], None]) -> None:
    """``callback()`` now if ``module_name`` is imported already, else once its import has executed."""
    if module_name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImportFinder) and f.module_name == module_name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportFinder(module_name, callback))


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds one module through the normal finders and runs ``callback`` once it has executed."""

    def __init__(self, module_name: str, callback: Callable[[], None]):
        self.module_name = module_name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, callback: Callable[[], None]):
        self.loader = loader
        self.callback = callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.callback()
