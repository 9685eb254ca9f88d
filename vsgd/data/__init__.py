"""Datasets of the paper: registry, download + verify + convert (`prepare`), a synthetic
source, `load_prepared`, and batched on-device augmentation (`Augmenter`).

The names below load on first use: `vsgd.data.registry` (shapes, classes, archives) is
read by `vsgd.spec`, which must import without torch or numpy.
"""

import importlib

_WHERE = {
    "Augmenter": "augment",
    "ArchiveError": "errors",
    "ChecksumError": "errors",
    "DataError": "errors",
    "DownloadError": "errors",
    "Prepared": "prepared",
    "load_prepared": "prepared",
    "prepare": "prepared",
    "DATASETS": "registry",
    "DatasetInfo": "registry",
    "get_dataset": "registry",
}
__all__ = sorted(_WHERE) + ["SOURCES"]


def __getattr__(name):
    if name == "SOURCES":
        from ..spec import SOURCES

        return SOURCES
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
