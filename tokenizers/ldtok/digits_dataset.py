"""Temporary alias of `ldtok.data.digits_dataset` (the same module object) for importers outside the data refactor
(tests/test_classic_models.py); remove after the merge, once they import `ldtok.data.digits_dataset`."""

import sys

from .data import digits_dataset as _module

sys.modules[__name__] = _module
