"""The dequantization kernels (long steps' 16-bit rebuild) against the quantizers' PyTorch
``dequantize`` (TRITON_INTERPRET=1 without a GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import kvpolar  # noqa: E402
from kvpolar.kernels import dequantize as kernel  # noqa: E402
from kvpolar.quantized import cat  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def fresh(shape, dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(shape, generator=gen) * torch.rand(shape[-1], generator=gen) * 4
    return x.to(dtype).to(DEVICE)


def assert_matches_reference(got: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    """Bit for bit where ``exact`` (KIVI, SQuat and fp8), else within one rounding of the output dtype
    plus float32's error on the largest entry: polar-rope's cos / sin differ in the last float32 bit,
    turbo's and polar-recursive's un-rotations sum in another order, and the CPU interpreter rounds
    float32 ties to bfloat16 away from even (so bfloat16 outputs are compared that way everywhere).
    float32 outputs: the un-rotation's products (128 at most, the head dims here) summed in another order
    than the reference's (the tensor cores' order on a GPU) are allowed 128 roundings of the largest
    entry (``128 * 2**-24``: one per term of the sum, the scale of a reordered sum's worst case for terms
    of that size); one was 1.3 * 2**-20 of it on the H100."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if exact and not (INTERPRETED and got.dtype == torch.bfloat16):
        assert torch.equal(got, ref), (got.float() - ref.float()).abs().max()
        return
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}[got.dtype]
    summed = 128 * 2.0**-24 if got.dtype == torch.float32 else 2.0**-20
    torch.testing.assert_close(got.float(), ref.float(), rtol=ulp, atol=summed * ref.float().abs().max().item())


CASES = [  # (quantizer, params, shape [B, H, T, D], dtype)
    ("kivi", dict(bits=2, group_size=32, axis="channel"), (2, 3, 45, 64), torch.float16),
    ("kivi", dict(bits=3, group_size=16, axis="channel"), (1, 2, 37, 32), torch.bfloat16),  # codes straddle bytes
    ("kivi", dict(bits=4, group_size=32, axis="channel"), (2, 1, 1, 128), torch.float16),  # one token
    ("kivi", dict(bits=8, group_size=128, axis="channel"), (1, 2, 70, 64), torch.float32),  # group > tokens
    ("kivi", dict(bits=2, group_size=32, axis="token"), (2, 2, 19, 128), torch.bfloat16),
    ("kivi", dict(bits=3, group_size=32, axis="token"), (1, 3, 20, 64), torch.float16),
    ("kivi", dict(bits=4, group_size=16, axis="token"), (1, 2, 33, 64), torch.float32),
    ("kivi", dict(bits=8, group_size=32, axis="token"), (2, 1, 9, 32), torch.float16),
    ("squat", dict(bits=2, subspace_dim=4, block_size=16), (1, 2, 40, 32), torch.float16),
    ("polar-rope", dict(radius_bits=2, angle_bits=4, group_size=16), (2, 2, 41, 64), torch.float16),
    ("polar-rope", dict(radius_bits=3, angle_bits=3, group_size=32, pairing="interleaved"), (1, 2, 33, 32),
     torch.bfloat16),
    ("polar-rope", dict(radius_bits=4, angle_bits=4, group_size=128), (1, 1, 70, 128), torch.float16),
    ("polar-rope", dict(radius_bits=1, angle_bits=2, group_size=16), (2, 1, 20, 32), torch.float32),  # 3-bit pairs
    ("turbo", dict(bits=3), (2, 2, 37, 64), torch.float16),  # Hadamard
    ("turbo", dict(bits=4, rotation="orthogonal", norm_correction=False), (1, 2, 20, 32), torch.bfloat16),
    ("turbo", dict(bits=2), (1, 1, 1, 128), torch.float32),
    ("fp8", dict(format="e4m3", scale="head"), (2, 2, 45, 64), torch.float16),
    ("fp8", dict(format="e5m2", scale="tensor"), (1, 2, 17, 32), torch.bfloat16),
    ("polar-recursive", {}, (2, 2, 35, 128), torch.float16),  # the paper's setting (tokens-contiguous storage)
    ("polar-recursive", dict(levels=3, bits=(3, 2, 2), codebook="online", preconditioner="orthogonal"),
     (1, 2, 20, 32), torch.bfloat16),
]
EXACT = ("kivi", "squat", "fp8")  # bit for bit; polar-rope's cos / sin and the un-rotations: one rounding


