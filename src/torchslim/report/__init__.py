"""Readable tables (rich) and number formatting for reports."""

from torchslim.report._tables import compare_table, human, profile_table

__all__ = ["compare_table", "human", "profile_table"]
