"""kvpolar.kernels.bound_launch: relaunching a compiled kernel with a few arguments changed.

On the CPU there is no compiled kernel, so the decode launches always go through Triton's
dispatcher. These tests stand a compiled kernel in: one that runs the interpreted kernel with the
values ``BoundLaunch`` hands it, so a wrong argument slot (a stale query, partial buffer or window)
shows up as a wrong attention result, not only as a wrong recorded value.
"""

from __future__ import annotations

import gc
import inspect
import weakref

import pytest
import torch

import kvpolar
from kvpolar.decode_attention import reference_decode_attention
from kvpolar.kernels import bound_launch
from kvpolar.kernels import decode_attention as da
from kvpolar.kernels.bound_launch import BoundLaunch, specialization
from kernel_checks import DEVICE  # noqa: E402


class _CompiledStandIn:
    """What ``kernel[grid](...)`` returns when compiled: ``compiled[grid](*values)`` runs ``kernel``
    (here: the interpreted kernel) with every parameter's value in order."""

    run = function = packed_metadata = None

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*values):
            params = list(inspect.signature(self.kernel.fn).parameters)
            assert len(values) == len(params)
            self.kernel[grid](**dict(zip(params, values)))
        return launch


class _Dispatcher:
    """A Triton kernel whose dispatcher returns a compiled stand-in, as a GPU's does."""

    def __init__(self, kernel):
        self.kernel, self.fn = kernel, kernel.fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            return _CompiledStandIn(self.kernel)
        return launch


def _fake(*names):
    """A kernel stand-in over ``def kernel(*names)``: records each launch's arguments by name."""
    log = []
    namespace: dict = {}
    exec(f"def kernel({', '.join(names)}): pass", namespace)
    fn = namespace["kernel"]

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                names_only = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
                log.append(("dispatcher", grid, inspect.signature(fn).bind(*args, **names_only).arguments))
                return Compiled()
            return launch

    class Compiled:
        run = function = packed_metadata = None

        def __getitem__(self, grid):
            return lambda *values: log.append(("direct", grid, dict(zip(names, values))))

    kernel = Kernel()
    kernel.fn = fn
    return kernel, log


@pytest.fixture
def one_device(monkeypatch):
    monkeypatch.setattr(bound_launch, "_current_device", lambda: 0)


def test_specialization_follows_what_triton_compiles_for():
    assert specialization(1) != specialization(2) != specialization(16)
    assert specialization(3) == specialization(5) and specialization(32) == specialization(48)
    assert specialization(2**31 + 1) != specialization(3)  # 64-bit integers
    buf = torch.empty(64, dtype=torch.uint8)
    assert specialization(buf) == (torch.uint8, True) and specialization(buf[1:]) == (torch.uint8, False)
    assert specialization(buf.float()) != specialization(buf)
    assert specialization(0.5) == specialization(2.0)


def test_relaunch_puts_the_changed_values_in_their_slots(one_device):
    kernel, log = _fake("x", "n", "y", "BLOCK")
    launch = BoundLaunch(kernel, ("n", "x"))
    assert not launch.bound and not launch.relaunch((1,), (3, torch.zeros(4)))
    assert launch.prepared((3, torch.zeros(4))) is None
    x0, y, x1 = torch.zeros(4), torch.ones(4), torch.zeros(4)
    launch.launch((2,), (x0, 3, y), {"BLOCK": 64, "num_warps": 4})
    assert launch.bound and log[-1][0] == "dispatcher"
    _, prepared = launch.prepared((7, x1))
    assert prepared[0] is x1 and prepared[1:] == [7, y, 64]
    assert launch.relaunch((5,), (7, x1))
    kind, grid, values = log[-1]
    assert (kind, grid) == ("direct", (5, 1, 1))
    assert values["n"] == 7 and values["x"] is x1 and values["y"] is y and values["BLOCK"] == 64
    assert launch.direct_launches == 1


