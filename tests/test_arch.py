import pytest
import torch
from torch import nn

import steerkit as sk
from steerkit import arch
from tests.conftest import TINY


def test_blocks_and_width(tiny):
    assert len(sk.get_blocks(tiny)) == TINY["layers"]
    assert sk.num_layers(tiny) == TINY["layers"]
    assert sk.hidden_size(tiny) == TINY["hidden"]


def test_zeroing_the_writers_makes_the_block_the_identity(tiny):
    """The writers found are exactly what the block adds to the residual stream."""
    writers = sk.residual_writers(tiny, 1).values()
    zero = [w.register_forward_hook(lambda m, i, o: torch.zeros_like(o)) for w in writers]
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    try:
        out = tiny(ids, output_hidden_states=True)
    finally:
        for h in zero:
            h.remove()
    before, after = out.hidden_states[1], out.hidden_states[2]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # and without zeroing, the block does change the stream
    plain = tiny(ids, output_hidden_states=True)
    assert (plain.hidden_states[2] - plain.hidden_states[1]).abs().max() > 1e-3


def test_writers_output_the_residual_width(tiny):
    ids = torch.tensor([[5, 17, 99]])
    shapes = []
    hooks = [
        w.register_forward_hook(lambda m, i, o: shapes.append(o.shape[-1]))
        for w in sk.residual_writers(tiny, 0).values()
    ]
    try:
        tiny(ids)
    finally:
        for h in hooks:
            h.remove()
    assert shapes == [TINY["hidden"], TINY["hidden"]]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.out_proj = nn.Linear(4, 4)
        self.mlp = nn.Module()
        self.mlp.fc2 = nn.Linear(4, 4)


class _Config:
    model_type = "brand_new_arch"
    num_hidden_layers = 2
    hidden_size = 4


class _Unknown(nn.Module):
    def __init__(self, n_blocks=2):
        super().__init__()
        self.config = _Config()
        self.backbone = nn.Module()
        self.backbone.stack = nn.ModuleList([_Block() for _ in range(n_blocks)])


def test_unknown_architecture_found_by_generic_search():
    model = _Unknown()
    assert sk.get_blocks(model) is model.backbone.stack
    writers = sk.residual_writers(model, 1)
    assert writers["attn"] is model.backbone.stack[1].attn.out_proj
    assert writers["mlp"] is model.backbone.stack[1].mlp.fc2


def test_unknown_architecture_without_blocks_names_the_fix():
    model = _Unknown(n_blocks=5)  # config says 2: nothing matches
    with pytest.raises(ValueError, match=r"blocks='model.layers'") as err:
        sk.get_blocks(model)
    assert "brand_new_arch" in str(err.value)


def test_explicit_blocks_path():
    model = _Unknown(n_blocks=5)
    assert len(sk.get_blocks(model, blocks="backbone.stack")) == 5
    with pytest.raises(ValueError, match="not a non-empty nn.ModuleList"):
        sk.get_blocks(model, blocks="backbone.nothing")


def test_layer_range_errors(tiny_llama):
    with pytest.raises(ValueError, match=r"blocks 0\.\.2"):
        arch.check_layer(tiny_llama, 3)
    with pytest.raises(ValueError, match="out of range"):
        arch.check_layer(tiny_llama, -1)
    assert arch.check_layer(tiny_llama, 2) == 2


@pytest.mark.parametrize(
    "spec, expected",
    [("all", [0, 1, 2, 3, 4, 5]), ("3", [3]), ("1,4", [1, 4]), ("2-4", [2, 3, 4]), ("0,3-5", [0, 3, 4, 5])],
)
def test_parse_layers(spec, expected):
    assert arch.parse_layers(spec, 6) == expected


def test_parse_layers_rejects_garbage_and_range():
    with pytest.raises(ValueError, match="cannot read layers"):
        arch.parse_layers("four", 6)
    with pytest.raises(ValueError, match=r"blocks 0\.\.5"):
        arch.parse_layers("2-9", 6)
