"""edmlab.data.datamodule: per-device batches, one global order sharded over ranks, resumable position."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from edmlab.data import ArrayImageDataset, ImageDataModule, VectorDataModule, per_device_batch, split_batch


class _Indexed(torch.utils.data.Dataset):
    """Item i is the vector [i]: batches reveal the data order."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), torch.zeros(0)


def _fake_trainer(world_size=1, accumulate=1, rank=0, step=0):
    return SimpleNamespace(world_size=world_size, accumulate_grad_batches=accumulate, global_rank=rank,
                           global_step=step)


def _take(dm, n: int) -> list[list[int]]:
    it = iter(dm.train_dataloader())
    return [next(it)[0][:, 0].long().tolist() for _ in range(n)]


def test_per_device_batch_derivation():
    dm = VectorDataModule(_Indexed(10), batch_size=512)
    dm.trainer = _fake_trainer(world_size=4, accumulate=2)
    dm.setup("fit")
    assert dm.batch_size_per_device == 64 and len(_take(dm, 1)[0]) == 64
    dm = VectorDataModule(_Indexed(10), batch_size=500)
    dm.trainer = _fake_trainer(world_size=8)
    with pytest.raises(ValueError, match="batch_size 500 is not divisible by world_size 8"):
        dm.setup("fit")
    assert split_batch(512, 8, max_per_device=32) == (32, 2) and per_device_batch(512, 2, 4) == 64


def test_ranks_shard_one_global_order():
    n = 12
    single = VectorDataModule(_Indexed(n), batch_size=4, seed=5)
    ref = sum(_take(single, 6), [])  # 24 positions = two passes
    assert sorted(ref[:n]) == list(range(n)) and sorted(ref[n:]) == list(range(n)) and ref[:n] != ref[n:]
    shards = []
    for rank in range(2):
        dm = VectorDataModule(_Indexed(n), batch_size=4, seed=5)
        dm.trainer = _fake_trainer(world_size=2, rank=rank)
        shards.append(sum(_take(dm, 6), []))
    assert [shards[g % 2][g // 2] for g in range(24)] == ref  # rank r holds global positions p W + r


def test_workers_keep_the_order():
    base = VectorDataModule(_Indexed(50), batch_size=5, seed=1)
    workers = VectorDataModule(_Indexed(50), batch_size=5, seed=1, num_workers=2)
    assert _take(workers, 7) == _take(base, 7)


def test_state_dict_restores_position():
    dm = VectorDataModule(_Indexed(30), batch_size=8, seed=2)
    dm.trainer = _fake_trainer(accumulate=2)
    expected = _take(dm, 10)[6:]  # 3 optimizer steps x 2 micro-batches consumed
    dm.trainer.global_step = 3
    state = dm.state_dict()
    assert state["images"] == 24
    resumed = VectorDataModule(_Indexed(30), batch_size=8, seed=2)
    resumed.trainer = _fake_trainer(accumulate=2, step=3)
    resumed.load_state_dict(state)
    assert _take(resumed, 4) == expected


def test_image_batches_are_scaled_with_onehot_labels():
    images = np.arange(2 * 1 * 2 * 2, dtype=np.uint8).reshape(2, 1, 2, 2) * 17
    dm = ImageDataModule(ArrayImageDataset(images, np.array([0, 2])), batch_size=4, xflip=True)
    x, labels = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and dm.img_resolution == 2 and dm.img_channels == 1 and dm.label_dim == 3
    expected = {tuple((torch.from_numpy(im).float() / 127.5 - 1).flatten().tolist()) for im in images}
    expected |= {tuple((torch.from_numpy(im).flip(-1).float() / 127.5 - 1).flatten().tolist()) for im in images}
    assert {tuple(v.flatten().tolist()) for v in x} == expected  # one pass over the xflip-doubled data
    assert labels.shape == (4, 3) and labels.sum(1).tolist() == [1] * 4
    dm = ImageDataModule(ArrayImageDataset(images, np.array([0, 2])), batch_size=2, use_labels=False)
    assert next(iter(dm.train_dataloader()))[1] is None and dm.label_dim == 0


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0][:, 0].long().tolist())
        return ((batch[0] - self.w) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(max_steps: int, ckpt_path=None, save=None) -> list[list[int]]:
    model, dm = _Recorder(), VectorDataModule(_Indexed(37), batch_size=6, seed=4)
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model.seen


def test_lightning_resume_sees_the_same_batches(tmp_path):
    full = _fit(5)
    first = _fit(2, save=tmp_path / "a.ckpt")
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["VectorDataModule"]["images"] == 12
    second = _fit(5, ckpt_path=tmp_path / "a.ckpt")
    assert len(full) == 10 and first + second == full
