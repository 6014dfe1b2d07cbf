"""Port of VisCy's `packages/viscy-data/tests/test_channel_dropout.py` (mehta-lab/VisCy, branch
app-dynaclr, commit 0d04b3504d6c621191e88a98ab0de7e6baa7e8e0): the ChannelDropout module.

ChannelDropout runs on the training device, in the client (`cellfeed.client.transforms`), so these
are direct tests of cellfeed's module, as VisCy's are of its own. The DataModule's use of it on
batches streamed from a real server (train drops, validation does not: docs/dynaclr.md,
"Differences from VisCy") is tested in tests/test_viscy_datamodule.py.
"""

from __future__ import annotations

import pytest
import torch

from cellfeed.client.transforms import ChannelDropout


def _make_input(batch: int = 4, channels: int = 2, z: int = 8, y: int = 64, x: int = 64) -> torch.Tensor:
    return torch.randn(batch, channels, z, y, x) + 1.0


def _module(channels=(1,), p=1.0, train=True) -> ChannelDropout:
    module = ChannelDropout(channels=list(channels), p=p)
    return module.train(train)


def test_channel_dropout_zeros_specified_channel():
    assert (_module()(_make_input())[:, 1] == 0).all()


def test_channel_dropout_preserves_other_channels():
    inp = _make_input()
    assert torch.equal(_module()(inp)[:, 0], inp[:, 0])


def test_channel_dropout_p_zero_identity():
    inp = _make_input()
    assert torch.equal(_module(p=0.0)(inp), inp)


def test_channel_dropout_p_one_always_drops():
    module = _module()
    for _ in range(10):
        assert (module(_make_input())[:, 1] == 0).all()


def test_channel_dropout_probabilistic():
    module = _module(p=0.5)
    dropped = sum(bool((module(_make_input(batch=1))[0, 1] == 0).all()) for _ in range(100))
    assert 20 <= dropped <= 80


def test_channel_dropout_eval_mode_identity():
    inp = _make_input()
    assert torch.equal(_module(train=False)(inp), inp)


def test_channel_dropout_per_sample_independent():
    module = _module(p=0.5)
    for _ in range(50):
        dropped = [(s[1] == 0).all().item() for s in module(_make_input(batch=16))]
        if any(dropped) and not all(dropped):
            return
    pytest.fail("per-sample dropout showed no variation across the batch")


def test_channel_dropout_preserves_dtype_device():
    inp = _make_input().float()
    out = _module()(inp)
    assert out.dtype == inp.dtype and out.device == inp.device


def test_channel_dropout_does_not_modify_input():
    inp = _make_input()
    clone = inp.clone()
    _module()(inp)
    assert torch.equal(inp, clone)


def test_channel_dropout_multiple_channels():
    out = _module(channels=(0, 1))(_make_input())
    assert (out[:, 0] == 0).all() and (out[:, 1] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_channel_dropout_cuda():
    out = _module().cuda()(_make_input().cuda())
    assert out.device.type == "cuda" and (out[:, 1] == 0).all()
