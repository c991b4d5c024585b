"""``DownloadableDataModule``: local search first, then an optional download, then a clear error."""

from __future__ import annotations

from pathlib import Path

from difflab.data.base import ImageDataModule, _check_bool
from difflab.data.errors import DatasetNotFoundError


class DownloadableDataModule(ImageDataModule):
    """Base for sets found on disk (``find``) or fetched when ``download=true`` (``_fetch``).

    ``locate()`` returns the data directory or raises ``DatasetNotFoundError`` whose message
    (``_not_found_message``) lists every location tried and what happened to the download.
    """

    def __init__(self, *args, download: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.download = _check_bool("download", download)
        self._download_note = "not attempted (data.download=false)" if not download else "not attempted yet"

    def find(self) -> Path | None:
        """The first directory holding the complete set, else None."""
        raise NotImplementedError

    def _fetch(self) -> Path:
        """Download into ``data_dir``; return the directory written."""
        raise NotImplementedError

    def _not_found_message(self) -> str:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Download when ``download=true`` and the set is not found locally (rank 0 only under Lightning)."""
        if self.download and self.find() is None:
            self._download()

    def _download(self) -> None:
        try:
            self._download_note = f"downloaded into {self._fetch()}"
        except Exception as err:  # any failure (network, disk, checksum) is reported in the not-found message
            reason = " ".join(str(err).split())
            self._download_note = f"attempted into {self.data_dir}, failed: {type(err).__name__}: {reason}"

    def locate(self) -> Path:
        """The data directory; downloads once if allowed; else raises ``DatasetNotFoundError``."""
        directory = self.find()
        if directory is None and self.download and self._download_note == "not attempted yet":
            self._download()
            directory = self.find()
        if directory is None:
            raise DatasetNotFoundError(self._not_found_message())
        return directory
