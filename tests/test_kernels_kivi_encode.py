"""The KIVI encoder kernel against the PyTorch quantizer, bit for bit (TRITON_INTERPRET=1 without a GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import kvpolar  # noqa: E402
from kvpolar.kernels.kivi_encode import kivi_encode  # noqa: E402
from kvpolar.quantized import cat, laid_out_tokens_contiguous  # noqa: E402
from kvpolar.quantizers.kivi import Kivi  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fresh(shape, dtype, seed=None):
    seed = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * (torch.rand(shape[-1], generator=gen) * 4 + 0.01)
    return x.to(dtype).to(DEVICE)


def reference(x, bits, group_size, axis):
    """The PyTorch quantizer's result (its CPU path, whatever the device)."""
    return Kivi(bits=bits, group_size=group_size, axis=axis).quantize(x.cpu())


def assert_same_storage(got, want):
    assert type(got) is type(want) and got.shape == want.shape and got.dtype == want.dtype
    for name, tensor in want.stored_tensors().items():
        mine, tensor = getattr(got, name).cpu(), tensor.cpu()
        assert mine.shape == tensor.shape and mine.dtype == tensor.dtype, name
        assert torch.equal(mine, tensor), (name, (mine.float() - tensor.float()).abs().max())


@pytest.mark.parametrize("bits,group_size,shape,dtype", [
    (2, 32, (2, 3, 45, 64), torch.float16),  # a partial last group
    (3, 16, (1, 2, 37, 32), torch.bfloat16),  # codes straddle bytes
    (4, 32, (2, 1, 1, 128), torch.float16),  # one token
    (8, 128, (1, 2, 70, 64), torch.float32),  # group > tokens
    (2, 32, (1, 2, 64, 48), torch.float16),  # head dim not a power of two
])
def test_keys_match_the_quantizer(bits, group_size, shape, dtype):
    x = fresh(shape, dtype)
    assert_same_storage(kivi_encode(x, bits, group_size, "channel"), reference(x, bits, group_size, "channel"))


@pytest.mark.parametrize("bits,group_size,shape,dtype", [
    (2, 32, (2, 2, 19, 128), torch.bfloat16),
    (3, 32, (1, 3, 40, 64), torch.float16),
    (4, 16, (1, 2, 33, 64), torch.float32),
    (8, 32, (2, 1, 1, 32), torch.float16),
])
def test_values_match_the_quantizer(bits, group_size, shape, dtype):
    x = fresh(shape, dtype)
    got = kivi_encode(x, bits, group_size, "token")
    assert_same_storage(got, reference(x, bits, group_size, "token"))
    if shape[-2] > 1:  # the layout the fused kernel reads: each group's scales with the tokens adjacent
        assert laid_out_tokens_contiguous(got.scale) and laid_out_tokens_contiguous(got.minimum)


def test_values_the_kernel_cannot_group_are_refused():
    with pytest.raises(ValueError, match=r"head dim 48 and group_size=16: allowed: powers of two"):
        kivi_encode(fresh((1, 1, 4, 48), torch.float16), 2, 16, "token")


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_ties_round_to_even_as_torch_round(axis):
    """Values exactly between two levels (minimum 0, maximum 3, 2 bits: scale 1) take the even level."""
    row = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 0.5] * 4)  # 32 values
    x = (row[:, None].expand(32, 32) if axis == "channel" else row[None, :].expand(32, 32)).contiguous()
    x = x[None, None].to(torch.float16).to(DEVICE)
    got = kivi_encode(x, 2, 32, axis)
    assert_same_storage(got, reference(x, 2, 32, axis))
    codes = Kivi(bits=2, group_size=32, axis=axis)._codes(got).cpu()
    ties = codes[0, 0, :, 1:4] if axis == "token" else codes[0, 0, 1:4, :].T
    assert (ties == torch.tensor([0, 2, 2], dtype=torch.uint8)).all()


def test_a_cache_grown_from_encoded_parts_dequantizes_as_one():
    """Parts encoded on the device join with ``cat`` as the quantizer's parts do."""
    x = fresh((1, 2, 80, 64), torch.float16)
    for axis in ("channel", "token"):
        q = Kivi(bits=2, group_size=32, axis=axis)
        joined = cat([kivi_encode(x[..., :64, :], 2, 32, axis), kivi_encode(x[..., 64:, :], 2, 32, axis)])
        assert torch.equal(q.dequantize(joined).cpu(), q.dequantize(q.quantize(x.cpu())))


def test_the_quantizer_takes_the_kernel_on_cuda_only_where_it_applies(monkeypatch):
    """On CUDA ``Kivi.quantize`` runs the kernel (per channel: any head dim; per token: powers of two)."""
    from kvpolar.quantizers import kivi

    monkeypatch.setattr(kivi, "triton_available", lambda: True)
    on_gpu = torch.empty(0, 48).cuda() if torch.cuda.is_available() else None
    config = kivi.KiviConfig
    cpu = torch.randn(1, 8, 48)
    assert not kivi.encodes_on_device(cpu, config(axis="channel"))  # the CPU: the PyTorch path
    if on_gpu is not None:
        assert kivi.encodes_on_device(on_gpu, config(axis="channel"))
        assert not kivi.encodes_on_device(on_gpu, config(axis="token", group_size=16))  # 48 channels
        assert kivi.encodes_on_device(torch.empty(0, 64).cuda(), config(axis="token", group_size=16))
    monkeypatch.setattr(kivi, "triton_available", lambda: False)
    if on_gpu is not None:
        assert not kivi.encodes_on_device(on_gpu, config(axis="channel"))


def test_a_cache_quantizing_through_the_encoder_holds_what_the_pytorch_path_holds(monkeypatch):
    """A tiny Llama's prompt and decode steps with kivi-2 (the prompt's complete chunks, then each chunk
    that leaves the residual window) quantized by the encoder, as on CUDA (here under the CPU
    interpreter): every layer's packed keys and values, and the logits, equal the PyTorch path's."""
    from cache_helpers import VOCAB, QuantizedKVCache, config, tiny_model

    from kvpolar.quantizers import kivi

    model = tiny_model("llama", layers=2).to(DEVICE)
    ids = torch.randint(1, VOCAB, (2, 75), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def run():
        cache = QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
        logits = []
        with torch.no_grad():
            for step in (ids[:, :60], *ids[:, 60:].split(1, dim=1)):
                out = model(input_ids=step, use_cache=True, **kvpolar.cache_kwargs(model, cache))
                logits.append(out.logits[:, -1])
        return cache, torch.stack(logits)

    monkeypatch.setattr(kivi, "encodes_on_device", lambda x, c: False)  # the PyTorch path (CUDA too)
    plain_cache, plain_logits = run()
    calls = []
    # (the cache's CPU probe of the stored form stays on the PyTorch path where the model is on CUDA)
    monkeypatch.setattr(kivi, "encodes_on_device",
                        lambda x, c: x.device.type == DEVICE and (calls.append(c.axis) or True))
    cache, logits = run()
    assert "channel" in calls and "token" in calls
    assert torch.equal(logits, plain_logits)
    for layer, plain in zip(cache.layers, plain_cache.layers):
        assert layer.packed_keys.num_tokens == 64
        for got, want in ((layer.packed_keys, plain.packed_keys), (layer.packed_values, plain.packed_values)):
            assert_same_storage(got, want)
