"""Byte counts for people: one formatter and the binary units, for every layer (no project imports)."""
from __future__ import annotations

KIB, MIB, GIB = 2 ** 10, 2 ** 20, 2 ** 30
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float, digits: int = 1) -> str:
    """`n` bytes in the largest binary unit it reaches, with `digits` decimals: '512 B', '1.5 KiB', '3.2 GiB'."""
    value, unit = float(n), 0
    while abs(value) >= KIB and unit < len(_UNITS) - 1:
        value /= KIB
        unit += 1
    return f"{value:.0f} B" if unit == 0 else f"{value:.{digits}f} {_UNITS[unit]}"
