"""Training CLI: flags and config only; the work happens in `tokfusion_jax.trainer`.

    python -m tokfusion_jax.train --config=configs/ivif.py --workdir=runs/ivif \
        --config.tokenizer.path=checkpoints/titok_l32 --config.data.root=data/msrs/train

Rerunning the same command resumes from the newest checkpoint in ``--workdir``. SIGTERM / Ctrl-C
save a checkpoint and exit cleanly. ``--config.init_from=runs/other`` starts a new run from
another run's weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from tokfusion_jax.configlib import parse_flags
from tokfusion_jax.errors import ConfigError, cli_main

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config file, e.g. configs/ivif.py or configs/ivif.py:demo.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, export).")


@cli_main
def main(argv: Sequence[str]) -> None:
    """Entry point after flag parsing."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected positional arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise ConfigError("--config is required, e.g. --config=configs/ivif.py")
    if not _WORKDIR.value:
        raise ConfigError("--workdir is required, e.g. --workdir=runs/ivif")

    if not FLAGS["verbosity"].present:  # keep library INFO logs (orbax) out of the console
        logging.set_verbosity(logging.WARNING)
    from tokfusion_jax import trainer  # heavy imports after the flags are known to be valid

    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if result.interrupted:
        return
    if _CONFIG.value.train.demo_report:
        from tokfusion_jax import demo

        demo.report(result.workdir, _CONFIG.value)


def run() -> None:
    """Console entry point."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
