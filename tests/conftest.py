"""Test setup: 8 virtual CPU devices, set before jax is imported anywhere; shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def vila_parts():
    """Tiny random torch parts of a VILA model (untied Qwen2 with GQA, SigLIP 7x7 grid)."""
    from tests import torch_reference as ref
    llm = ref.tiny_qwen2(seed=0)
    vision = ref.tiny_siglip(seed=1)
    proj = ref.torch_projector("mlp_downsample_2x2_fix", 32, 64, seed=2)
    return llm, vision, proj


@pytest.fixture(scope="session")
def vila_dir(tmp_path_factory, vila_parts):
    """A VILA-layout checkpoint folder written from `vila_parts`."""
    from tests import torch_reference as ref
    folder = tmp_path_factory.mktemp("ckpt") / "vila"
    ref.save_vila(folder, *vila_parts, "mlp_downsample_2x2_fix")
    return folder
