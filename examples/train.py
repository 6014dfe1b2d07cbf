"""`python examples/train.py fit -c examples/<recipe>.yaml`: LightningCLI over cellfeed's DataModules."""
import cellfeed.client  # noqa: F401  (first: it tunes malloc for the stream threads, see README)
from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})
