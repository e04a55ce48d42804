"""The report of a job, merged from the entries each stage's artifact gives."""

from __future__ import annotations

from typing import Any


def merge_report(*fragments: dict[str, Any]) -> dict[str, Any]:
    """The fragments in order, as one report: a section two fragments both give (a dict, such as "search") is merged
    key by key; any other key given twice is an error, so no stage overwrites another's figure."""
    report: dict[str, Any] = {}
    for fragment in fragments:
        for key, value in fragment.items():
            if key not in report:
                report[key] = dict(value) if isinstance(value, dict) else value
            elif isinstance(report[key], dict) and isinstance(value, dict):
                clash = sorted(set(report[key]) & set(value))
                if clash:
                    raise ValueError(f"Two stages report {key}.{clash[0]}.")
                report[key].update(value)
            else:
                raise ValueError(f"Two stages report {key!r}.")
    return report
