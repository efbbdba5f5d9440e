import math

import pytest
import torch

import kvpolar
from kvpolar import synthetic
from kvpolar.quantizers.polar_rope import dequantize_polar, table_scores

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def reference_polar(x: torch.Tensor, rb: int, ab: int, group: int, pairing: str, angle_range: str) -> torch.Tensor:
    """Plain loop reference: per (token group, pair) min/max of radius and angle, round to nearest."""
    d = x.shape[-1]
    ix, iy = synthetic.rope_pair_index(d, pairing)
    out = torch.empty_like(x, dtype=torch.float32)

    def quant(v, lo, hi, bits):  # statistics rounded to x.dtype, codes against the rounded ones
        lo_s = lo.to(x.dtype).float()
        scale = ((hi - lo_s) / (2**bits - 1)).to(x.dtype).float()
        inv = 1 / scale if scale > 0 else 0.0
        return lo_s + torch.round((v - lo_s) * inv).clamp(0, 2**bits - 1) * scale

    for start in range(0, x.shape[-2], group):
        for j in range(d // 2):
            for lead in range(x.shape[0]):
                px = x[lead, start : start + group, ix[j]].float()
                py = x[lead, start : start + group, iy[j]].float()
                r = torch.sqrt(px * px + py * py)
                theta = torch.atan2(py, px) % (2 * math.pi)
                if angle_range == "minmax":
                    lo, hi = theta.min(), theta.max()
                else:  # brute force: try every angle as the start of the covering arc
                    best = None
                    for t0 in theta:
                        span = ((theta - t0) % (2 * math.pi)).max()
                        if best is None or span < best[1]:
                            best = (t0, span)
                    lo, hi = best[0], best[0] + best[1]
                    theta = lo + (theta - lo) % (2 * math.pi)
                    if lo >= math.pi:
                        lo, hi, theta = lo - 2 * math.pi, hi - 2 * math.pi, theta - 2 * math.pi
                r_hat = quant(r, r.min(), r.max(), rb)
                t_hat = quant(theta, lo, hi, ab)
                out[lead, start : start + group, ix[j]] = r_hat * torch.cos(t_hat)
                out[lead, start : start + group, iy[j]] = r_hat * torch.sin(t_hat)
    return out


@pytest.mark.parametrize("angle_range", ["minmax", "shortest-arc"])
@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("dtype,bits", [(torch.float16, (2, 4)), (torch.bfloat16, (3, 3)), (torch.float32, (1, 7))])
def test_matches_plain_loop_reference(angle_range, pairing, dtype, bits):
    x = synthetic.rope_keys(1, 2, 37, 16, outlier_pairs=2, pairing=pairing, seed=7).reshape(2, 37, 16).to(dtype)
    q = kvpolar.quantizer("polar-rope", radius_bits=bits[0], angle_bits=bits[1], group_size=16,
                          pairing=pairing, angle_range=angle_range)
    p = q.quantize(x)
    y = dequantize_polar(p)
    ref = reference_polar(x, bits[0], bits[1], 16, pairing, angle_range)
    # torch.round vs a level boundary hit by float rounding differently: allow a few off-by-one codes.
    close = (y - ref).abs() <= 1e-4 * ref.abs().max()
    assert close.float().mean() > 0.98
    assert q.dequantize(p).dtype == dtype and q.dequantize(p).shape == x.shape


def test_interleaved_pairing_is_half_pairing_on_permuted_channels():
    """pairing='interleaved' pairs (2j, 2j+1); 'half' pairs (j, j+D/2): same result after a permutation."""
    x = synthetic.rope_keys(1, 2, 70, 32, pairing="interleaved", seed=3)
    to_half = torch.cat([torch.arange(0, 32, 2), torch.arange(1, 32, 2)])  # interleaved -> half layout
    inter = kvpolar.quantizer("polar-rope", pairing="interleaved", group_size=32)
    half = kvpolar.quantizer("polar-rope", pairing="half", group_size=32)
    a, b = inter.quantize(x), half.quantize(x[..., to_half])
    assert torch.equal(a.codes, b.codes) and torch.equal(a.angle_min, b.angle_min)
    assert torch.equal(inter.dequantize(a)[..., to_half], half.dequantize(b))


@pytest.mark.parametrize("rb,ab,group", [(2, 4, 128), (3, 3, 128), (4, 4, 128), (2, 4, 32), (1, 1, 64), (1, 7, 128)])
def test_exact_bits_per_element(rb, ab, group):
    x = torch.randn(2, 4, 256, 128, dtype=torch.float16)
    p = kvpolar.quantizer("polar-rope", radius_bits=rb, angle_bits=ab, group_size=group).quantize(x)
    expected = (rb + ab) / 2 + 64 / (2 * group)
    assert p.bits_per_element == expected
    assert p.nbytes == x.numel() * expected / 8
    assert p.codes.shape == (2, 4, 256, math.ceil(64 * (rb + ab) / 8))
    assert p.angle_min.shape == (2, 4, 256 // group, 64) and p.angle_min.dtype == torch.float16


def test_partial_last_group_and_length_one():
    q = kvpolar.quantizer("polar-rope", group_size=32)
    x = synthetic.rope_keys(1, 2, 45, 32, seed=1)
    p = q.quantize(x)
    assert p.radius_min.shape == (1, 2, 2, 16)
    assert p.nbytes == 45 * 2 * 16 * 6 / 8 + 2 * 2 * 16 * 4 * 2
    # The partial group is quantized with its own statistics: same as quantizing it alone.
    tail = q.quantize(x[..., 32:, :])
    assert torch.equal(q.dequantize(p)[..., 32:, :], q.dequantize(tail))
    one = q.quantize(x[..., :1, :])
    assert (q.dequantize(one).float() - x[..., :1, :].float()).abs().max() < 1e-2 * x.float().abs().max()


def test_cat_equals_quantizing_together():
    q = kvpolar.quantizer("polar-rope", group_size=32)
    x = synthetic.rope_keys(2, 2, 100, 64, seed=2)
    whole = q.quantize(x)
    parts = kvpolar.cat([q.quantize(x[..., :64, :]), q.quantize(x[..., 64:96, :]), q.quantize(x[..., 96:, :])])
    assert torch.equal(q.dequantize(parts), q.dequantize(whole)) and parts.nbytes == whole.nbytes
    with pytest.raises(ValueError, match="partial group"):
        q.quantize(x[..., :40, :]).cat(q.quantize(x[..., 40:72, :]))


@pytest.mark.parametrize("tokens,gqa", [(1, 1), (45, 4), (96, 1), (130, 8)])
@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_table_scores_equal_product_with_dequantized_keys(tokens, gqa, pairing):
    q = kvpolar.quantizer("polar-rope", group_size=32, pairing=pairing)
    keys = synthetic.rope_keys(2, 2, tokens, 64, pairing=pairing, seed=tokens).float()
    p = q.quantize(keys)
    queries = torch.randn(2, 2 * gqa, 3, 64)
    s = q.scores(queries, p)
    ref = queries.double() @ dequantize_polar(p, torch.float64).repeat_interleave(gqa, dim=1).transpose(-1, -2)
    assert s.shape == (2, 2 * gqa, 3, tokens) and s.dtype == torch.float32
    # float32 arithmetic on float32 data: error at float32 rounding of the sums.
    assert (s.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(table_scores(queries[:, :2], p).double(), queries[:, :2].double() @ dequantize_polar(p, torch.float64).transpose(-1, -2), rtol=0, atol=1e-5 * ref.abs().max())


def test_error_shrinks_with_bits_and_shortest_arc_helps():
    x = synthetic.rope_keys(1, 4, 512, 128, seed=5)

    def err(**params):
        q = kvpolar.quantizer("polar-rope", **params)
        return ((q.dequantize(q.quantize(x)).float() - x.float()).norm() / x.float().norm()).item()

    assert err(radius_bits=4, angle_bits=4) < err(radius_bits=2, angle_bits=4) < err(radius_bits=1, angle_bits=4)
    for rb, ab in [(2, 4), (3, 3), (4, 4)]:
        assert err(radius_bits=rb, angle_bits=ab, angle_range="shortest-arc") < err(radius_bits=rb, angle_bits=ab, angle_range="minmax")


def test_wrapped_group_gets_a_short_arc():
    """Angles around 0 / 2*pi: minmax spans nearly 2*pi, the shortest arc only the true spread."""
    angle = torch.linspace(-0.3, 0.3, 64)
    x = torch.stack([angle.cos(), angle.sin()], dim=-1).reshape(1, 64, 2)
    arc = kvpolar.quantizer("polar-rope", angle_range="shortest-arc", group_size=64).quantize(x)
    mm = kvpolar.quantizer("polar-rope", angle_range="minmax", group_size=64).quantize(x)
    assert float(arc.angle_scale) * 15 == pytest.approx(0.6, rel=1e-3) and float(arc.angle_min) == pytest.approx(-0.3, rel=1e-3)
    assert float(mm.angle_scale) * 15 > 6.0


@pytest.mark.parametrize(
    "params,match",
    [
        ({"radius_bits": 4, "angle_bits": 5}, "radius_bits \\+ angle_bits=9"),
        ({"radius_bits": 0}, "radius_bits=0"),
        ({"angle_bits": -1}, "angle_bits=-1"),
        ({"angle_bits": 2.0}, "angle_bits=2.0"),
        ({"group_size": 0}, "group_size=0"),
        ({"pairing": "rotate_half"}, "pairing='rotate_half'"),
        ({"angle_range": "auto"}, "angle_range='auto'"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match) as info:
        kvpolar.quantizer("polar-rope", **params)
    assert "allowed" in str(info.value)


def test_odd_head_dim_and_mismatched_tensor():
    with pytest.raises(ValueError, match="head dim 63 is odd"):
        kvpolar.quantizer("polar-rope").quantize(torch.randn(1, 8, 63))
    p = kvpolar.quantizer("polar-rope", radius_bits=3, angle_bits=3).quantize(torch.randn(1, 8, 64))
    with pytest.raises(ValueError, match="quantized with"):
        kvpolar.quantizer("polar-rope").dequantize(p)
    with pytest.raises(TypeError, match="PolarRopeTensor"):
        kvpolar.quantizer("polar-rope").dequantize(kvpolar.quantizer("kivi").quantize(torch.randn(1, 8, 64)))
