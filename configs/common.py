"""Pieces shared by the config files: model sizes (plain dicts, the fields of the model
dataclasses) and `base_config()`, every section a launch script reads, with defaults."""

import ml_collections

from sharding.mesh import DEFAULT_RULES, rules_to_strings


def qwen2_7b() -> dict:
    """Qwen2(.5)-7B decoder of LongVILA-R1-7B / NVILA-8B."""
    return dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                num_heads=28, num_kv_heads=4, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, max_position_embeddings=131072)


def qwen2_1p5b() -> dict:
    """Qwen2(.5)-1.5B decoder (tied embeddings)."""
    return dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                num_heads=12, num_kv_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=True, max_position_embeddings=131072)


def siglip_so400m_448() -> dict:
    """SigLIP so400m vision tower at 448 px, patch 14 (32 x 32 patches)."""
    return dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                image_size=448, patch_size=14, layer_norm_eps=1e-6, feature_layer=-2)


def tiny_llm() -> dict:
    """A few-hundred-kB Qwen2 for CPU tests and the demo (GQA: 4 heads, 2 KV heads)."""
    return dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, rope_theta=10_000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, max_position_embeddings=65536)


def tiny_vision() -> dict:
    """A tiny SigLIP: 28 px, patch 4 -> 7 x 7 patches (odd grid: the 2x2 merge pads)."""
    return dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                image_size=28, patch_size=4, layer_norm_eps=1e-6, feature_layer=-2)


def model_config(llm: dict, vision: dict, projector_type="mlp_downsample_2x2_fix",
                 dtype="float32", param_dtype="float32", remat=False, vision_chunk=0,
                 logits_chunk=0, mlp_chunk=0, remat_offload=False, query_chunk=256,
                 ring_prompt=False, prefill_chunks=1):
    """The `model` section of a config: sizes plus numerics. `attention` holds the decoder's
    compiled-program knobs (lvr_jax.models.attention.AttentionOptions; memory, not results):
    ring key tile, branch query chunk, the ring's position tie ("auto": on except on CPU), the
    attention implementation of the vision tower, the ring's sub-blocks, the branches' prefix and
    one-device prompts ("auto": cuDNN flash attention on GPUs for bf16 / fp16).
    `vision_chunk`: frames per SigLIP micro-batch on each device (0: all its frames at once), so
    encode memory stops growing with frames per device; the features are the same.
    `logits_chunk`: response tokens per chunk of the training log-probs (0: all at once), so the
    [rows, T, vocab] logits and their gradient never exist at once; the log-probs are the same.
    `mlp_chunk`: tokens per device per MLP piece (0: all at once), so a long prompt's
    [tokens, intermediate] MLP activations never exist at once (the update recomputes each piece
    once more in its backward: one extra MLP forward per layer).
    `remat_offload` (with remat): each layer's checkpoint kept in pinned host memory instead of the
    device's (GPU; XLA:CPU compiles it but counts it as device memory, and launch/plan_memory.py
    reports the difference as `adjusted`).
    `ring_prompt`: video prompts built in the ring's layout where they are used
    (lvr_jax.models.ring_prompt), so no device holds the whole spliced prompt or its float32
    gradient; it pads each text slot to the ids' length (L - 1 tokens more than the spliced prompt,
    plus < 2n frames), cheap when frames dominate (the 7B at 4,096 frames: +0.3%), not for toy
    prompts of more text than video (the demo's: 816 tokens instead of 456), so off there.
    `prefill_chunks`: the forward-only prefills (rollout, reference and old log-probs) run the
    prompt in this many sequential chunks, each through the whole stack against the K/V of the
    ones before, so no activation is longer than a chunk's share (1: the whole prompt at once);
    the prefix is the same, the attention computes ~1 / chunks more (masked) sub-blocks.
    `query_chunk`: response queries per chunk of the training forward's attention to the prefix;
    a chunk's scores are [B, G, chunk, heads, prefix tokens per device] float32 (7.5 GiB for
    the 7B at 256 queries, G = 8 and 1024 frames on seq = 8), so long prompts want small chunks."""
    return ml_collections.ConfigDict(dict(
        llm=llm, vision=vision, projector_type=projector_type, dtype=dtype,
        param_dtype=param_dtype, remat=remat, video_token_id=-1, newline_token_id=198,
        vision_chunk=vision_chunk, logits_chunk=logits_chunk, mlp_chunk=mlp_chunk,
        remat_offload=remat_offload, ring_prompt=ring_prompt, prefill_chunks=prefill_chunks,
        attention=dict(key_tile=512, query_chunk=query_chunk, tie_positions="auto",
                       implementation="auto")))


