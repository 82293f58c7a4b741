"""Edge-case inputs and bit-exact comparisons shared by the activation
quantization tests (interpreter and CUDA)."""

import torch


def edge_rows(k: int, seed: int = 0) -> torch.Tensor:
    """Rows of edge cases, ``k`` columns: random, zeros, tiny and subnormal
    values, ties of every grid, max magnitudes, mixed scales."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(k, generator=g) * 3]
    rows.append(torch.zeros(k))
    rows.append(-torch.zeros(k))
    rows.append(torch.randn(k, generator=g) * 1e-30)  # tiny: subnormal scales
    rows.append(torch.randn(k, generator=g) * 1e-41)  # fp32 subnormal inputs
    # ties: halves, quarters, ... of powers of two, and their neighbours
    ties = torch.tensor([0.5, 1.5, 2.5, 0.25, 0.75, 1.25, 3.5, 5.0, 7.0, 0.125, 0.0625, 448.0, 464.0, 6.0, 7.5, 28.0])
    rows.append(ties.repeat(k // 16 + 1)[:k] * torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0))
    rows.append(ties.repeat(k // 16 + 1)[:k] * 127.5 / 448.0)  # int8 ties after x / (amax / 127.5)
    rows.append(torch.nextafter(ties, torch.tensor(10.0)).repeat(k // 16 + 1)[:k])
    rows.append(torch.full((k,), 3.4e38))  # max magnitudes
    rows.append(torch.full((k,), -448.0 * 2.0**100))
    big = torch.randn(k, generator=g)
    big[::7] *= 1e6  # wide dynamic range within a block
    rows.append(big)
    rows.append(torch.full((k,), 2.0**-126) * torch.arange(k))
    rows.append(torch.full((k,), 1.0 - 2.0**-24))  # amax a few ulps below a power of two
    rows.append(torch.full((k,), 1.75) * torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0))
    rows.append(torch.full((k,), 1.9375))  # EVEN: carries the shared exponent
    return torch.stack(rows)


def nan_rows(k: int) -> torch.Tensor:
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9))
    x[0, 5] = float("nan")
    x[1, 3] = float("inf")
    x[2, 7] = -float("inf")
    return x


def same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Codes equal bit for bit, except the sign bit of NaN codes (CPUs and
    GPUs make NaNs of different signs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        ua, ub = a.view(torch.uint8), b.view(torch.uint8)
        nan = (ua & 0x7F) == 0x7F
        return torch.equal(ua[~nan], ub[~nan]) and torch.equal(nan, (ub & 0x7F) == 0x7F)
    return torch.equal(a, b)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (signed zeros included), NaN where the other has NaN."""
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))
