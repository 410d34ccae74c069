"""Fill the vision-feature cache of a split ahead of GRPO (lvr_jax.data.feature_store): SigLIP
features of every record with the checkpoint's vision tower, frame-parallel on the config's mesh;
with several processes (launch/run_local.py, SLURM) each writes its own rows. Entries already
valid are kept; stale or corrupt ones are recomputed. Prints progress and a JSON summary.

    python launch/cache_features.py --config=configs/demo.py --checkpoint=<VILA folder> \
        --config.data.pipeline.feature_cache=runs/demo/features [--split=train] [--limit=N]

The trainer reads the entries when it runs with the same data.pipeline settings (num_frames, fps,
feature_cache), the same vision weights and `train.freeze_vision` (the default).
"""

from lvr_jax import cli

cli.cpu_devices()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", cli.config_file("demo.py"), "training config")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "VILA-layout folder whose vision tower "
                                  "computes the features (default: --config.init_checkpoint)")
_SPLIT = flags.DEFINE_string("split", "train", "data split (data.<split>_files)")
_LIMIT = flags.DEFINE_integer("limit", 0, "only the first N records (0: all)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    checkpoint = _CHECKPOINT.value or config.init_checkpoint
    if not checkpoint:
        raise app.UsageError("give --checkpoint (or --config.init_checkpoint)")
    if not config.data.pipeline.get("feature_cache"):
        raise app.UsageError("give --config.data.pipeline.feature_cache=<folder>")
    if _LIMIT.value < 0:
        raise app.UsageError("--limit must be >= 0")
    cli.init_distributed()
    from lvr_jax.train.features import fill_cache

    main_process = cli.is_main_process()
    fill_cache(config, checkpoint, split=_SPLIT.value, limit=_LIMIT.value,
               say=lambda msg: main_process and print(msg, flush=True))
    cli.finish()


if __name__ == "__main__":
    app.run(main)
