"""Model sizes shared by the config files (plain dicts, the fields of the model dataclasses)."""

import ml_collections


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
                 dtype="float32", param_dtype="float32", remat=False):
    """The `model` section of a config: sizes plus numerics."""
    return ml_collections.ConfigDict(dict(
        llm=llm, vision=vision, projector_type=projector_type, dtype=dtype,
        param_dtype=param_dtype, remat=remat, video_token_id=-1, newline_token_id=198))
