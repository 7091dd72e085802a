"""The LightningModule: softmax cross-entropy over the whole catalogue, Adam, exact full-ranking evaluation.

It joins a plain network from ``tim4rec_pl.model`` (TiM4Rec, SASRec, ...) with Lightning. A network must offer
``forward(item_seq, item_seq_len, timestamps) -> (B, d)``, ``encode(...) -> (B, L, d)`` and a tied output
embedding ``item_embedding`` whose row 0 is the padding item. Training runs the plain network; validation, test
and predict run its inference encoder (``tim4rec_pl.inference``: the same results, faster on CPU).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from tim4rec_pl import __version__, inference
from tim4rec_pl.errors import UserError
from tim4rec_pl.metrics import FullRankMetrics, full_ranks
from tim4rec_pl.model.base import SequenceEncoder

log = logging.getLogger("tim4rec_pl")


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based): a linear warm-up over
    ``warmup_steps`` (step 0 gets 1 / warmup_steps), then 1 (constant) or a half cosine from 1 down to 0 at
    ``total_steps`` (cosine)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class SeqRecModule(L.LightningModule):
    def __init__(
        self,
        network: SequenceEncoder,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        topk: list[int] | None = None,
        eval_block_size: int = 65536,
        init_from: str | None = None,
        compile: bool = False,
    ) -> None:
        """Sequential recommender trained with full softmax cross-entropy.

        Args:
            network: The sequence encoder, e.g. ``tim4rec_pl.model.tim4rec.TiM4Rec`` or
                ``tim4rec_pl.model.sasrec.SASRec``. ``num_items`` and ``max_seq_len`` are filled in from the data.
            lr: Adam learning rate (the paper: 1e-3; 5e-4 for Steam).
            weight_decay: Adam weight decay (the paper: 0).
            warmup_steps: Optimiser steps over which the learning rate rises linearly from ~0 to ``lr`` (0: none).
                Large DDP batches train more stably with a few hundred.
            lr_schedule: After the warm-up: ``constant`` (stay at ``lr``) or ``cosine`` (decay to 0 at the last
                step of ``trainer.max_epochs`` / ``max_steps``).
            topk: Cut-offs K for HR/NDCG/MRR@K in validation and test (default 10, 20, 50).
            eval_block_size: Items scored at once in evaluation; bounds memory for very large catalogues.
            init_from: Optional weights to start from: a checkpoint of the reference RecBole implementation
                (``.pth``) or one of ours (``.ckpt``). Used to evaluate a reference-trained model on this pipeline.
            compile: Compile the network with ``torch.compile`` before training.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        self.lr = lr
        self.weight_decay = weight_decay
        self.eval_block_size = eval_block_size
        ks = list(topk) if topk is not None else [10, 20, 50]
        self.val_metrics = FullRankMetrics(ks)
        self.test_metrics = FullRankMetrics(ks)
        if init_from:
            from tim4rec_pl.interop import load_network_weights

            load_network_weights(self.network, init_from, "--model.init_from")
        self.encoder = inference.for_network(network)  # eval-mode forward without autograd (not a submodule)
        self._compiled = False
        self._compile = compile
        self.data_info: dict = {}  # data statistics and manifest checksum, recorded in checkpoints
        self.ssd_backend_resolved: str | None = None  # the SSD implementation that runs (see _report_ssd_backend)

    # ----------------------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "manifest"):
            manifest = dm.manifest
            self.data_info = {"checksum": manifest.get("checksum"), "stats": manifest.get("stats", {})}
        if stage == "fit" and getattr(dm, "train_mode", "prefix") == "all_positions":
            if not getattr(self.network, "supports_all_positions", True):  # e.g. TiM4Rec's reference time path
                raise UserError(
                    f"data.train_mode all_positions needs a causal network, but {type(self.network).__name__}'s "
                    "reference time path mixes all positions (see docs/model.md); set "
                    "model.network.init_args.time_path: causal, or data.train_mode: prefix"
                )
        if stage == "fit" and self._trainer is not None and self.trainer.world_size > 1:
            self._freeze_unreachable_parameters()
        if self._compile and not self._compiled and stage == "fit":
            self.network = torch.compile(self.network)
            self._compiled = True

    def on_fit_start(self) -> None:
        self._report_ssd_backend()

    def on_validation_start(self) -> None:
        self._report_ssd_backend()

    def on_test_start(self) -> None:
        self._report_ssd_backend()

    def on_predict_start(self) -> None:
        self._report_ssd_backend()

    def _report_ssd_backend(self) -> None:
        """Say once which SSD implementation runs (and why, with a warning when "auto" falls back to the PyTorch scan
        on CUDA), and record it with every logger: ``ssd_backend_resolved`` in the run's config, ``ssd_backend`` in the
        W&B summary. ``ssd_backend: triton`` where the kernel cannot run stops here, before any step."""
        if self.ssd_backend_resolved is not None:
            return
        requested = sorted({getattr(m, "ssd_backend", None) for m in self.network.modules()} - {None})
        if not requested:  # a network without an SSD (SASRec)
            return
        from lightning.pytorch.loggers import WandbLogger

        from tim4rec_pl.model.ssd import explain_backend

        resolved, reason, warning = explain_backend(requested[0], self.device)
        self.ssd_backend_resolved = resolved
        if not self.trainer.is_global_zero:
            return
        if warning:
            log.warning(f"tim4rec-pl: warning: {warning}")
        log.info(f"tim4rec-pl: SSD backend: {resolved} ({reason})")
        for logger in self.trainer.loggers:
            logger.log_hyperparams({"ssd_backend_resolved": resolved})
            if isinstance(logger, WandbLogger):
                logger.experiment.summary["ssd_backend"] = resolved

    def _batch_inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return batch["item_seq"], batch["item_seq_len"], batch["timestamps"]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        weight = self.network.item_embedding.weight  # (num_items, d), tied output layer
        if "targets" in batch:  # all-positions mode: the next item at every position of the window
            hidden = self.network.encode(*self._batch_inputs(batch))  # (B, L, d)
            targets = batch["targets"]  # (B, L), 0 = no target
            mask = targets > 0
            logits = hidden[mask] @ weight.T  # (T, num_items)
            loss = F.cross_entropy(logits, targets[mask])
            n = int(mask.sum())
        else:
            logits = self.network(*self._batch_inputs(batch)) @ weight.T  # (B, num_items), item 0 included
            loss = F.cross_entropy(logits, batch["target"])
            n = batch["target"].shape[0]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}); "
                "stopping instead of training on NaNs: lower model.lr, or check the data's timestamps"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        warmup, schedule = int(self.hparams.get("warmup_steps", 0)), self.hparams.get("lr_schedule", "constant")
        if warmup < 0:
            raise UserError(f"model.warmup_steps is {warmup}; use 0 (no warm-up) or a positive number of steps")
        if schedule not in ("constant", "cosine"):
            raise UserError(f"model.lr_schedule is {schedule!r}; use constant or cosine")
        if warmup == 0 and schedule == "constant":
            return optimizer
        total = self.trainer.estimated_stepping_batches if schedule == "cosine" else 0
        if schedule == "cosine" and not math.isfinite(total):
            raise UserError("model.lr_schedule cosine needs a known length; set trainer.max_epochs or max_steps")
        factor = partial(lr_factor, warmup_steps=warmup, schedule=schedule, total_steps=int(total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        if opt is not None and not isinstance(opt, list):
            self.log("train/lr", opt.param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=True)

    # --------------------------------------------------------------------------------------------- evaluation
    def _ranks(self, batch: dict[str, Tensor]) -> Tensor:
        user_repr = self.encoder(*self._batch_inputs(batch))  # (B, d)
        return full_ranks(user_repr, self.network.item_embedding.weight, batch["target"], self.eval_block_size)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_metrics.update(self._ranks(batch))

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, value in values.items():  # identical on every rank: the metric states are already reduced
            # sync_dist with max: an exact no-op on equal values, and Lightning stops warning about unsynced logs.
            self.log(f"val/{name}", value.float(), prog_bar=name == "ndcg@10", sync_dist=True, reduce_fx="max")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.test_metrics.update(self._ranks(batch))

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        self.log_dict(
            {f"test/{name}": value.float() for name, value in values.items()}, sync_dist=True, reduce_fx="max"
        )  # exact on equal values (see on_validation_epoch_end)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """(B, d) sequence representations; ``tim4rec_pl.predict.PredictionWriter`` turns them into top-K items."""
        return self.encoder(*self._batch_inputs(batch))

    # ------------------------------------------------------------------------------------------------ DDP
    def _freeze_unreachable_parameters(self) -> None:
        """Stop asking for gradients of parameters that can never reach the loss, so that plain DDP works.

        TiM4Rec's last layer computes a next time state that nothing reads (its parameters exist so that reference
        checkpoints load), and DDP refuses parameters without a gradient. Training on one device leaves them at their
        initial values too (Adam skips parameters without a gradient): freezing them changes no result. They are
        found by one tiny forward of both output paths (``forward`` and ``encode``) in eval mode, RNG untouched.
        """
        net, params = self.network, [p for p in self.network.parameters() if p.requires_grad]
        length, num_items = int(getattr(net, "max_seq_len", 8)), int(getattr(net, "num_items", 2))
        device = params[0].device if params else torch.device("cpu")
        gen = torch.Generator().manual_seed(0)
        item_seq = torch.randint(1, max(num_items, 2), (2, length), generator=gen)  # (2, L)
        item_seq_len = torch.tensor([length, 1])
        item_seq[1, 1:] = 0
        timestamps = (1e9 + 60.0 * torch.arange(length, dtype=torch.float32)).expand(2, -1).clone()  # (2, L)
        timestamps[1, 1:] = 0
        inputs = [t.to(device) for t in (item_seq, item_seq_len, timestamps)]
        was_training = net.training
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                net.eval()
                out = net(*inputs).sum()
                if hasattr(net, "encode"):
                    out = out + net.encode(*inputs).sum()
                grads = torch.autograd.grad(out, params, allow_unused=True)
        finally:
            net.train(was_training)
        names = {id(p): n for n, p in net.named_parameters()}
        unused = [p for p, g in zip(params, grads) if g is None]
        for p in unused:
            p.requires_grad_(False)
        if unused and self.trainer.global_rank == 0:
            log.info(
                f"DDP: {len(unused)} parameter tensors never reach the loss and are frozen "
                f"({', '.join(names[id(p)] for p in unused[:4])}{', ...' if len(unused) > 4 else ''})"
            )

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # merged: callbacks ran first and may have added to it (tracking.LogConfigCallback adds "config")
        checkpoint.setdefault("tim4rec_pl", {}).update({"version": __version__, "data": self.data_info})
        if self.ssd_backend_resolved is not None:
            checkpoint["tim4rec_pl"]["ssd_backend"] = self.ssd_backend_resolved
        if self._compiled:  # store plain parameter names, loadable without torch.compile
            checkpoint["state_dict"] = {
                k.replace("network._orig_mod.", "network."): v for k, v in checkpoint["state_dict"].items()
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._compiled:
            checkpoint["state_dict"] = {
                k.replace("network.", "network._orig_mod.", 1): v for k, v in checkpoint["state_dict"].items()
            }
        ours = checkpoint.get("state_dict", {})
        mine = self.state_dict()
        for key, value in ours.items():
            if key in mine and mine[key].shape != value.shape:
                saved = checkpoint.get("tim4rec_pl", {}).get("data", {}).get("checksum")
                raise UserError(
                    f"checkpoint does not fit this config: {key} has shape {tuple(value.shape)} in the checkpoint but "
                    f"{tuple(mine[key].shape)} here (data checksum in checkpoint: {saved}); use the config and data "
                    "the checkpoint was trained with"
                )
