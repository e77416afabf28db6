"""Data: DataModules that serve items, and the loading of raw rows behind them.

``base`` holds the shared `ItemDataModule`, ``toy`` the toy world's DataModules, ``rows`` the
science and tool-use DataModules, and ``loading`` reads JSON Lines files, ``save_to_disk``
directories and Hub datasets.
"""

from lightning_caopd.data.base import ItemDataModule
from lightning_caopd.data.rows import RowsDataModule, ScienceDataModule, ToolUseDataModule
from lightning_caopd.data.toy import LengthGroupedBatches, ToyDataModule, ToyWarmupDataModule

__all__ = [
    "ItemDataModule",
    "LengthGroupedBatches",
    "RowsDataModule",
    "ScienceDataModule",
    "ToolUseDataModule",
    "ToyDataModule",
    "ToyWarmupDataModule",
]
