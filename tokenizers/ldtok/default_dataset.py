"""Temporary alias of `ldtok.data.default_dataset` (the same module object) for importers outside the data refactor
(eval/_bench_encode.py); remove after the merge, once they import `ldtok.data.default_dataset`."""

import sys

from .data import default_dataset as _module

sys.modules[__name__] = _module
