"""LightningCLI: :class:`BlobSaveConfigCallback` saves the run's config into a container."""

from __future__ import annotations

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from azstoragetorch._client import redact_url


class BlobSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback``, able to save the run's ``config.yaml`` into a container.

    The standard callback writes through jsonargparse's own file handling, which cannot write to a
    blob URL; this one writes through Lightning's, which an :class:`AzureBlobCheckpointIO` teaches
    about blob paths (local log directories work as before)::

        LightningCLI(MyModel, MyData, save_config_callback=BlobSaveConfigCallback)

    Its options are those of ``SaveConfigCallback`` (pass them as ``save_config_kwargs``), except
    ``multifile``, which this callback does not support.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if self.multifile:
            raise ValueError("BlobSaveConfigCallback saves one config file; multifile=True is not supported.")
        log_dir = trainer.log_dir  # broadcast by Lightning
        assert log_dir is not None
        config_path = f"{log_dir.rstrip('/')}/{self.config_filename}"
        filesystem = get_filesystem(log_dir)
        exists = filesystem.isfile(config_path) if trainer.is_global_zero and not self.overwrite else False
        if trainer.strategy.broadcast(exists):  # every rank raises, so none waits for the others
            raise RuntimeError(
                f"{redact_url(config_path)} exists already. Set LightningCLI(save_config_kwargs="
                '{"overwrite": True}) to replace it, or save_config_callback=None not to save the config.'
            )
        if trainer.is_global_zero:
            with filesystem.open(config_path, "w") as config_file:
                config_file.write(self.parser.dump(self.config, skip_none=False))
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