def quantize(name, params, x):
    q = kvpolar.quantizer(name, **params)
    context = {"queries": fresh((*x.shape[:2], 8, x.shape[-1]), x.dtype)} if "queries" in q.context_keys else {}
    return q, q.quantize(x, **context)


@pytest.mark.parametrize("name,params,shape,dtype", CASES)
def test_dequantize_matches_the_quantizer(name, params, shape, dtype):
    q, p = quantize(name, params, fresh(shape, dtype))
    assert kernel.supports(p)
    got = kernel.dequantize(p)
    assert_matches_reference(got, q.dequantize(p), exact=name in EXACT)


@pytest.mark.parametrize("seed", range(12))
def test_random_token_counts_and_batches(seed):
    """``CASES``' formats at a random batch, head count and token count (1 to 160: off every group and
    block), bounds-checked under the interpreter like every kernel test. Fixed seeds."""
    g = torch.Generator().manual_seed(seed)
    name, params, shape, dtype = CASES[int(torch.randint(len(CASES), (1,), generator=g))]
    b, h, t = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (4, 4, 161))
    q, p = quantize(name, params, fresh((b, h, t, shape[-1]), dtype))
    assert kernel.supports(p)
    assert_matches_reference(kernel.dequantize(p), q.dequantize(p), exact=name in EXACT)


@pytest.mark.parametrize("name,params", [("turbo", dict(bits=3)), ("turbo", dict(bits=2, norm_correction=False)),
                                         ("polar-recursive", {})])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_hadamard_unrotation_in_bfloat16_terms_equals_the_dense_product(name, params, dtype, monkeypatch):
    """Randomized Hadamard rotations are un-rotated as three exact bfloat16 terms of the tile times the
    +-1 matrix (``HADAMARD_BFLOAT16``), with float32's accuracy: within one rounding of the reference,
    and of the dense tf32x3 product with ``R``."""
    q, p = quantize(name, params, fresh((2, 2, 70, 128), dtype))
    assert kernel._unrotation(p)[2] == 2
    got = kernel.dequantize(p)
    assert_matches_reference(got, q.dequantize(p), exact=False)
    monkeypatch.setattr(kernel, "HADAMARD_BFLOAT16", False)
    assert kernel._unrotation(p)[2] == 1
    assert_matches_reference(got, kernel.dequantize(p), exact=False)


