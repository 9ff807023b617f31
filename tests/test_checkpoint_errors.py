"""Errors that steer right: non-checkpoints given to ckpt_path, cyclic snapshots, oversized declared networks."""

from __future__ import annotations

import pickle

import pytest
import torch
from test_train import compose_cfg, tiny

from edmlab import checkpoints
from edmlab.checkpoints import CheckpointFormatError, IncompatibleCheckpoint, load_denoiser, save_denoiser
from edmlab.checkpoints.safe_pickle import ModuleRecord
from edmlab.cli.train import train
from edmlab.networks import build
from edmlab.precond import Denoiser


class Opaque:  # a class torch.load(weights_only=True) refuses
    pass


@pytest.mark.parametrize("kind, message", [
    ("pickle", "is a pickle: an official EDM network-snapshot-*.pkl is for sampling"),
    ("bytes", "neither a torch.save archive nor a pickle"),
    ("object", "not a readable training checkpoint (UnpicklingError"),
    ("export", "is an inference export (EMA weights only"),
    ("dict", "has no 'edmlab' entry"),
])
def test_ckpt_path_that_is_not_a_training_checkpoint_says_what_it_is(tmp_path, kind, message):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"ema": 1}))
    elif kind == "bytes":
        path.write_bytes(b"GIF89a not a checkpoint")
    elif kind == "object":
        torch.save({"x": Opaque()}, path)
    elif kind == "export":
        save_denoiser(Denoiser(build("mlp", img_resolution=1, img_channels=2, hidden_channels=8, num_blocks=1)), path)
    else:
        torch.save({"state_dict": {}}, path)
    with pytest.raises(IncompatibleCheckpoint) as err:
        train(compose_cfg(tmp_path, [*tiny("digits_edm"), f"ckpt_path={path}"]))
    text = str(err.value)
    assert message in text and "resume from a checkpoints/last.ckpt" in text
    assert "weights_only=False" not in text and "mmap" not in text and "\n" not in text


def test_cyclic_module_tree_is_refused_not_a_recursion_error():
    outer, inner = ModuleRecord(), ModuleRecord()
    outer.__setstate__({"_parameters": {}, "_buffers": {}, "_modules": {"enc": inner}})
    inner.__setstate__({"_parameters": {"w": torch.zeros(1)}, "_buffers": {}, "_modules": {"loop": outer}})
    with pytest.raises(CheckpointFormatError, match=r"module tree has a cycle: enc.loop contains a module"):
        dict(checkpoints.safe_pickle.named_tensors(outer))


def test_declared_network_is_checked_against_the_tensors_before_it_is_built(tmp_path, monkeypatch):
    net = build("ddpmpp", img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                attn_resolutions=[])
    path = save_denoiser(Denoiser(net), tmp_path / "small.pt")
    payload = torch.load(path, weights_only=True)
    payload["network"]["model_channels"] = 4096  # declares ~1e9 parameters; the file holds ~1e4
    torch.save(payload, path)
    devices = []

    def spy(*args, **kwargs):
        devices.append(torch.empty(0).device.type)
        return build(*args, **kwargs)

    monkeypatch.setattr(checkpoints.weights, "build", spy)
    with pytest.raises(CheckpointFormatError, match=r"'net.map_layer0.weight' has shape \(32, 8\) in the checkpoint "
                                                    r"but \(16384, 4096\) in the network"):
        load_denoiser(path)
    assert devices == ["meta"]  # only the memory-free probe was built
