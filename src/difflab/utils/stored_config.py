"""What a config read from a file may name: the ``_target_`` allow-list.

A checkpoint carries its run config (``checkpoint["difflab"]["config"]``, a latent model's ``autoencoder_config``)
and ``sample.py``/``eval.py``/``export.py``, the classifier/upscaler/teacher/autoencoder checkpoints rebuild their
model (and data) from it with ``hydra.utils.instantiate``. ``instantiate`` calls whatever ``_target_`` names, so a
file that opens with ``weights_only=True`` could still run ``pathlib.Path.write_text`` or ``torch.load`` of a second
file through its config (Hydra's own blocklist stops ``os.system`` only). A file is data, never code: every
``_target_`` in a section that is built from a file must be one difflab itself writes (:data:`STORED_TARGETS`: the
classes and factories our ``conf/`` names, a test keeps the two equal) or a torch optimizer / learning-rate scheduler
class; anything else is refused before anything is built, naming the key path (:func:`check_stored_config`, called
by every site that builds from a stored config). A stored config is resolved when it is written
(``OmegaConf.to_container(resolve=True)``), so an interpolation (``${...}``, which would call a resolver) in one is
refused too. ``trust_checkpoint=true`` lifts both checks, as it lifts the unpickling one.

Only what is built is checked: a run whose config adds a callback of the user's own still samples from its
checkpoint (``sample.py`` builds the model, never the callbacks); a net of the user's own needs the opt-in.

Names are compared as strings: nothing a file names is imported to check it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from difflab.utils.checkpoint_io import UnsafeCheckpointError, checkpoints_trusted

# Every _target_ in conf/ (tests/unit/test_stored_config.py checks both ways), and Lightning's own classes that older
# run configs named (checkpoints shipped in difflab/weights/ record lightning.pytorch.loggers.CSVLogger and
# lightning.pytorch.callbacks.ModelCheckpoint).
STORED_TARGETS = frozenset(
    {
        # modules
        "difflab.modules.DiffusionModule",
        "difflab.modules.EDMModule",
        "difflab.modules.LatentDiffusionModule",
        "difflab.modules.AutoencoderModule",
        "difflab.modules.ClassifierModule",
        "difflab.modules.NoisyClassifierModule",
        "difflab.modules.UpscalerModule",
        "difflab.modules.ConsistencyModule",
        "difflab.modules.LatentConsistencyModule",
        "difflab.modules.ProgressiveDistillationModule",
        "difflab.modules.optim.linear_warmup",
        # networks
        "difflab.networks.UNet",
        "difflab.networks.DiT",
        "difflab.networks.Autoencoder",
        "difflab.networks.PatchDiscriminator",
        "difflab.networks.ClassifierNet",
        "difflab.networks.ClassConditioner",
        "difflab.networks.TextTransformerConditioner",
        "difflab.networks.text_minilm.MiniLMConditioner",
        # processes and samplers
        "difflab.schedules.GaussianDiffusion",
        "difflab.schedules.RectifiedFlow",
        "difflab.schedules.SigmaProcess",
        "difflab.samplers.EDMSampler",
        "difflab.samplers.AnnealedLangevinSampler",
        "difflab.samplers.PredictorCorrectorSampler",
        "difflab.samplers.ODESampler",
        "difflab.samplers.FlowODESampler",
        "difflab.samplers.AncestralSampler",
        "difflab.samplers.DDIMSampler",
        "difflab.samplers.PNDMSampler",
        "difflab.samplers.ConsistencySampler",
        "difflab.samplers.LCMSampler",
        "difflab.samplers.EulerSampler",
        "difflab.samplers.HeunSampler",
        "difflab.samplers.EulerAncestralSampler",
        "difflab.samplers.EulerMaruyamaSampler",
        "difflab.samplers.DPMSolverMultistepSampler",
        "difflab.samplers.DPMSolverSDESampler",
        "difflab.samplers.UniPCSampler",
        "difflab.samplers.FlowEulerSampler",
        "difflab.samplers.FlowHeunSampler",
        # losses
        "difflab.losses.DiffusionLoss",
        "difflab.losses.AutoencoderLoss",
        "difflab.losses.UniformTimestepSampler",
        "difflab.losses.LossAwareTimestepSampler",
        "difflab.losses.FlowTimestepSampler",
        # data
        "difflab.data.FashionMNISTDataModule",
        "difflab.data.MNISTDataModule",
        "difflab.data.MNIST5kDataModule",
        "difflab.data.DigitsDataModule",
        "difflab.data.CIFAR10DataModule",
        "difflab.data.ImageFolderDataModule",
        "difflab.data.PairsDataModule",
        "difflab.data.StreamingDataModule",
        "difflab.data.LatentDataModule",
        # callbacks, loggers, trainer (the training part of a run config)
        "difflab.callbacks.EMA",
        "difflab.callbacks.ModelCheckpoint",
        "difflab.callbacks.NonFiniteGuard",
        "difflab.callbacks.SampleGridCallback",
        "difflab.callbacks.GenerativeMetricsCallback",
        "difflab.callbacks.ReconstructionMetricsCallback",
        "difflab.callbacks.NLLCallback",
        "difflab.callbacks.ProgressLines",
        "difflab.utils.loggers.CSVLogger",
        "difflab.utils.loggers.WandbLogger",
        "difflab.utils.loggers.TensorBoardLogger",
        "difflab.strategies.FSDPStrategy",
        "lightning.pytorch.Trainer",
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "lightning.pytorch.callbacks.ModelCheckpoint",
    }
)


def _torch_classes(module: Any, base: type) -> set[str]:
    prefix = module.__name__
    return {f"{prefix}.{name}" for name, obj in vars(module).items() if isinstance(obj, type) and issubclass(obj, base)}


def allowed_targets() -> frozenset[str]:
    """:data:`STORED_TARGETS` and torch's optimizer and learning-rate scheduler classes (``torch.optim.Adam``,
    ``torch.optim.lr_scheduler.CosineAnnealingLR``, ...)."""
    optim, schedulers = torch.optim, torch.optim.lr_scheduler
    return STORED_TARGETS | _torch_classes(optim, optim.Optimizer) | _torch_classes(schedulers, schedulers.LRScheduler)


def unsafe_entries(content: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(key path, what is wrong) for every ``_target_`` outside :func:`allowed_targets` and every interpolation in
    ``content`` (nested dicts, lists and tuples; tensors and other leaves are skipped)."""
    allowed = allowed_targets()
    stack = [(path, content)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            target = node.get("_target_")
            if "_target_" in node and (not isinstance(target, str) or target not in allowed):
                yield f"{where}._target_".lstrip("."), f"{target!r} is not a class difflab builds from a file"
            stack.extend((f"{where}.{key}", value) for key, value in node.items() if key != "_target_")
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{where}[{i}]", value) for i, value in enumerate(node))
        elif isinstance(node, str) and "${" in node:
            yield where.lstrip("."), f"{node!r} is an interpolation (a stored config is resolved when written)"


def check_stored_config(content: Any, where: str, path: str) -> None:
    """Before building from ``content``, the section ``path`` (``difflab.config.model``) of a file read from
    ``where`` (``ckpt='run/last.ckpt'``): raise :class:`UnsafeCheckpointError` naming the first offending key path
    when it names a ``_target_`` outside the allow-list or holds an interpolation (unless ``trust_checkpoint``)."""
    if checkpoints_trusted():
        return
    for key, problem in unsafe_entries(content, path):
        raise UnsafeCheckpointError(
            f"{where}: refused: {key} = {problem}. Building it would run code named by the file, and difflab's own "
            "checkpoints only name its classes and torch's optimizers/schedulers. If you made this file yourself "
            "or trust where it came from, add trust_checkpoint=true to the command line."
        )
