"""Helpers the generator kernels share: a bank tiled to a length and its adjoint, gains, a 32-bit
integer hash, and when to call the custom ops of :mod:`npas_fx.opaque_kernels`.

Example:
    >>> import torch
    >>> _extend(torch.tensor([1.0, 2.0]), 5).tolist()
    [1.0, 2.0, 1.0, 2.0, 1.0]
    >>> _fold(torch.ones(5), 2).tolist()
    [3.0, 2.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["use_opaque_kernels"]

# Constants of a 32-bit integer hash (lowbias32, a bijection on 32-bit integers); every product
# stays below 2**63 because the state is masked to 32 bits before each multiplication.
_MASK32 = 0xFFFFFFFF
_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = 0x846CA68B
_SALT_MUL = 0x9E3779B1
_SIGN_SALT = 0x68E31DA4


def _mix32_(x: Tensor, scratch: Tensor) -> Tensor:
    """lowbias32, in place, of int64 ``x``'s low 32 bits (int64 result) or of int32 ``x``'s bits (int32 bits).

    ``scratch``: a tensor like ``x``. No temporaries: hashing ``n`` positions is a few passes over
    ``n`` integers (a layer hashes a whole round of its bank's slots, see :func:`hash_rows`; fresh
    tensors cost page faults). int32 halves the traffic: its right shifts are masked to be logical,
    and its products wrap modulo ``2**32`` as the int64 ones do past ``2**63`` (``_HASH_MUL_2``).
    """
    if x.dtype == torch.int32:
        for shift, multiplier in ((16, _HASH_MUL_1), (15, _HASH_MUL_2)):
            x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=scratch).bitwise_and_((1 << (32 - shift)) - 1))
            x.mul_(_int32(multiplier))
        return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch).bitwise_and_(0xFFFF))
    x.bitwise_and_(_MASK32)
    for shift, multiplier in ((16, _HASH_MUL_1), (15, _HASH_MUL_2)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=scratch))
        x.mul_(multiplier).bitwise_and_(_MASK32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch))


def _int32(value: int) -> int:
    """The int32 with the same low 32 bits as ``value``."""
    value &= _MASK32
    return value - 2**32 if value >= 2**31 else value


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 of the low 32 bits of ``x`` (int64), in a new tensor."""
    x = x.clone()
    return _mix32_(x, torch.empty_like(x))


def _extend(bank: Tensor, length: int) -> Tensor:
    """``bank`` tiled to ``length`` values: ``x[i] = bank[i mod P]`` (a view when no wrap is needed)."""
    size = bank.numel()
    if length <= size:
        return bank.narrow(0, 0, length)
    copies, rest = divmod(length, size)
    parts = [bank] * copies + ([bank.narrow(0, 0, rest)] if rest else [])
    return torch.cat(parts)


def _fold(values: Tensor, size: int) -> Tensor:
    """Adjoint of :func:`_extend`: ``out[p] = sum of values[i] over i = p mod size``."""
    length = values.numel()
    if length == size:
        return values
    if length > 4 * size:  # a tiny bank: pad to whole copies and sum them
        pad = -length % size
        if pad:
            values = torch.cat([values, values.new_zeros(pad)])
        return values.view(-1, size).sum(0)
    out = values.narrow(0, 0, size).clone()  # the usual wrap: add the (at most 3) further copies
    for start in range(size, length, size):
        count = min(size, length - start)
        out.narrow(0, 0, count).add_(values.narrow(0, start, count))
    return out


def _scale(grad: Tensor, gain: float) -> Tensor:
    return grad.mul_(gain) if gain != 1.0 else grad  # the bank-sized gradients here are fresh tensors


def use_opaque_kernels(bank: Tensor) -> bool:
    """Whether to run the custom ops of :mod:`npas_fx.opaque_kernels`: compiling for a CPU, not exporting."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting() and bank.device.type == "cpu"


def _scaled_bank(bank: Tensor, gain: float) -> Tensor:
    return bank * gain if gain != 1.0 else bank
