"""edmlab's EDM2 network against NVlabs' own code: same weights in, compare D(x; sigma), u(sigma), gradients and
the forced weight normalisation of a training step. Needs a checkout of NVlabs/edm2 (its code runs here only).

    python benchmarks/edm2_parity.py --edm2 path/to/edm2   # a local clone of the public NVlabs/edm2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edm2", required=True, help="path of an NVlabs/edm2 checkout")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.edm2)
    from training.networks_edm2 import Precond  # NVlabs' code, imported only by this tool

    from edmlab.networks import build
    from edmlab.precond import Denoiser

    torch.manual_seed(0)
    kwargs = dict(model_channels=32, channel_mult=[1, 2, 3], num_blocks=2, attn_resolutions=[8, 4], dropout=0.0)
    ref = Precond(img_resolution=16, img_channels=4, label_dim=10, use_fp16=False, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g))  # gains too: every path is live
    ours = Denoiser(build("edm2", img_resolution=16, img_channels=4, label_dim=10, **kwargs), logvar_channels=128)
    ours.load_state_dict({("net." + k[5:] if k.startswith("unet.") else k): v for k, v in ref.state_dict().items()})
    x, sigma = torch.randn(5, 4, 16, 16), torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0])
    labels = torch.eye(10)[[0, 3, 5, 7, 9]]
    lines = ["# edmlab's EDM2 network vs NVlabs/edm2's code", "",
             "Same random weights (gains included) in NVlabs' `Precond` and edmlab's `Denoiser(build('edm2'), "
             "logvar_channels=128)`, float32 CPU, 16x16x4, 10 classes, 5 noise levels 0.01 ... 80.", ""]
    for mode in ("eval", "train"):
        ref.train(mode == "train")
        ours.train(mode == "train")
        D_ref, u_ref = ref(x, sigma, labels, return_logvar=True)
        D, u = ours(x, sigma, labels, return_logvar=True)
        D_ref, u_ref, D, u = (t.detach() if mode == "eval" else t for t in (D_ref, u_ref, D, u))
        lines.append(f"- {mode} mode: max |D - D_nvlabs| = {float((D - D_ref).abs().max()):.3g} (max |D| "
                     f"{float(D_ref.abs().max()):.3g}), max |u - u_nvlabs| = {float((u - u_ref).abs().max()):.3g}")
    (D_ref.square().mean() + u_ref.mean()).backward()
    (D.square().mean() + u.mean()).backward()
    pairs = list(zip(ref.parameters(), ours.parameters(), strict=True))
    grad = max(float((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp(min=1e-30)) for a, b in pairs)
    weight = max(float((a - b).abs().max()) for a, b in pairs)
    lines += [f"- backward: max relative gradient difference {grad:.3g}; weights after the in-place forced "
              f"normalisation differ by {weight:.3g}", "",
              "Reproduce: `python benchmarks/edm2_parity.py --edm2 <NVlabs/edm2 checkout>`."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edm2_parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
