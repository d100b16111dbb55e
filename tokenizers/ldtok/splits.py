"""Temporary alias of `ldtok.data.splits` (the same module object) for importers outside the data refactor
(training.py and tests/test_ecosystem.py); remove after the merge, once they import `ldtok.data.splits`."""

import sys

from .data import splits as _module

sys.modules[__name__] = _module
