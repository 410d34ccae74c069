"""LongVILA-R1-1.5B variant: Qwen2-1.5B (tied head) + SigLIP so400m 448 px, bf16 compute.

    --config=configs/longvila_r1_1p5b.py:sft    CoT-SFT stage
    --config=configs/longvila_r1_1p5b.py:grpo   GRPO stage (the default)
"""

import ml_collections

from configs import common


def get_config(stage: str = "grpo") -> ml_collections.ConfigDict:
    model = common.model_config(common.qwen2_1p5b(), common.siglip_so400m_448(),
                                dtype="bfloat16", param_dtype="float32", remat=True,
                                vision_chunk=32,   # SigLIP 32 frames at a time per device
                                ring_prompt=True,  # prompts built where the ring holds them
                                logits_chunk=256,  # log-probs 256 response tokens at a time
                                query_chunk=32)    # the prefix scores of 32 response queries
    return common.real_model_config(model, stage)
