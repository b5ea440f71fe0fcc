"""MiniMind's bundled demo datasets and the deterministic generator that writes them.

`DEMO_DIR` is this folder; `demo_file("sft.jsonl")` is the path of one bundled file. See
PROVENANCE.md for what each file holds and `generate.py` for how it is made.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR: Path = Path(__file__).parent


def demo_file(name: str) -> Path:
    """Path of the bundled demo file `name` (e.g. "pretrain.jsonl"); FileNotFoundError if it is absent."""
    path = DEMO_DIR / name
    if not path.is_file():
        available = sorted(p.name for p in DEMO_DIR.glob("*.jsonl"))
        raise FileNotFoundError(f"no demo file {name!r} in {DEMO_DIR} (available: {', '.join(available)})")
    return path


__all__ = ["DEMO_DIR", "demo_file"]
