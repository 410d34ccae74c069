"""LongVILA-R1-7B: Qwen2-7B + SigLIP so400m 448 px + mlp_downsample_2x2_fix, bf16 compute."""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = common.model_config(common.qwen2_7b(), common.siglip_so400m_448(),
                                       dtype="bfloat16", param_dtype="float32", remat=True)
    config.mesh = dict(data=1, fsdp=-1, seq=1, tensor=1)
    return config
