"""Every path to a rewritten module sees it, and methods other than ``forward`` reach the gates.

Issue 24, items 3 and 6, in plain torch: monai's ``DynUNet`` registers each encoder block at two
paths and runs it through the second; open_clip's ``CLIP`` passes a root buffer (its causal
mask) down to its text blocks and calls them from ``encode_text`` as well as ``forward``.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fxsd


class Block(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv(x))


class Skip(nn.Module):
    def __init__(self, downsample: nn.Module) -> None:
        super().__init__()
        self.downsample = downsample


class TwoPaths(nn.Module):
    """``a`` is also registered as ``skip.downsample`` (``named_modules()`` lists it once, as
    ``a``), and ``forward`` runs it through the second path, as DynUNet does."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Block()
        self.skip = Skip(self.a)
        self.b = Block()
        self.head = nn.Conv2d(4, 2, 1)
        self.output = self.head  # an alias without a join: copied once too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.b(self.skip.downsample(x)))


def _count_gate_calls(model: nn.Module) -> list[int]:
    calls = [0]
    for gate in fxsd.gates(model):
        gate.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("inplace", [False, True])
def test_aliased_block_is_gated_at_every_path(inplace: bool) -> None:
    torch.manual_seed(0)
    plain = TwoPaths().eval()
    model = copy.deepcopy(plain)
    gated = fxsd.stochastic_depth(model, 0.5, inplace=inplace)
    assert (gated is model) is inplace
    assert gated.a is gated.skip.downsample
    assert gated.output is gated.head and (gated.head is model.head) is inplace
    assert type(gated.a).__name__ == "Block" and hasattr(gated.skip.downsample, "residual_gate")
    # one canonical path in the record: the first, as named_modules() and the trace name it
    assert fxsd.get_record(gated).rewritten == ("a", "b")
    assert list(gated.state_dict()) == list(plain.state_dict())
    assert "skip.downsample.conv.weight" in gated.state_dict()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(gated(x), plain(x))
        fxsd.set_drop_rate(gated, 0.0)
        calls = _count_gate_calls(gated)
        gated.train()(x)
    assert calls[0] == 2


def test_aliasing_survives_copy_and_save() -> None:
    gated = fxsd.stochastic_depth(TwoPaths(), 0.5)
    copied = copy.deepcopy(gated)
    assert copied.a is copied.skip.downsample and copied.a is not gated.a
    buffer = io.BytesIO()
    torch.save(gated, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.a is loaded.skip.downsample


class MaskedBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        return x + self.fc(h)


class Stack(nn.Module):
    def __init__(self, d: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MaskedBlock(d) for _ in range(depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask=mask)
        return x


class TwoTowers(nn.Module):
    """Like open_clip's ``CLIP``: a root buffer passed down to the blocks, and a second public
    method (``encode_text``) that runs them."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.text = Stack(d, 2)
        self.image = Stack(d, 2)
        self.register_buffer("mask", torch.rand(d) < 0.3, persistent=False)

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return self.text(self.embed(x), mask=self.mask)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image(x)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.encode_image(image) + self.encode_text(text)


def test_second_method_reaches_gates_of_blocks_given_a_root_buffer() -> None:
    torch.manual_seed(0)
    plain = TwoTowers().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = fxsd.stochastic_depth(plain, 0.5)
    image, text = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(gated(image, text), plain(image, text))
        assert torch.equal(gated.encode_text(text), plain.encode_text(text))
        fxsd.set_drop_rate(gated, 0.0)
        calls = _count_gate_calls(gated)
        gated.train().encode_text(text)
        assert calls[0] == 2  # each text block's gate, reached through encode_text
        gated.eval()
        # the block reads the tensor it is passed, not a copy of the buffer
        other = ~plain.mask
        assert torch.equal(gated.text.blocks[0](text, mask=other),
                           plain.text.blocks[0](text, mask=other))
    assert type(gated) is TwoTowers  # the root owns nothing: it is not rewritten
    assert fxsd.get_record(gated).rewritten == (
        "text.blocks.0", "text.blocks.1", "image.blocks.0", "image.blocks.1")
    assert not [w for w in caught if w.category.__name__ == "RootJoinsWarning"]


class RootJoin(nn.Module):
    """A root whose own ``forward`` performs the join: only it can own it."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.head = nn.Linear(d, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def _private(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def scale(self) -> float:  # uses no child: not an entry point
        return 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.body(x))


def test_root_owned_join_warns_naming_other_methods() -> None:
    with pytest.warns(fxsd.errors.RootJoinsWarning, match=r"\(features\(\)\)") as caught:
        gated = fxsd.stochastic_depth(RootJoin(), 0.5)
    assert len([w for w in caught if w.category is fxsd.errors.RootJoinsWarning]) == 1
    assert fxsd.get_record(gated).rewritten == ("",)
    assert fxsd.decisions.owners.other_entry_points(RootJoin()) == ["features"]


def test_root_owned_join_without_other_methods_is_silent() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error", fxsd.errors.RootJoinsWarning)
        fxsd.stochastic_depth(Plain(), 0.5)
