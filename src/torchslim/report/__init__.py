"""Readable tables (rich) and number formatting for reports.

The profile and comparison tables are defined with the profile (:mod:`torchslim.profile.tables`)
and re-exported here.
"""

from torchslim.profile.tables import compare_table, human, profile_table

__all__ = ["compare_table", "human", "profile_table"]
