import pytest
import torch

import kvpolar


def test_registry_lists_builtin_methods():
    names = kvpolar.available_quantizers()
    assert {"none", "kivi"} <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown quantizer 'nope'.*kivi"):
        kvpolar.quantizer("nope")


@pytest.mark.parametrize(
    "params,match",
    [
        ({"bits": 5}, "bits=5"),
        ({"bits": 2.0}, "bits=2.0"),
        ({"group_size": 0}, "group_size=0"),
        ({"group_size": -32}, "group_size=-32"),
        ({"axis": "head"}, "axis='head'"),
    ],
)
def test_bad_parameters_name_parameter_and_allowed_values(params, match):
    with pytest.raises(ValueError, match=match) as info:
        kvpolar.quantizer("kivi", **params)
    assert "allowed" in str(info.value)


def test_unknown_parameter_is_a_type_error():
    with pytest.raises(TypeError, match="nbits.*allowed"):
        kvpolar.quantizer("kivi", nbits=2)


@pytest.mark.parametrize("name", ["none", "kivi"])
def test_bad_tensors(name):
    q = kvpolar.quantizer(name)
    with pytest.raises(TypeError, match="dtype torch.int32"):
        q.quantize(torch.zeros(4, 32, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="rank 1"):
        q.quantize(torch.zeros(64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        q.quantize([[1.0, 2.0]])
    with pytest.raises(TypeError, match="unexpected context"):
        q.quantize(torch.zeros(1, 32, 64), queries=torch.zeros(1, 4, 64))


@pytest.mark.parametrize("name", ["none", "kivi", "polar-rope", "polar-recursive", "turbo", "fp8"])
@pytest.mark.parametrize("shape", [(1, 2, 0, 128), (0, 2, 5, 128)])
def test_nothing_to_quantize_is_refused_by_name(name, shape):
    """An empty ``x`` (no tokens, or an empty leading dimension) is refused naming ``x`` and its shape,
    by every method alike (the formats have no empty form)."""
    with pytest.raises(ValueError, match=r"x has shape \(" + ", ".join(map(str, shape)) + r"\): nothing to quantize"):
        kvpolar.quantizer(name).quantize(torch.zeros(shape))


def test_head_dim_not_divisible_by_value_group():
    with pytest.raises(ValueError, match="head dim 48 is not divisible by group_size=32"):
        kvpolar.quantizer("kivi", axis="token", group_size=32).quantize(torch.randn(1, 8, 48))


def test_scores_shape_errors():
    q = kvpolar.quantizer("kivi")
    p = q.quantize(torch.randn(2, 4, 32, 64))
    with pytest.raises(ValueError, match="head dim 32"):
        q.scores(torch.randn(2, 4, 1, 32), p)
    with pytest.raises(ValueError, match="GQA"):
        q.scores(torch.randn(2, 6, 1, 64), p)
    with pytest.raises(TypeError, match="KiviChannelTensor"):
        q.scores(torch.randn(2, 4, 1, 64), kvpolar.quantizer("none").quantize(torch.randn(2, 4, 32, 64)))


@pytest.mark.parametrize("dtype,bits", [(torch.float16, 16), (torch.bfloat16, 16), (torch.float32, 32)])
def test_none_is_identity(dtype, bits):
    x = torch.randn(2, 3, 17, 64).to(dtype)
    q = kvpolar.quantizer("none")
    p = q.quantize(x)
    assert torch.equal(q.dequantize(p), x)
    assert p.bits_per_element == bits
    queries = torch.randn(2, 3, 2, 64).to(dtype)
    assert torch.allclose(q.scores(queries, p), queries.float() @ x.float().transpose(-1, -2))


def test_quantized_tensor_reports_shape_dtype_device():
    x = torch.randn(2, 3, 40, 64, dtype=torch.bfloat16)
    p = kvpolar.quantizer("kivi").quantize(x)
    assert p.shape == x.shape and p.dtype == torch.bfloat16 and p.device == x.device
    assert "bits_per_element" in repr(p)


@pytest.mark.parametrize(
    "name,made_with,read_with,shown",
    [
        ("kivi", {"bits": 2}, {"bits": 4}, "bits=2, group_size=32; this quantizer has bits=4"),
        ("fp8", {"format": "e4m3"}, {"format": "e5m2"}, "format='e4m3'"),
        ("turbo", {"bits": 3}, {"bits": 3, "seed": 1}, "seed=0"),
        ("polar-rope", {"angle_bits": 4}, {"angle_bits": 3}, "angle_bits=4"),
    ],
)
def test_reading_a_tensor_quantized_with_other_parameters(name, made_with, read_with, shown):
    x = torch.randn(1, 2, 32, 64)
    p = kvpolar.quantizer(name, **made_with).quantize(x)
    other = kvpolar.quantizer(name, **read_with)
    for read in (other.dequantize, lambda p: other.scores(torch.randn(1, 2, 1, 64), p)):
        with pytest.raises(ValueError, match=f"tensor was quantized with .*{shown}"):
            read(p)