STAGES = ("sft", "grpo")


def check_stage(stage: str) -> str:
    """The config-file argument (`--config=configs/x.py:grpo`): "sft" or "grpo"."""
    stage = stage or "grpo"
    if stage not in STAGES:
        raise ValueError(f"config stage must be one of {STAGES} (as in --config=configs/x.py:sft), "
                         f"got {stage!r}")
    return stage


def base_config(model: ml_collections.ConfigDict, mesh: dict,
                stage: str = "grpo") -> ml_collections.ConfigDict:
    """A full config: model, mesh, data, optim, train, rl, eval, profile (defaults of both stages;
    the config files override what differs)."""
    stage = check_stage(stage)
    c = ml_collections.ConfigDict()
    c.model = model
    c.init_checkpoint = ""           # VILA-layout folder (HF export) the run starts from
    c.mesh = dict(mesh)
    # logical axis -> mesh axes ("" replicated, "fsdp+seq" several) for params, activations and
    # caches; sharding.mesh.DEFAULT_RULES says what each name is ("length": "" turns the
    # sequence-parallel ring off)
    c.sharding_rules = rules_to_strings(DEFAULT_RULES)

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""                  # dataset root: JSONL files and the videos they name
    c.data.train_files = ""          # default: <dir>/train.jsonl
    c.data.val_files = ""            # default: <dir>/val.jsonl
    # batch_size is the global batch (prompts per step over all processes)
    # prompt_template: the user turn, "longrl" (Long-RL's QUESTION_TEMPLATE_VIDEO), "instruct" or
    # a custom string holding "{question}" once (lvr_jax.data.prompts.resolve_template)
    c.data.pipeline = dict(root="", num_frames=16, fps=0.0, batch_size=8, seed=0, shuffle=True,
                           on_error="skip", num_workers=0, max_length=512, system_prompt=None,
                           prompt_template="longrl", short_video="all")

    # GRPO: prompts per rollout (0: batch_size); the rollout's P x G samples are split into
    # rl.ppo_minibatches optimizer steps (P a multiple of it)
    c.data.pipeline.rollout_batch_size = 0
    # GRPO with a frozen vision tower: SigLIP features cached per clip in this folder ("" = off;
    # lvr_jax.data.feature_store; fill ahead with launch/cache_features.py, or as steps run)
    c.data.pipeline.feature_cache = ""

    # schedule: "cosine" (linear warmup, cosine decay to final_lr_fraction) or "constant" (linear
    # warmup, then constant; Long-RL's: warmup 0)
    # mu_dtype: storage of Adam's first moment ("": the params'; "bfloat16" halves it; the second
    # moment stays in the params' dtype: its small values would underflow bf16's mantissa)
    c.optim = ml_collections.ConfigDict(dict(lr=1e-5, schedule="cosine", warmup_steps=10,
                                             final_lr_fraction=0.1, b1=0.9, b2=0.98,
                                             weight_decay=0.0, grad_clip=1.0, grad_accum_steps=1,
                                             mu_dtype=""))
    # frozen towers get no gradients; Long-RL freezes the vision tower and the projector in RL
    c.train = ml_collections.ConfigDict(dict(steps=1000, seed=0, log_every=10,
                                             checkpoint_every=100, keep_checkpoints=2,
                                             max_nonfinite=5, freeze_vision=True,
                                             freeze_projector=stage == "grpo"))
    # reward_style: "longrl" (Long-RL's r1v rule: format regex full match, first <answer> span
    # graded by mathruler) or "lenient" (lvr_jax.rl.rewards). ppo_minibatches: optimizer steps per
    # rollout (old log-probs recomputed by the policy when > 1); dual_clip: c of dual-clip PPO for
    # negative advantages (Long-RL's clip_ratio_dual 3.0; 0 = off)
    c.rl = ml_collections.ConfigDict(dict(
        group_size=8, max_new_tokens=512, temperature=1.0, top_p=1.0, top_k=0, clip_low=0.2,
        clip_high=0.28, dual_clip=3.0, beta=0.01, loss_agg="token-mean", filter_groups=False,
        recompute_old_logprobs=False, ppo_minibatches=1, reward_style="longrl",
        accuracy_weight=0.9, format_weight=0.1))
    # reward_fn: "" = the built-in rl.reward_style rule, else "package.module:function"
    # (lvr_jax.rl.reward_fns: fn(replies, records); ":free_text" = ROUGE-L for free-text answers,
    # "lvr_jax.train.judge:judge" = the judge model rl.judge_checkpoint grades them)
    c.rl.reward_fn = ""
    # the frozen reference model's stored params: "" = model.param_dtype, "bfloat16" halves them
    # (as verl's bf16 reference; its log-probs within tests/test_reference_dtype.py's tolerance)
    c.rl.reference_dtype = ""
    c.rl.judge_checkpoint = ""        # VILA-layout folder of the judge (text only, greedy)
    c.rl.judge_max_new_tokens = 16    # tokens of the judge's verdict ("yes" / "no")
    # DAPO dynamic sampling (Long-RL: algorithm.online_filtering, off there too; lvr_jax.train.grpo)
    c.rl.dynamic_sampling = False     # keep groups by the rule below, roll out more until P kept
    c.rl.dynamic_keep_key = "reward"  # group mean of "reward" (Long-RL's filter_key: overall) or "accuracy"
    c.rl.dynamic_low = 0.01           # keep when dynamic_low < group mean < dynamic_high
    c.rl.dynamic_high = 0.99
    c.rl.dynamic_max_draws = 20       # rollouts per step at most, 1st included (max_try_make_batch)
    # every: validate during training every N steps and at the last one (0 = off); num_examples:
    # 0 = the whole split, N = a fixed subset (the same N items each time; lvr_jax.train.validation)
    # temperature 0: greedy replies; else one sample per prompt at temperature / top_p, batch i
    # with seed + i (Long-RL validates at 0.5: its val_override_config)
    c.eval = ml_collections.ConfigDict(dict(max_new_tokens=512, batch_size=8, split="val", every=0,
                                            num_examples=0, temperature=0.0, top_p=1.0, seed=0))
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=0))
    return c


