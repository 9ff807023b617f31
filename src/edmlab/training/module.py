"""The LightningModule: denoising score matching with EDM's training-loop conventions.

Loss: per-image lambda(sigma) ||D(y + n; sigma) - y||^2 summed over pixels and
averaged over the global batch (EDM eq. 8, `training/loss.py`). Learning rate
ramped linearly in images with lr = 0 on the first step (EDM
`training_loop.py`), optionally decayed as 1/sqrt(images) (EDM2 eq. 16). EMA of
the weights in images (`ema.py`). Steps whose gradients are not finite are
skipped and counted. The global RNG stream of training is kept apart from
everything between steps (data loading, callbacks) and saved per rank, so a
resumed run repeats an uninterrupted one step for step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

import edmlab.training.rng as rng
from edmlab import loss as losses
from edmlab.checkpoints.training import CHECKPOINT_KEY, EMA_PREFIX, META_FORMAT, META_VERSION
from edmlab.training.ema import EMA, PowerFunctionEMA
from edmlab.training.loggers import logs_this_step, wandb_run_id

__all__ = ["EDMModule", "LearningRate", "reference_loss", "TrainingDiverged"]

# The EMA copies are in eval mode on purpose (no dropout when sampling from them).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")



class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps had non-finite gradients: the run stopped without saving them."""


class LearningRate:
    """lr(step) / lr_ref = min(nimg / rampup, 1) / sqrt(max(nimg / decay, 1)) with nimg = step x batch."""

    def __init__(self, batch_size: int, rampup_kimg: float = 10000.0,
                 decay_kimg: float | None = None) -> None:
        self.batch_size, self.rampup_kimg, self.decay_kimg = int(batch_size), float(rampup_kimg), decay_kimg

    def __call__(self, step: int) -> float:
        kimg = step * self.batch_size / 1000  # images before this step: the first step gets lr = 0 (EDM)
        factor = min(kimg / self.rampup_kimg, 1.0) if self.rampup_kimg > 0 else 1.0
        if self.decay_kimg:
            factor /= math.sqrt(max(kimg / self.decay_kimg, 1.0))
        return factor


@torch.no_grad()
def reference_loss(denoiser: nn.Module, images: torch.Tensor, class_labels: torch.Tensor | None = None,
                   seed: int = 0, repeats: int = 4, chunk: int = 256) -> float:
    """EDM's loss (EDM eq. 8 with EDM's sigma law and lambda) per image, with fixed draws: one yardstick for
    runs whatever their own process, preconditioning or loss settings (e.g. for hyperparameter search)."""
    recipe = losses.get("edm", sigma_data=float(getattr(denoiser, "sigma_data", 0.5)))
    generator = torch.Generator(device=images.device).manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for lo in range(0, len(images), chunk):
            x = images[lo:lo + chunk]
            labels = None if class_labels is None else class_labels[lo:lo + chunk]
            sigma = recipe.sample_sigma(len(x), generator=generator, device=x.device)
            per_image = losses.denoising_loss(denoiser, x, recipe, class_labels=labels, generator=generator,
                                              sigma=sigma)
            total, count = total + float(per_image.double().sum()), count + len(x)
    return total / count


