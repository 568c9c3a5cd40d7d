"""Human-friendly quantities in spec files: `80GiB`, `300GB/s`, `5us`, `312TFLOPS`.

A bare number is taken in the base unit (bytes, bytes/s, seconds, FLOP/s).
"""

from __future__ import annotations

import re

GiB = 1024**3
MiB = 1024**2
KiB = 1024

_BYTES = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024**4, "pib": 1024**5,
}  # fmt: skip
_TIME = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_FLOPS = {"": 1.0, "flops": 1.0, "gflops": 1e9, "tflops": 1e12, "pflops": 1e15}
_NUM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*$")


class UnitError(ValueError):
    pass


def _split(value: object, what: str) -> tuple[float, str]:
    if isinstance(value, bool):
        raise UnitError(f"expected {what}, got a boolean")
    if isinstance(value, int | float):
        return float(value), ""
    if not isinstance(value, str):
        raise UnitError(f"expected {what}, got {type(value).__name__}")
    m = _NUM.match(value)
    if not m:
        raise UnitError(f"expected {what} such as {_EXAMPLES[what]}, got {value!r}")
    return float(m.group(1)), m.group(2).lower()


_EXAMPLES = {"bytes": "'80GiB'", "bandwidth": "'25GB/s'", "time": "'5us'", "FLOP/s": "'312TFLOPS'"}


def parse_bytes(value: object) -> int:
    number, unit = _split(value, "bytes")
    if unit not in _BYTES:
        raise UnitError(f"unknown size unit {unit!r} (use B, KB, MB, GB, KiB, MiB, GiB, TiB)")
    return int(round(number * _BYTES[unit]))


def parse_bandwidth(value: object) -> float:
    """Bytes per second from '25GB/s', '200Gb/s' (bits) or a number."""
    number, unit = _split(value, "bandwidth")
    if unit in ("", "b/s"):
        return number
    if unit.endswith("/s"):
        base = unit[:-2]
        # 'Gb/s' (bits) vs 'GB/s' (bytes): the original case decides
        raw = str(value).strip()
        if raw.endswith("b/s") and not raw.endswith("B/s"):
            scale = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}.get(base)
            if scale is None:
                raise UnitError(f"unknown bandwidth unit {unit!r}")
            return number * scale / 8.0
        if base in _BYTES:
            return number * _BYTES[base]
    raise UnitError(f"unknown bandwidth unit {unit!r} (use GB/s, MB/s, Gb/s)")


def parse_time(value: object) -> float:
    number, unit = _split(value, "time")
    if unit not in _TIME:
        raise UnitError(f"unknown time unit {unit!r} (use s, ms, us, ns)")
    return number * _TIME[unit]


def parse_flops(value: object) -> float:
    number, unit = _split(value, "FLOP/s")
    unit = unit.replace("/s", "s")
    if unit not in _FLOPS:
        raise UnitError(f"unknown FLOP/s unit {unit!r} (use GFLOPS, TFLOPS, PFLOPS)")
    return number * _FLOPS[unit]


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit, scale in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_rate(bps: float) -> str:
    return f"{bps / 1e9:.1f} GB/s"


def fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
