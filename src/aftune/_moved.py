"""Module paths of aftune 0.1, from before the package was split by SPEC.md section.

`import aftune.encoding` still works and gives the very module object `aftune.core.encoding`
(not a copy): SPEC.md's independent test vectors (`tests/test_spec_vectors.py`) and code written
against 0.1 import these paths. New code imports the new ones; README.md "Layout" lists them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "aftune.encoding": "aftune.core.encoding",
    "aftune.merkle": "aftune.core.merkle",
    "aftune.signing": "aftune.core.signing",
    "aftune.store": "aftune.core.store",
    "aftune.jsonio": "aftune.core.jsonio",
    "aftune.config": "aftune.training.settings",
    "aftune.engine": "aftune.training.engine",
    "aftune.manifest": "aftune.training.manifest",
    "aftune.transcript": "aftune.training.transcript",
    "aftune.run": "aftune.training.run",
    "aftune.verify": "aftune.training.verify",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module now at its new path."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import system set the alias spec on the shared module


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
