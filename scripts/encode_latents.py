"""Encode an image folder or zip into a latent dataset for latent diffusion (EDM2's ImageNet-512 recipe).

    python scripts/encode_latents.py imagenet-512x512.zip data/imagenet-512-sd --device cuda
    python train.py experiment=img512_edm2 data.dataset.path=data/imagenet-512-sd

Writes <dst>/latents.npy (float32 [N, 8, h, w]: the VAE posterior's mean and std per image),
<dst>/labels.npy when the images have labels, and <dst>/dataset.json with the encoder config. The
encoder is Stable Diffusion's VAE (diffusers' AutoencoderKL; --vae may be a hub name or a local folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from edmlab.data.latents import write_latent_dataset
from edmlab.data.sources import open_images
from edmlab.encoders import StabilityVAEEncoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="image folder, .zip (EDM dataset_tool format) or .npz")
    parser.add_argument("dst", type=Path, help="latent dataset folder to write")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-mse", help="AutoencoderKL: hub name or folder")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    images = open_images(args.src)
    if images.num_channels != 3:
        parser.error(f"{args.src}: the VAE encodes RGB images; these have {images.num_channels} channel(s)")
    encoder = StabilityVAEEncoder(vae_name=args.vae, batch_size=args.batch_size)
    device = torch.device(args.device)
    n = len(images)
    probe = encoder.encode_pixels(torch.zeros(1, *images.image_shape, device=device))
    shape = (n, *probe.shape[1:])

    def chunks():
        for lo in range(0, n, args.batch_size):
            hi = min(lo + args.batch_size, n)
            batch = torch.stack([torch.from_numpy(np.array(images.load_image(i))) for i in range(lo, hi)])
            yield encoder.encode_pixels(batch.to(device, torch.float32) / 127.5 - 1).cpu().numpy()
            print(f"\r{hi}/{n} images", end="", file=sys.stderr, flush=True)

    meta = {"encoder": {"_target_": "edmlab.encoders.StabilityVAEEncoder", "vae_name": args.vae},
            "source": str(args.src), "num_images": n, "image_shape": list(images.image_shape)}
    write_latent_dataset(args.dst, chunks(), shape, images.raw_labels, meta)
    print(f"\n{args.src} -> {args.dst}: {n} latents of shape {list(shape[1:])} (mean and std)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
