"""Counter-based random draws for the pre-training corruptions (paper §3.4–3.5 masking, done per batch).

Each item's draws are a pure function of ``(seed, epoch, index)`` and a named stream, not of the batch the item
lands in: a resumed run, another batch size or another number of processes sees the same corruption of the same
item, and one vectorised call draws a whole batch. The generator is SplitMix64 (Steele, Lea & Flood 2014), the
seeding generator of ``java.util.SplittableRandom`` and of xoshiro: the item key seeds one SplitMix64 sequence
per stream, and slot ``j`` of a stream is its ``j``-th output.

Shapes: ``keys`` ``(B,)`` uint64, one per item; :func:`uniforms` gives ``(B, n)`` float64 in ``[0, 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (a bijection of uint64); wraps modulo 2**64 as intended."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def item_keys(seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """One 64-bit key per item, fixed by ``(seed, epoch, index)``: ``(B,)`` uint64."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([int(seed) % 2**64], dtype=np.uint64) + _GAMMA)
        key = _mix(key ^ (np.uint64(int(epoch) % 2**64) + _GAMMA))
        return _mix(key ^ (np.asarray(indices, dtype=np.int64).astype(np.uint64) + _GAMMA))


def uniforms(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
    """Slots ``0..n-1`` of stream ``stream`` of every key: ``(B, n)`` float64 uniforms in ``[0, 1)``."""
    with np.errstate(over="ignore"):
        state = _mix(keys ^ _mix(np.array([stream + 1], dtype=np.uint64) * _GAMMA))
        steps = (np.arange(1, n + 1, dtype=np.uint64) * _GAMMA)[None, :]
        bits = _mix(state[:, None] + steps)
    return (bits >> _S11).astype(np.float64) * (1.0 / 2**53)