@pytest.mark.parametrize("name,params", [
    ("kivi", dict(bits=2, group_size=32, axis="channel")),
    ("kivi", dict(bits=2, group_size=32, axis="token")),  # tokens-contiguous metadata, regrown by cat
    ("polar-rope", dict(radius_bits=2, angle_bits=4, group_size=32)),
    ("turbo", dict(bits=3)),
])
def test_dequantize_into_a_slice_of_a_larger_buffer(name, params):
    """A grown cache (parts joined by ``cat``, one sequence selected) written into the first tokens of
    a buffer whose remaining tokens stay as they were."""
    x = fresh((3, 2, 50, 64), torch.float16)
    q, first = quantize(name, params, x[..., :32, :])
    _, second = quantize(name, params, x[..., 32:, :])
    p = cat([first, second]).select_batch(torch.tensor([2, 0], device=DEVICE))
    buffer = torch.full((2, 2, 57, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    assert kernel.dequantize_into(p, buffer[..., :50, :])
    assert_matches_reference(buffer[..., :50, :], q.dequantize(p), exact=name in EXACT)
    assert buffer[..., 50:, :].isnan().all()


@pytest.mark.parametrize("name,params,dim", [
    ("polar-recursive", {"radius_bits": 4}, 64),  # quantized radii: format_tile reads 16-bit ones
    ("polar-recursive", {"preconditioner": "orthogonal"}, 48),  # the un-rotation: powers of two
    ("turbo", {"rotation": "orthogonal"}, 48),
])
def test_formats_without_a_kernel_are_left_to_the_caller(name, params, dim):
    _, p = quantize(name, params, fresh((1, 2, 20, dim), torch.float16))
    out = torch.zeros(tuple(p.shape), dtype=torch.float16, device=DEVICE)
    assert not kernel.supports(p)
    assert not kernel.dequantize_into(p, out)
    assert kernel.dequantize(p) is None
    assert not out.any()


def test_bad_outputs_are_refused_with_the_reason():
    q, p = quantize("kivi", dict(bits=2, group_size=32), fresh((1, 2, 20, 64), torch.float16))
    with pytest.raises(ValueError, match=r"out has shape \(1, 2, 19, 64\); the stored tensor has \(1, 2, 20, 64\)"):
        kernel.dequantize_into(p, torch.empty(1, 2, 19, 64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="out has dtype torch.int32"):
        kernel.dequantize_into(p, torch.empty(1, 2, 20, 64, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        kernel.dequantize_into(p, torch.empty(1, 2, 64, 20, dtype=torch.float16, device=DEVICE).transpose(-1, -2))
    _, p2 = quantize("kivi", dict(bits=2, group_size=32), fresh((2, 3, 20, 64), torch.float16))
    with pytest.raises(ValueError, match="leading dimensions do not merge"):
        kernel.dequantize_into(p2, torch.empty(3, 2, 20, 64, dtype=torch.float16, device=DEVICE).transpose(0, 1))
    # the quantizer's public method checks what every method shares (on the CPU it copies dequantize)
    with pytest.raises(ValueError, match=r"out has shape \(1, 2, 21, 64\); the quantized tensor has"):
        q.dequantize_into(p, torch.empty(1, 2, 21, 64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(TypeError, match="out must be a floating-point tensor"):
        q.dequantize_into(p, torch.empty(1, 2, 20, 64, dtype=torch.int64, device=DEVICE))


def test_buffers_the_kernels_take_and_those_they_leave_to_a_copy():
    """``takes``: what ``Quantizer.dequantize_into`` sends to a kernel on CUDA; any other buffer gets
    the PyTorch reconstruction copied into it, never an error."""
    _, p = quantize("kivi", dict(bits=2, group_size=32), fresh((2, 3, 20, 64), torch.float16))

    def buffer(*shape, dtype=torch.float16):
        return torch.empty(*shape, dtype=dtype, device=DEVICE)

    assert kernel.takes(buffer(2, 3, 20, 64), p)
    assert kernel.takes(buffer(2, 3, 25, 64)[..., :20, :], p)  # the first tokens of a larger buffer
    assert kernel.takes(buffer(2, 3, 20, 64, dtype=torch.float32), p)
    assert not kernel.takes(buffer(2, 3, 20, 64, dtype=torch.float64), p)
    assert not kernel.takes(buffer(2, 3, 64, 20).transpose(-1, -2), p)
    assert not kernel.takes(buffer(3, 2, 20, 64).transpose(0, 1), p)  # batch and heads do not merge
    assert not kernel.takes(buffer(2, 3, 21, 64), p)


@pytest.mark.parametrize("name", ["kivi", "turbo"])
def test_quantizer_dequantize_into_equals_dequantize(name):
    """Every method has ``dequantize_into`` (the generic one copies ``dequantize``), into any dtype and
    strides."""
    q, p = quantize(name, {}, fresh((2, 2, 24, 64), torch.bfloat16))
    out = torch.empty(2, 2, 64, 24, dtype=torch.float32, device=DEVICE).transpose(-1, -2)
    assert q.dequantize_into(p, out) is out
    assert torch.equal(out, q.dequantize(p).float())


@pytest.mark.parametrize("launch", [(32, 8), (16, 4)])
def test_polar_recursive_blocks_of_other_sizes(launch, monkeypatch):
    """``POLAR_RECURSIVE_LAUNCH`` other than the default 64-token blocks (the classic kernel's 32 on 8
    warps; 16), over a token count off every block size."""
    monkeypatch.setattr(kernel, "POLAR_RECURSIVE_LAUNCH", launch)
    q, p = quantize("polar-recursive", {}, fresh((1, 2, 150, 128), torch.float16))
    assert_matches_reference(kernel.dequantize(p), q.dequantize(p), exact=False)


@pytest.mark.parametrize("programs_per_sm", [0, 64])
@pytest.mark.parametrize("name", ["turbo", "polar-recursive", "fp8"])
def test_programs_loop_over_their_token_blocks(name, programs_per_sm, monkeypatch):
    """One program per row (every token block through its loop, R loaded once) or one per block."""
    monkeypatch.setattr(kernel, "FORMAT_PROGRAMS_PER_SM", programs_per_sm)
    q, p = quantize(name, {}, fresh((1, 2, 150, 32), torch.float16))
    assert_matches_reference(kernel.dequantize(p), q.dequantize(p), exact=name == "fp8")
