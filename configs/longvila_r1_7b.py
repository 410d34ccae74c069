"""LongVILA-R1-7B: Qwen2-7B + SigLIP so400m 448 px + mlp_downsample_2x2_fix, bf16 compute.

    --config=configs/longvila_r1_7b.py:sft    CoT-SFT stage
    --config=configs/longvila_r1_7b.py:grpo   GRPO stage (the default)
"""

import ml_collections

from configs import common


def get_config(stage: str = "grpo") -> ml_collections.ConfigDict:
    model = common.model_config(common.qwen2_7b(), common.siglip_so400m_448(),
                                dtype="bfloat16", param_dtype="float32", remat=True,
                                vision_chunk=32,   # SigLIP 32 frames at a time per device
                                ring_prompt=True,  # prompts built where the ring holds them
                                logits_chunk=256,  # log-probs 256 response tokens at a time
                                query_chunk=32,    # the prefix scores of 32 response queries
                                mlp_chunk=8192,    # the MLP 8192 prompt tokens per device at a time
                                # each layer's checkpoint of the prompt in pinned host memory
                                # (4096 frames: 24.6 GiB per GPU; README, plan_memory.py)
                                remat_offload=True)
    return common.real_model_config(model, stage)
