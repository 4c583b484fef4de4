"""Number formatting shared by the bench's tables (``report``) and target check (``targets``)."""

from __future__ import annotations

from typing import Any

__all__ = ["fmt_num", "fmt_ratio", "table"]


def fmt_num(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if digits == 0:
            return f"{value:,.0f}{unit}"
        return f"{value:,.{digits}f}{unit}"
    return str(value)


def fmt_ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out) + "\n"
