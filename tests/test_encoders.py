"""Shared encoders: output shapes, the random-shift augmentation, gradients, the encode-only world model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from latentrl.world_models import (
    DreamerEncoder,
    DrQEncoder,
    ObservationEncoder,
    RandomShiftsAug,
    StateEncoder,
    WorldModel,
    make_encoder,
)


def _pixels(batch: int, channels: int, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)


@pytest.mark.parametrize("frames", [1, 3])
def test_drq_encoder_shapes(frames):
    enc = DrQEncoder((3 * frames, 64, 64))
    assert enc.repr_dim == 32 * 25 * 25
    assert enc(_pixels(2, 3 * frames)).shape == (2, 32 * 25 * 25)
    assert DrQEncoder((3 * frames, 84, 84)).repr_dim == 32 * 35 * 35


@pytest.mark.parametrize("frames", [1, 3])
def test_dreamer_encoder_shapes(frames):
    enc = DreamerEncoder((3 * frames, 64, 64))
    assert enc.repr_dim == 1536
    assert enc(_pixels(2, 3 * frames)).shape == (2, 1536)
    small = DreamerEncoder((3 * frames, 64, 64), depth=8)
    assert small(_pixels(2, 3 * frames)).shape == (2, 64 * 2 * 2)


def test_encoders_scale_pixels():
    """DrQ feeds x / 255 - 0.5 to its convs, Dreamer x / 255."""
    x = _pixels(2, 3)
    drq = DrQEncoder((3, 64, 64))
    torch.testing.assert_close(drq(x), drq.convnet(x.float() / 255.0 - 0.5).flatten(1))
    assert [m.stride for m in drq.convnet if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] + [(1, 1)] * 3
    dreamer = DreamerEncoder((3, 64, 64), depth=4)
    torch.testing.assert_close(dreamer(x), dreamer.convnet(x.float() / 255.0).flatten(1))


def test_state_encoder():
    enc = StateEncoder(24, hidden_dims=(64, 64), out_dim=16, layer_norm_tanh=True)
    out = enc(torch.randn(5, 24))
    assert out.shape == (5, 16) and enc.repr_dim == 16
    assert isinstance(enc.net[1], torch.nn.LayerNorm) and isinstance(enc.net[2], torch.nn.Tanh)
    identity = make_encoder("identity", (24,))
    x = torch.randn(5, 24, dtype=torch.float64)
    assert identity.repr_dim == 24
    torch.testing.assert_close(identity(x), x.float())


def test_make_encoder_names_and_errors():
    assert isinstance(make_encoder("drq", (9, 64, 64)), DrQEncoder)
    assert isinstance(make_encoder("dreamer", (9, 64, 64), depth=16), DreamerEncoder)
    assert make_encoder("state", (24,), hidden_dims=(32,)).repr_dim == 32
    with pytest.raises(ValueError, match="valid encoders"):
        make_encoder("resnet", (9, 64, 64))
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        make_encoder("drq", (24,))
    with pytest.raises(ValueError, match=r"\[D\]"):
        make_encoder("state", (9, 64, 64))


def test_random_shift_keeps_shape_and_shifts_by_at_most_pad():
    torch.manual_seed(0)
    pad = 4
    aug = RandomShiftsAug(pad)
    x = _pixels(16, 9).float()
    out = aug(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    padded = F.pad(x, (pad,) * 4, mode="replicate")
    offsets = set()
    for i in range(len(x)):
        # The output is an exact crop of the replicate-padded image at some offset in [0, 2 * pad].
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.allclose(out[i], padded[i, :, dy : dy + 64, dx : dx + 64], atol=0.01)
        ]
        assert len(matches) == 1, f"image {i}: not a crop within pad={pad} pixels"
        offsets.add(matches[0])
    assert len(offsets) > 1, "every image got the same shift"


def test_random_shift_moves_a_dot_by_at_most_pad():
    torch.manual_seed(1)
    x = torch.zeros(64, 3, 32, 32)
    x[:, :, 16, 16] = 255.0
    out = RandomShiftsAug(pad=3)(x)
    for img in out:
        ys, xs = torch.nonzero(img[0] > 127, as_tuple=True)
        assert len(ys) == 1
        assert abs(int(ys[0]) - 16) <= 3 and abs(int(xs[0]) - 16) <= 3
        assert img[0].sum() == pytest.approx(255.0, abs=1e-2)


def test_random_shift_non_square():
    out = RandomShiftsAug(2)(_pixels(3, 3, 8).float()[..., :6])
    assert out.shape == (3, 3, 8, 6)


@pytest.mark.parametrize("kind", ["drq", "dreamer"])
def test_gradients_flow_through_pixel_encoders(kind):
    kw = {"depth": 4} if kind == "dreamer" else {}
    enc = make_encoder(kind, (9, 64, 64), **kw)
    x = _pixels(2, 9).float().requires_grad_(True)
    enc(RandomShiftsAug(4)(x)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradients_flow_through_state_encoder():
    enc = StateEncoder(10, hidden_dims=(16, 16), out_dim=4, layer_norm_tanh=True)
    enc(torch.randn(8, 10)).square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_observation_encoder_is_an_encode_world_model():
    pixels = ObservationEncoder(DrQEncoder((9, 64, 64)), "pixels", aug=RandomShiftsAug(4))
    assert isinstance(pixels, WorldModel) and pixels.capabilities == frozenset({"encode"})
    obs = TensorDict({"pixels": _pixels(3, 9), "state": torch.randn(3, 24)}, [3])
    z = pixels.encode(obs)
    assert z.shape == (3, 32 * 25 * 25)
    torch.testing.assert_close(pixels.encode(obs), z)  # no augmentation unless asked
    assert not torch.allclose(pixels.encode(obs, augment=True), z)
    seq = TensorDict({"pixels": _pixels(6, 9).reshape(2, 3, 9, 64, 64)}, [2, 3])
    assert pixels.encode(seq).shape == (2, 3, 32 * 25 * 25)

    state = ObservationEncoder(make_encoder("state", (24,), hidden_dims=(32,)), "state")
    assert state.encode(obs).shape == (3, 32)
    with pytest.raises(KeyError, match="pixels"):
        pixels.encode(TensorDict({"state": torch.randn(3, 24)}, [3]))
    with pytest.raises(NotImplementedError, match="transition"):
        pixels.transition(z, torch.zeros(3, 6))
