"""A tiny VLM for CPU tests: float32, 7 x 7 patch grid, GQA."""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = common.model_config(common.tiny_llm(), common.tiny_vision())
    config.mesh = dict(data=-1, fsdp=1, seq=1, tensor=1)
    return config
