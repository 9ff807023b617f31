"""Silent corruption: a bit flipped inside a checkpoint's tensors is caught on load (skippable)."""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch
from test_train import compose_cfg, tiny

from edmlab.checkpoints import (
    CheckpointFormatError,
    IncompatibleCheckpoint,
    load_any,
    load_denoiser,
    save_denoiser,
)
from edmlab.cli.train import train
from edmlab.networks import build
from edmlab.precond import Denoiser


def flip_one_bit(path, name: str = "data/") -> None:
    """Flip the lowest bit of the middle byte of the largest tensor stored in a torch.save archive, in place."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if f"/{name}" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


def test_bit_flip_in_an_export_is_refused_unless_skipped(tmp_path):
    net = build("mlp", img_resolution=1, img_channels=2, hidden_channels=32, num_blocks=2)
    path = save_denoiser(Denoiser(net), tmp_path / "last_ema.pt")
    load_denoiser(path)
    flip_one_bit(path)
    with pytest.raises(CheckpointFormatError, match="do not match the content hash stored at save time"):
        load_denoiser(path)
    with pytest.raises(CheckpointFormatError, match="content hash"):
        load_any(path)
    flipped = load_denoiser(path, verify=False)  # skippable: loads the damaged weights as they are
    differs = [not torch.equal(a, b) for a, b in zip(flipped.state_dict().values(), Denoiser(net).state_dict().values(),
                                                      strict=True)]
    assert sum(differs) == 1


def test_bit_flip_in_last_ckpt_is_refused_on_resume_and_sampling(tmp_path):
    train(compose_cfg(tmp_path, [*tiny("toy2d"), "trainer.max_steps=2", "callbacks.sample_grid=null"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert len(torch.load(ckpt, weights_only=True)["edmlab"]["sha256"]) == 64
    load_any(ckpt)
    flip_one_bit(ckpt)
    with pytest.raises(CheckpointFormatError, match="content hash"):
        load_any(ckpt)
    with pytest.raises(IncompatibleCheckpoint, match="cannot resume: .*content hash.*verify_checkpoint=false"):
        train(compose_cfg(tmp_path / "again", [*tiny("toy2d"), "trainer.max_steps=3", f"ckpt_path={ckpt}"]))
