"""Data selection: choose the documents of raw domains that match a target (DSIR)."""

from mixer.select.dsir import DsirConfig, find_domains, select_dsir, summary
from mixer.select.shards import SelectError

__all__ = ["DsirConfig", "SelectError", "find_domains", "select_dsir", "summary"]