class EDMModule(L.LightningModule):
    """Trains `denoiser` with a loss recipe; owns the optimizer, LR schedule and EMA weights."""

    def __init__(self,
                 denoiser: nn.Module,                                 # edmlab.precond.Denoiser (+ network)
                 recipe: losses.Recipe,                               # sigma distribution + lambda(sigma)
                 optimizer: Callable[..., torch.optim.Optimizer],     # partial optimizer, called with params
                 *,
                 batch_size: int,                                     # GLOBAL images per optimizer step
                 data_shape: Sequence[int],                           # one item: [C, H, W] or [d]
                 lr_rampup_kimg: float = 10000.0,                     # linear LR warm-up, in kimg
                 lr_decay_kimg: float | None = None,                  # EDM2 1/sqrt decay after this
                 ema_halflife_kimg: float = 500.0,                    # EDM EMA half-life
                 ema_rampup_ratio: float | None = 0.05,               # EDM EMA ramp-up ratio
                 phema_sigma_rels: Sequence[float] = (),              # EDM2 power EMAs to track (post-hoc)
                 augment_pipe: Callable | None = None,                # images -> (images, augment_labels)
                 sigma_buckets: Sequence[float] = (0.05, 0.2, 0.8, 3.0),  # edges for loss-by-sigma logs
                 seed: int = 0,                                       # base of the per-rank training RNG
                 max_nonfinite_steps: int | None = 100,               # stop after this many skipped in a row
                 run_config: dict | None = None,                      # resolved config, stored in checkpoints
                 channels_last: bool = False,                         # NHWC weights and images (GPU convs)
                 torch_compile: bool | dict = False,                  # torch.compile the network (kwargs)
                 ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.recipe = recipe
        self.optimizer_factory = optimizer
        self.batch_size = int(batch_size)
        self.data_shape = [int(s) for s in data_shape]
        self.learning_rate = LearningRate(batch_size, lr_rampup_kimg, lr_decay_kimg)
        self.ema = EMA(denoiser, ema_halflife_kimg, ema_rampup_ratio)
        self.phema = PowerFunctionEMA(denoiser, phema_sigma_rels) if phema_sigma_rels else None
        self.augment_pipe = augment_pipe
        self.register_buffer("sigma_edges", torch.tensor(list(sigma_buckets), dtype=torch.float32),
                             persistent=False)
        self.seed = int(seed)
        self.run_config = run_config
        self.skipped_steps = 0            # optimizer steps skipped for non-finite gradients
        self.nonfinite_losses = 0         # micro-batches whose loss was not finite
        self.consecutive_skipped_steps = 0
        self.max_nonfinite_steps = max_nonfinite_steps
        self.wandb_run_id: str | None = None
        self._rng_stream: dict | None = None
        self._skip_step = False
        self.channels_last = bool(channels_last)
        self.torch_compile = torch_compile  # not `compile`: that is nn.Module.compile
        self._reset_buckets()

    # ------------------------------------------------------------------ conveniences
    @property
    def label_dim(self) -> int:
        return self.denoiser.label_dim

    def bucket_names(self) -> list[str]:
        edges = [f"{e:g}" for e in self.sigma_edges.tolist()]
        lo, hi = ["0", *edges], [*edges, "inf"]
        return [f"train/loss_sigma_{a}-{b}" for a, b in zip(lo, hi, strict=True)]

    def _reset_buckets(self) -> None:
        k = len(self.sigma_edges) + 1
        self._bucket_sum = torch.zeros(k, dtype=torch.float64)
        self._bucket_count = torch.zeros(k, dtype=torch.float64)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.optimizer_factory(params=self.denoiser.parameters())
        # what this run's config says: a resume restores the checkpoint's values, _apply_configured_optimizer
        # puts these back (a changed optim.lr or LR schedule on resume is applied, not dropped)
        self._configured_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self._configured_schedule = dict(vars(self.learning_rate))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.learning_rate)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def configure_model(self) -> None:
        """Layout and compilation switches; neither changes what is computed, nor the checkpoint keys."""
        if self.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)
        if self.torch_compile and getattr(self.denoiser.net, "_compiled_call_impl", None) is None:
            self.denoiser.net.compile(**({} if self.torch_compile is True else dict(self.torch_compile)))

    def _unpack(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
        if labels is not None and (labels.ndim < 2 or labels.shape[1] == 0 or self.label_dim == 0):
            labels = None  # unlabelled data, or an unconditional network trained on labelled data
        return images, labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = self._unpack(batch)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        # sigma is drawn first, as in EDM, so the draw order (sigma, augmentation, noise) is unchanged
        sigma = self.recipe.sample_sigma(images.shape[0], device=images.device)
        per_image = losses.denoising_loss(self.denoiser, images, self.recipe, class_labels=labels,
                                          augment_pipe=self.augment_pipe, sigma=sigma)
        loss = per_image.mean()
        self._rng_stream = rng.get_state()
        self._accumulate_buckets(sigma.detach(), per_image.detach())
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _accumulate_buckets(self, sigma: torch.Tensor, per_image: torch.Tensor) -> None:
        finite = torch.isfinite(per_image)
        idx = torch.bucketize(sigma.float(), self.sigma_edges.to(sigma.device))
        sums = torch.zeros(len(self._bucket_sum), dtype=torch.float64, device=sigma.device)
        counts = torch.zeros_like(sums)
        sums.index_add_(0, idx[finite], per_image[finite].double())
        counts.index_add_(0, idx[finite], torch.ones_like(sums[idx[finite]]))
        self._bucket_sum = self._bucket_sum.to(sigma.device) + sums
        self._bucket_count = self._bucket_count.to(sigma.device) + counts
        if not bool(finite.all()):
            self.nonfinite_losses += 1

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradient norm before clipping; a non-finite one skips the step (grads set to None)."""
        grads = [p.grad for p in self.denoiser.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        self._skip_step = not bool(torch.isfinite(norm))  # grads are already all-reduced: all ranks agree
        if self._skip_step:
            self.skipped_steps += 1
            for p in self.denoiser.parameters():
                p.grad = None  # Adam leaves parameters without gradients (and their moments) untouched
        elif logs_this_step(self.trainer):
            self.log("train/grad_norm", norm, on_step=True)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        nimg = self.trainer.global_step * self.batch_size  # before this step, as EDM's EMA ramp uses
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True)
        self._skip_step = False
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.consecutive_skipped_steps = self.consecutive_skipped_steps + 1 if self._skip_step else 0
        log_now = logs_this_step(self.trainer)
        if self._skip_step:
            warnings.warn(f"step {self.trainer.global_step}: non-finite gradients, step skipped "
                          f"({self.skipped_steps} so far)", RuntimeWarning, stacklevel=1)
            if self.max_nonfinite_steps and self.consecutive_skipped_steps >= self.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"training diverged: {self.consecutive_skipped_steps} consecutive steps had non-finite "
                    f"gradients (model.max_nonfinite_steps={self.max_nonfinite_steps}); the last checkpoint keeps "
                    "the weights from before. Lower optim.lr (or raise model.lr_rampup_kimg) and resume or restart")
        else:
            beta = self.ema.update(self.denoiser, nimg, self.batch_size)
            if log_now:
                self.log("ema/halflife_kimg", self.ema.halflife_nimg(nimg) / 1000, on_step=True)
                self.log("ema/beta", beta, on_step=True)
            if self.phema is not None:
                self.phema.update(self.denoiser, nimg + self.batch_size, self.batch_size)
        if log_now:
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
            self.log("train/nonfinite_losses", float(self.nonfinite_losses), on_step=True)
            self.log("progress/kimg", (nimg + self.batch_size) / 1000, on_step=True)
            self._log_buckets()

    def _log_buckets(self) -> None:
        counts = self._bucket_count.cpu()
        means = (self._bucket_sum.cpu() / counts.clamp(min=1)).tolist()
        for name, mean, count in zip(self.bucket_names(), means, counts.tolist(), strict=True):
            if count > 0:
                self.log(name, mean, on_step=True)
        self._reset_buckets()

    # ------------------------------------------------------------------ RNG stream
    def _apply_configured_optimizer(self) -> None:
        configured = getattr(self, "_configured_groups", None)
        configs = getattr(self.trainer, "lr_scheduler_configs", None)
        if not configured or not configs or not self.trainer.optimizers:
            return
        schedule_changed = vars(self.learning_rate) != self._configured_schedule  # LambdaLR restored the ckpt's
        vars(self.learning_rate).update(self._configured_schedule)
        opt, sched = self.trainer.optimizers[0], configs[0].scheduler
        for i, (group, conf) in enumerate(zip(opt.param_groups, configured, strict=True)):
            changed = {k: v for k, v in conf.items() if k not in ("lr", "initial_lr") and group.get(k) != v}
            group.update(changed)
            if sched.base_lrs[i] != conf["lr"] or changed or schedule_changed:
                sched.base_lrs[i] = group["initial_lr"] = conf["lr"]
                group["lr"] = conf["lr"] * self.learning_rate(sched.last_epoch)

    def on_train_start(self) -> None:
        self._apply_configured_optimizer()
        if self.trainer.is_global_zero:  # after the restore: the wandb run this one is (or continues) wins
            self.wandb_run_id = wandb_run_id(self.loggers) or self.wandb_run_id
        if self._rng_stream is None:  # fresh run: a stream per rank (EDM seeds each rank differently)
            rng.seed_all(rng.derive_seed(self.seed, self.global_rank))
            self._rng_stream = rng.get_state()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_stream is not None:
            rng.set_state(self._rng_stream)  # whatever ran since the last step does not touch training draws

    def train(self, mode: bool = True) -> EDMModule:
        super().train(mode)
        self.ema.train(False)
        if self.phema is not None:
            self.phema.train(False)
        return self

    # ------------------------------------------------------------------ checkpoints
    def edmlab_metadata(self) -> dict[str, Any]:
        """What rebuilds the EMA denoiser from a checkpoint: network build kwargs, preconditioning, config."""
        return {
            "format": META_FORMAT, "version": META_VERSION,
            "network": dict(self.denoiser.network_config or {}),
            "precond": {"name": self.denoiser.precond.name, **self.denoiser.precond_params},
            "config": self.run_config,
            "data_shape": list(self.data_shape),
            "ema_prefix": EMA_PREFIX,
            "phema_sigma_rels": list(self.phema.sigma_rels) if self.phema is not None else [],
            "batch_size": self.batch_size,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = self.edmlab_metadata()
        streams = [self._rng_stream]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            streams = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(streams, self._rng_stream)
        meta["rng"] = streams
        meta["counters"] = {"skipped_steps": self.skipped_steps, "nonfinite_losses": self.nonfinite_losses}
        meta["wandb_run_id"] = self.wandb_run_id
        if "state_dict" in checkpoint:  # verified on resume and when sampling from it
            from edmlab.checkpoints import content_hash

            meta["sha256"] = content_hash(checkpoint["state_dict"])
        checkpoint[CHECKPOINT_KEY] = meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # train.py checked the file against this module before fit (edmlab.training.resume.check_resume)
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise ValueError("this checkpoint has no 'edmlab' entry: it was not written by edmlab's "
                             "training; "
                             "resume only from a last.ckpt of `python train.py`")
        counters = meta.get("counters", {})
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.nonfinite_losses = int(counters.get("nonfinite_losses", 0))
        self.wandb_run_id = meta.get("wandb_run_id")
        streams = meta.get("rng") or []
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if len(streams) == world and streams[rank] is not None:
            self._rng_stream = streams[rank]
        else:  # a different device count: a fresh stream per rank, still a function of (seed, rank, step)
            warnings.warn(f"checkpoint holds RNG states for {len(streams)} rank(s), this run has {world}: "
                          "reseeding, so losses will not repeat the original run exactly", stacklevel=1)
            rng.seed_all(rng.derive_seed(self.seed, rank, checkpoint.get("global_step", 0)))
            self._rng_stream = rng.get_state()
