"""``LatentDataModule`` (``data=latents``): train latent diffusion from a cache that ``python src/encode.py`` wrote,
without running the encoder (see :mod:`difflab.data.latent_cache` for the format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from difflab.data.base import ImageDataModule, _check_int
from difflab.data.latent_cache import LatentDataset, moments_shape, read_manifest
from difflab.utils.stored_config import check_stored_config


class LatentDataModule(ImageDataModule):
    """Batches (moments (B, C', h, w) float32, y (B,) int64) of a latent cache: for a kl autoencoder C' = 2·embed_dim,
    the posterior mean and log-variance (``LatentDiffusionModule`` draws z ~ q(z|x) from them at every step); for vq,
    z_e. Training batches come in the (seed, epoch) order of :mod:`difflab.data.order` (resumable mid-epoch, a
    disjoint share per DDP rank), as the image modules' do; val/test in a fixed order.

    Args:
        cache_dir: the cache (``out_dir`` of ``src/encode.py``).
        data_dir: unused (the latents live in ``cache_dir``); kept for the common data interface.
        image_size, channels: of the encoded images (the model's ``image_shape`` reads them): checked against the
            cache.
        val_size: the first ``val_size`` cached validation latents (null: all); the split itself is the cache's.
        limit_train_size: the first N cached training latents (null: all), as the image modules' key.
        seed: the training order's seed. random_flip: use the mirrored images' moments where the epoch order flips
            (the cache must have been encoded with ``data.random_flip=true``).
        on_device: false or auto (the shards are memory-mapped on the host; true is refused).
        The loader keys (batch_size, num_workers, pin_memory, persistent_workers) as :class:`ImageDataModule`.
    """

    in_memory = False

    def __init__(
        self,
        cache_dir: str,
        data_dir: str = ".",
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        persistent_workers: bool = False,
        val_size: int | None = None,
        seed: int = 0,
        random_flip: bool = False,
        limit_train_size: int | None = None,
        on_device: bool | str = "auto",
    ) -> None:
        if on_device is True:
            raise ValueError(
                "data.on_device=true: data=latents reads its latents from memory-mapped shards on the host; use "
                "data.on_device=auto (or false)"
            )
        super().__init__(
            data_dir,
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            val_size=0,
            seed=seed,
            random_flip=random_flip,
            limit_train_size=limit_train_size,
            on_device=on_device,
        )
        if not isinstance(cache_dir, (str, Path)) or not str(cache_dir):
            raise ValueError(f"data.cache_dir={cache_dir!r}: expected the folder of a latent cache (src/encode.py)")
        self.cache_dir = Path(cache_dir).expanduser()
        self.val_size = None if val_size is None else _check_int("val_size", val_size, 0)
        self._manifest: dict[str, Any] | None = None
        if (self.cache_dir / "manifest.json").is_file():  # the class names of the grids (when it is there already)
            self.class_names = tuple(self.manifest["data"].get("class_names") or ())

    @property
    def manifest(self) -> dict[str, Any]:
        """The cache's manifest, read and checked once (an error naming ``data.cache_dir`` when it is missing or
        incomplete, or holds latents of other images than ``data.image_size`` / ``data.channels``)."""
        if self._manifest is None:
            manifest = read_manifest(self.cache_dir)
            encoded = tuple(int(s) for s in manifest["data"]["image_shape"])
            if encoded != self.image_shape:
                raise ValueError(
                    f"data.cache_dir={str(self.cache_dir)!r} holds latents of images of shape {encoded}, but "
                    f"data.channels={self.channels} and data.image_size={self.image_size} give {self.image_shape}: "
                    f"set data.channels={encoded[0]} data.image_size={encoded[1]}"
                )
            self._manifest = manifest
        return self._manifest

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        """The cache's class count (``${data_num_classes:}`` reads it; an error when there is no cache yet)."""
        return self.manifest["data"].get("num_classes")

    @property
    def moments_shape(self) -> tuple[int, ...]:
        return moments_shape(self.manifest)

    # --- splits ---------------------------------------------------------------------------------

    def _build_splits(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        manifest, splits = self.manifest, self.manifest["splits"]
        self.class_names = tuple(manifest["data"].get("class_names") or ())
        if self.random_flip and not manifest["moments"].get("flipped"):
            raise ValueError(
                f"data.random_flip=true: the cache {self.cache_dir} holds no mirrored images' latents (it was encoded "
                "with data.random_flip=false). Encode again with data.random_flip=true, or set data.random_flip=false"
            )
        if "train" not in splits:
            raise ValueError(
                f"data.cache_dir={str(self.cache_dir)!r} has no train split: encode it with splits=[train,...]"
            )
        limits = {"train": self.limit_train_size, "val": self.val_size, "test": None}
        datasets = {
            split: LatentDataset(
                self.cache_dir,
                splits[split],
                self.moments_shape,
                limit=limits[split],
                random_flip=self.random_flip and split == "train",
                source=lambda split=split: self.source_dataset(split),
            )
            for split in limits
            if split in splits
        }
        return datasets["train"], datasets.get("val"), datasets.get("test")

    def image_data(self, data_dir: str | None = None) -> tuple[ImageDataModule, dict[str, Any]]:
        """The image data module the cache was encoded from and its config, rebuilt from the manifest (its
        ``_target_`` checked against difflab's allow-list first: a config read from a file is never code);
        ``data_dir`` replaces the recorded folder. Its splits are what ``eval.py`` (FID's real images) and
        ``sample.py mode=reconstruct`` read for a model trained on latents (``stored_data_module``), and the
        metric callbacks in training (``dataset.source``); its own loaders are not for training (batch size 1)."""
        data_cfg = dict(self.manifest["data"]["source_config"])
        check_stored_config(data_cfg, f"data.cache_dir={str(self.cache_dir)!r}", "manifest.json data.source_config")
        if data_dir:
            data_cfg["data_dir"] = data_dir
        return instantiate(data_cfg, batch_size=1), data_cfg  # batch 1: no train-loader size check on small sets

    def source_dataset(self, split: str) -> Dataset:
        """The images of ``split`` as encoded (FID's real statistics in training read them: ``dataset.source``)."""
        datamodule, _ = self.image_data()
        datamodule.setup("fit")
        images = getattr(datamodule, split)
        expected = self.manifest["splits"][split]["count"]
        if images is None or len(images) != expected:
            raise ValueError(
                f"data.cache_dir={str(self.cache_dir)!r}: rebuilding the {split} images from the manifest's data "
                f"config gave {0 if images is None else len(images)} images, the cache has {expected}"
            )
        return images

    def setup(self, stage: str | None = None) -> None:
        """The splits, and under a Trainer the model's check that it can train on these latents (its autoencoder's
        weights hash and latent shape are the cache's: ``check_latent_cache``)."""
        super().setup(stage)
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is None:
            return
        check = getattr(model, "check_latent_cache", None)
        if check is None:
            raise ValueError(
                f"data=latents gives latents of a stage-1 autoencoder, but the model is a {type(model).__name__}: "
                "train them with latent diffusion (model=ldm or experiment=ldm)"
            )
        check(self.cache_dir, self.manifest)

    # --- loaders --------------------------------------------------------------------------------

    def _missing(self, split: str) -> DataLoader:
        hint = "trainer.limit_val_batches=0" if split == "val" else "test=false"
        raise ValueError(
            f"data.cache_dir={str(self.cache_dir)!r} has no {split} split: encode it (splits=[train,val,test]) or "
            f"set {hint}"
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val) if self.val is not None else self._missing("val")

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test) if self.test is not None else self._missing("test")
