"""The CPU linear layers on packed weights (kernels.cpu_linear) against plain `F.linear`, the twin.

float32 takes two paths: MKL's GEMV on a plain [in, out] copy for a single row, oneDNN's blocked weight for
more rows; bfloat16 always the blocked one. Both weight orientations are covered (in > out keeps a transposed
view of the row-major weight, in <= out a contiguous copy), with and without bias, 1-D to 3-D inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_linear
from server.runner.layers.linear import ColumnLinear

pytestmark = pytest.mark.skipif(
    not cpu_linear.available(torch.device("cpu"), torch.float32), reason="this torch build has no oneDNN"
)

# float32: the same sums in another order; bfloat16: the output is rounded to bfloat16 (8 bits of mantissa)
TOLERANCE = {torch.float32: {"atol": 1e-4, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2}}


def _case(out_features: int, in_features: int, x_shape: tuple[int, ...], bias: bool, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen).div_(in_features**0.5).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    x = torch.randn(*x_shape, in_features, generator=gen).to(dtype)
    return weight, b, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features, in_features", [(96, 64), (48, 160), (64, 64)])
@pytest.mark.parametrize("x_shape", [(), (1,), (1, 1), (2,), (5,), (3, 4), (33,)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype, out_features, in_features, x_shape, bias):
    weight, b, x = _case(out_features, in_features, x_shape, bias, dtype, seed=len(x_shape) * 31 + out_features)
    got = cpu_linear.linear(x, cpu_linear.pack(weight), b)
    want = F.linear(x.float(), weight.float(), None if b is None else b.float()).to(dtype)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_float32_keeps_a_row_copy_with_the_longer_dim_contiguous_and_bfloat16_none():
    wide = cpu_linear.pack(torch.randn(96, 64))  # out > in: a contiguous [in, out] copy
    assert wide.columns.shape == (64, 96) and wide.columns.is_contiguous()
    tall = torch.randn(48, 160)  # in > out: the row-major weight itself, viewed as [in, out]
    packed_tall = cpu_linear.pack(tall)
    assert packed_tall.columns.shape == (160, 48) and packed_tall.columns.t().is_contiguous()
    assert packed_tall.columns.untyped_storage().data_ptr() == tall.untyped_storage().data_ptr()
    assert cpu_linear.pack(torch.randn(96, 64, dtype=torch.bfloat16)).columns is None


def test_one_row_and_many_rows_agree_in_float32():
    """The single-row path (MKL GEMV) and the blocked one (oneDNN) give the same rows, to float32 rounding."""
    weight, b, x = _case(96, 64, (7,), True, torch.float32, seed=3)
    packed = cpu_linear.pack(weight)
    many = cpu_linear.linear(x, packed, b)
    one_by_one = torch.cat([cpu_linear.linear(x[i : i + 1], packed, b) for i in range(x.shape[0])])
    torch.testing.assert_close(one_by_one, many, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_layer_matches_its_unpacked_self(dtype):
    layer = ColumnLinear(64, 40, bias=True).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 64) / 8)
        layer.bias.copy_(torch.randn(40))
    x1, x9 = torch.randn(1, 64, dtype=dtype), torch.randn(9, 64, dtype=dtype)
    want1, want9 = layer(x1), layer(x9)
    layer.pack(cpu_linear.pack, cpu_linear.linear)
    assert layer.weight.numel() == 0  # the plain parameter is freed; the packed weight holds what is needed
    torch.testing.assert_close(layer(x1), want1, **TOLERANCE[dtype])
    torch.testing.assert_close(layer(x9), want9, **TOLERANCE[dtype])