def real_model_config(model: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """A LongVILA-R1 training config (SFT or GRPO stage) for one node of 8 GPUs.

    Values follow the reference recipe (Long-RL's longvila_7b_video_grpo.sh): GRPO on 256 frames x
    257 tokens per frame, lr 1e-6, sequence parallel over 8 devices (Long-RL: Ulysses 4); CoT-SFT
    at lr 1e-5. Not Long-RL's: G = 8 samples (its rollout.n is 5; 8 gives each seq device one
    branch), the batch sizes and max_length below (README, "The reference recipe"). One prompt
    per step (its G samples share one prefill), gradients accumulated over several steps:
    launch/plan_memory.py puts one 7B GRPO step at 63.4 GiB per device at 512 frames and 75.7 GiB
    at 1024 (README). Set data.dir and init_checkpoint on the command line."""
    stage = check_stage(stage)
    c = base_config(model, dict(data=1, fsdp=-1, seq=8, tensor=1), stage)
    # ZeRO-3 over every device: params, grads and optimizer state sharded over fsdp AND the seq
    # devices (with fsdp=1 x seq=8, "embed": "fsdp" alone would replicate the fp32 params + Adam
    # state of the 7B, ~117 GiB per device with the reference; launch/plan_memory.py)
    c.sharding_rules.embed = "fsdp+seq"
    c.data.pipeline.num_frames = 256
    c.data.pipeline.max_length = 1024
    c.data.pipeline.num_workers = 8
    c.data.pipeline.batch_size = 1
    c.eval.max_new_tokens = 1024
    c.eval.batch_size = 1
    if stage == "sft":
        c.optim.lr, c.optim.warmup_steps, c.optim.grad_accum_steps = 1e-5, 100, 8
        c.train.steps = 16000
        c.data.pipeline.max_length = 4096
    else:
        # Long-RL (NVlabs/Long-RL examples/config.yaml, verl/workers/actor/config.py): AdamW lr
        # 1e-6, betas (0.9, 0.999), weight decay 1e-2, constant LR without warmup, clip ratios
        # 0.2 / 0.3 with dual clip 3.0, rollout top_p 0.99, responses up to 2048 tokens
        # (max_response_length), k3 KL coefficient 1e-2; vision tower and projector frozen
        c.optim.update(lr=1e-6, b2=0.999, weight_decay=1e-2, schedule="constant", warmup_steps=0,
                       grad_accum_steps=4)
        c.train.steps = 2000
        c.rl.update(group_size=8, max_new_tokens=2048, top_p=0.99, clip_high=0.3, beta=0.01)
        # Long-RL keeps its reference model in bf16 (verl/workers/fsdp_workers.py: torch_dtype
        # float32 unless role == "ref")
        c.rl.reference_dtype = "bfloat16"
        c.eval.max_new_tokens = 2048
        # Long-RL validates with one sample at temperature 0.5 (val_override_config), top_p as
        # its rollout's
        c.eval.update(temperature=0.5, top_p=0.99)
    return c