def test_other_specializations_go_back_to_the_dispatcher_and_are_kept(one_device):
    kernel, log = _fake("x", "n")
    launch = BoundLaunch(kernel, ("n",))
    x = torch.zeros(4)
    launch.launch((1,), (x, 3), {})
    assert launch.relaunch((1,), (5,))
    assert not launch.relaunch((1,), (16,)) and not launch.relaunch((1,), (1,))  # not launched
    assert [entry[0] for entry in log] == ["dispatcher", "direct"]
    launch.launch((1,), (x, 32), {})
    assert launch.relaunch((1,), (48,)) and launch.relaunch((1,), (7,))  # both kept
    assert [entry[2]["n"] for entry in log[-2:]] == [48, 7]


def test_device_tensors_reach_the_compiled_kernel_as_addresses(one_device, monkeypatch):
    """CUDA tensors (CPU tensors that say they are, here) go to the compiled kernel as their addresses:
    the bound ones converted once and kept alive, the varying ones at each launch, specialized as
    before; with ``ADDRESSES`` off, as tensors."""
    kernel, log = _fake("x", "n", "y", "BLOCK")
    launch = BoundLaunch(kernel, ("x", "n"))
    y, x = torch.ones(8), torch.zeros(16)
    y_address, kept = y.data_ptr(), weakref.ref(y)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    launch.launch((1,), (torch.zeros(4), 3, y), {"BLOCK": 16})
    del y
    gc.collect()
    assert kept() is not None  # bound by address: the tensor must outlive the binding
    assert launch.relaunch((2,), (x, 5))
    values = log[-1][2]
    assert values == {"x": x.data_ptr(), "n": 5, "y": y_address, "BLOCK": 16}
    assert all(type(values[name]) is int for name in ("x", "y"))
    assert not launch.relaunch((2,), (x[1:], 5))  # 4-byte aligned: another specialization, to the dispatcher
    monkeypatch.setattr(bound_launch, "ADDRESSES", False)
    assert launch.relaunch((2,), (x, 5))
    assert log[-1][2]["x"] is x and log[-1][2]["y"] is kept()


def test_varying_values_keyed_as_specialization_says():
    """The launch path's one-pass keys (``_keyed``) are ``specialization``'s, for every kind of value."""
    buf = torch.empty(64, dtype=torch.uint8)
    values = (1, 2, 16, 48, 7, -3, 2**31 - 1, 2**31, -(2**31) - 1, 2**63, 0.5, None, True, buf, buf[1:],
              buf.float(), torch.nn.Parameter(torch.zeros(4)))
    key, given = bound_launch._keyed(values)
    assert key == [specialization(v) for v in values]
    assert all(g is v for g, v in zip(given, values))  # (no CUDA tensor among them)


def test_host_tensors_are_handed_over_as_tensors(one_device):
    """A tensor not on a CUDA device keeps its object, so Triton's launcher can reject it."""
    kernel, log = _fake("x", "y")
    launch = BoundLaunch(kernel, ("x",))
    y = torch.ones(4)
    launch.launch((1,), (torch.zeros(4), y), {})
    x = torch.zeros(4)
    assert launch.relaunch((1,), (x,))
    assert log[-1][2]["x"] is x and log[-1][2]["y"] is y


def test_no_relaunch_on_another_device(monkeypatch):
    kernel, _ = _fake("x", "n")
    device = [0]
    monkeypatch.setattr(bound_launch, "_current_device", lambda: device[0])
    launch = BoundLaunch(kernel, ("n",))
    launch.launch((1,), (torch.zeros(2), 3), {})
    device[0] = 1
    assert not launch.relaunch((1,), (5,))


def test_varying_arguments_must_be_runtime_parameters():
    kernel, _ = _fake("x", "n")
    with pytest.raises(ValueError, match=r"not parameters: \['m'\]"):
        BoundLaunch(kernel, ("m",))
    with pytest.raises(ValueError, match=r"compile-time constants: \['BLOCK_N'\]"):
        BoundLaunch(da._split_kernel_t, ("q_ptr", "BLOCK_N"))
    BoundLaunch(da._split_kernel_t, da.PER_CALL)  # the library's own sets are runtime parameters
    BoundLaunch(da._split_kernel, da.PER_WINDOW)


