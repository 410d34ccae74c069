"""The paper's two learning claims at CPU size, on the demo's synthetic `majority` task (8 virtual
CPU devices; lvr_jax/eval/ablation.py says what each study trains):

* frames: accuracy against frames per clip (CoT-SFT on every chain, at each of --frames);
* stages: CoT-SFT only, GRPO only, CoT-SFT then GRPO (scarce chains, the same total steps).

Every arm is a resumable training run under --workdir/<study>/seed<N>/<arm>; rerun the same
command after a kill to go on. Writes results.json, <study>.md and <study>.png under --workdir.

    python launch/ablate.py --workdir=runs/ablate [--study=frames,stages] [--seeds=0,1]
"""

from lvr_jax import cli

cli.cpu_devices()

import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", cli.config_file("demo.py"),
                                          "the demo's config (GRPO; CoT-SFT uses --sft_lr)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablate", "where everything goes")
_STUDY = flags.DEFINE_string("study", "frames,stages", "which studies (comma-separated)")
_SEEDS = flags.DEFINE_string("seeds", "0,1", "seeds: initial model, data order, sampling")
_FRAMES = flags.DEFINE_string("frames", "2,4,8,16", "frames study: frames per clip")
_FRAMES_SFT_STEPS = flags.DEFINE_integer("frames_sft_steps", 200,
                                         "frames study: CoT-SFT steps on every chain")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 200, "stages study: CoT-SFT steps (S)")
_GRPO_STEPS = flags.DEFINE_integer("grpo_steps", 200, "stages study: GRPO steps after it (G); "
                                   "the one-stage arms train S + G steps")
_SFT_LR = flags.DEFINE_float("sft_lr", 3e-3, "CoT-SFT learning rate (the demo's)")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 400, "synthetic training items")
_SFT_ITEMS = flags.DEFINE_integer("sft_items", 8, "stages study: CoT-SFT on the first N "
                                  "training items' chains; GRPO uses all")
_NUM_VAL = flags.DEFINE_integer("num_val", 128, "synthetic validation items")
_VIDEO_FRAMES = flags.DEFINE_integer("video_frames", 32, "frames per synthetic video")


def plan():
    """The flags, checked (usage errors before any work)."""
    from lvr_jax.eval import ablation
    from lvr_jax.eval.demo import DemoData

    try:
        p = ablation.Plan(
            studies=tuple(s.strip() for s in _STUDY.value.split(",") if s.strip()),
            seeds=ablation.parse_ints(_SEEDS.value, "--seeds"),
            frames=ablation.parse_ints(_FRAMES.value, "--frames"),
            frames_sft_steps=_FRAMES_SFT_STEPS.value,
            stage_frames=int(_CONFIG.value.data.pipeline.num_frames),
            sft_steps=_SFT_STEPS.value, grpo_steps=_GRPO_STEPS.value)
        p = ablation.check_plan(p, _VIDEO_FRAMES.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if _SFT_ITEMS.value < 1:
        raise app.UsageError(f"--sft_items must be >= 1, got {_SFT_ITEMS.value}")
    return p, DemoData(_NUM_TRAIN.value, _NUM_VAL.value, _VIDEO_FRAMES.value, ("majority",),
                       _SFT_ITEMS.value)


def main(_):
    the_plan, want = plan()
    if not flags.FLAGS["verbosity"].present:    # progress lines only; --verbosity=0 for library logs
        logging.set_verbosity(logging.WARNING)
    cli.init_distributed()
    from lvr_jax.eval import ablation, ablation_report, demo

    t0 = time.time()
    work = Path(_WORKDIR.value)
    data_dir = work / "data"
    try:
        demo.check_existing_inputs(data_dir, want)    # every process, before anything is written
    except demo.DemoInputError as e:
        raise app.UsageError(str(e)) from None
    cli.barrier("ablate_check")
    if cli.is_main_process():
        demo.write_inputs(data_dir, work / f"init_seed{the_plan.seeds[0]}", want,
                          _CONFIG.value.model, seed=the_plan.seeds[0])
        for seed in the_plan.seeds[1:]:
            demo.write_init(work / f"init_seed{seed}", _CONFIG.value.model, data_dir, seed=seed)
    cli.barrier("ablate_inputs")

    todo = ablation.arms(the_plan)
    results = []
    for i, arm in enumerate(todo, 1):
        if cli.is_main_process():
            print(f"\n=== [ablate] arm {i}/{len(todo)}: {arm.folder} "
                  f"({' then '.join(f'{s} {n} steps' for s, n in arm.stages)}, "
                  f"{arm.frames} frames; {time.time() - t0:.0f}s so far) ===", flush=True)
        results.append(ablation.run_arm(arm, _CONFIG.value, work, sft_lr=_SFT_LR.value))
        print(f"[ablate] {arm.folder}: accuracy {results[-1]['accuracy']:.3f}", flush=True)
    if cli.is_main_process():
        settings = dict(dataclasses.asdict(the_plan), num_train=want.num_train, num_val=want.num_val,
                        sft_items=want.sft_items, video_frames=want.frames, sft_lr=_SFT_LR.value)
        for path in ablation_report.write(results, work, settings):
            print(f"[ablate] wrote {path}", flush=True)
        for study in the_plan.studies:
            print(f"\n{study}:\n" + (work / f"{study}.md").read_text(), flush=True)
        print(f"[ablate] done in {time.time() - t0:.0f}s", flush=True)
    cli.finish()


if __name__ == "__main__":
    app.run(main)