def test_the_interpreter_binds_nothing(one_device):
    launch = BoundLaunch(type("K", (), {"__getitem__": lambda self, grid: lambda *a, **k: None})(), ("n",))
    launch.launch((1,), (3,), {})
    assert not launch.bound and not launch.relaunch((1,), (5,))


def test_bound_launch_keeps_no_varying_buffer_alive(one_device):
    kernel, log = _fake("x", "buf")
    launch = BoundLaunch(kernel, ("buf",))
    buf = torch.zeros(1 << 16)
    gone = weakref.ref(buf)
    launch.launch((1,), (torch.zeros(2), buf), {})
    assert launch.bound
    del buf
    log.clear()  # (the stand-in's own record of the launch)
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("key_fmt", ["kivi", "polar-rope"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("window", ["by-kv-head", "by-row", "launched"])
def test_decode_steps_through_bound_launches_match_the_reference(monkeypatch, key_fmt, masked, window):
    """Decode steps as a layer makes them: new query, partial buffers and a window one token longer
    at each step. After the first step the packed kernel and the window's kernels (the combine
    kernel attending the window by KV head or by query row, or the window's split launch and the
    plain combine kernel) run through their bound compiled kernels: on a GPU Triton's own, on the CPU
    the stand-in, which runs the interpreted kernel with the values handed to it."""
    if DEVICE == "cpu":
        monkeypatch.setattr(bound_launch, "_current_device", lambda: 0)
        for name in ("_split_kernel_t", "_split_kernel", "_combine_kernel", "_window_combine_kernel",
                     "_kv_head_window_combine_kernel"):
            monkeypatch.setattr(da, name, _Dispatcher(getattr(da, name)))
    fold = window != "launched"
    monkeypatch.setattr(da, "MAX_FOLDED_WINDOW", 1024 if fold else 0)
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD", window == "by-kv-head")
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD_SM_SHARE", 1 << 20)
    monkeypatch.setattr(da, "_WINDOW_LAUNCHES", {})
    monkeypatch.setattr(da, "_COMBINE_LAUNCHES", {})
    gen = torch.Generator().manual_seed(7)
    b, hkv, gqa, d, tk = 2, 2, 4, 64, 64
    k = torch.randn(b, hkv, tk + 40, d, generator=gen).half().to(DEVICE)
    v = torch.randn(b, hkv, tk + 40, d, generator=gen).half().to(DEVICE)
    kq = kvpolar.quantizer("kivi", bits=4, group_size=32, axis="channel") if key_fmt == "kivi" else \
        kvpolar.quantizer("polar-rope", radius_bits=4, angle_bits=4, group_size=32)
    vq = kvpolar.quantizer("kivi", bits=4, group_size=32, axis="token")
    pk, pv = kq.quantize(k[..., :tk, :]), vq.quantize(v[..., :tk, :])
    for step, r in enumerate((33, 34, 35)):  # window lengths of one specialization: 1 block of 64
        q = torch.randn(b, hkv * gqa, 1, d, generator=gen).half().to(DEVICE)
        rk, rv = k[..., tk:tk + r, :].clone(), v[..., tk:tk + r, :].clone()
        mask = None
        if masked:
            mask = torch.ones(b, 1, 1, tk + r, dtype=torch.bool, device=DEVICE)
            mask[0, ..., : 5 + step] = False
        out = da.fused_decode_attention(q, pk, pv, kq, vq, rk, rv, d**-0.5, mask)
        ref = reference_decode_attention(q.float(), pk, pv, kq, vq, rk.float(), rv.float(), d**-0.5, mask)
        torch.testing.assert_close(out.float(), ref, atol=3e-3, rtol=3e-3)
    packed = da._PLANS[pk][2].launch
    window_launches = list(da._WINDOW_LAUNCHES.values())
    combine = list(da._COMBINE_LAUNCHES.values())
    assert len(window_launches) == (0 if fold else 1) and len(combine) == 1
    assert combine[0].kernel.fn is {"by-kv-head": da._kv_head_window_combine_kernel, "by-row": da._window_combine_kernel,
                                    "launched": da._combine_kernel}[window].fn
    # every step after the first
    assert packed.direct_launches == combine[0].direct_launches == 2
    assert all(w.direct_launches == 2 for w in window_launches)
