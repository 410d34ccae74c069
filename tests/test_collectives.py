"""What crosses devices in the 7B GRPO update: weights (gathered one layer at a time), not the
response rows' activations; and the HLO reader that lists the collectives."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import longvila_r1_7b
from lvr_jax.models.vlm import vlm_config_from
from lvr_jax.train.collectives import Collective, collectives, summary

ROOT = Path(__file__).resolve().parents[1]

HLO = """
  %all-reduce.1 = (f32[3584]{0}, bf16[4,128]{1,0}) all-reduce(%a, %b), channel_id=1
  %ags = (f32[2,3]{1,0}, f32[16,3]{1,0}) all-gather-start(%x), channel_id=2
  %agd = f32[16,3]{1,0} all-gather-done(%ags)
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%y), channel_id=3
  %rs = s32[8]{0} reduce-scatter(%z), channel_id=4, dimensions={0}
  ROOT %t = pred[] all-reduce(%q), channel_id=5
"""


def test_reader_counts_each_returned_array_once():
    got = collectives(HLO)
    assert got == [Collective("all-reduce", "f32", (3584,)),
                   Collective("all-reduce", "bf16", (4, 128)),
                   Collective("all-gather", "f32", (16, 3)),
                   Collective("collective-permute", "f32", (4,)),
                   Collective("reduce-scatter", "s32", (8,)),
                   Collective("all-reduce", "pred", ())]
    assert [c.bytes for c in got] == [3584 * 4, 4 * 128 * 2, 16 * 3 * 4, 16, 32, 1]
    top = summary(got + got[:1])
    assert top[0] == dict(op="all-reduce", dtype="f32", shape=[3584], bytes=3584 * 4, count=2)
    with pytest.raises(ValueError, match="f8e4m3fn"):
        collectives("  %x = f8e4m3fn[2]{0} all-gather(%y)")


def test_7b_update_gathers_weights_and_keeps_response_rows_local(tmp_path):
    """`launch/plan_memory.py` on LongVILA-R1-7B's update (16 frames, 1 prompt x G = 8 x 128 new
    tokens, seq = 8) lists the compiled update's collectives. Caps, per collective: one that
    carries response rows (an array [1, G, ...], or with the t = 127 teacher-forced tokens)
    moves at most the prefix attention's gathered queries of one chunk, [1, G, 32, 28 heads, 128]
    float32 (3.7 MB; the partials come back reduce-scattered, [1, 1, ...] per device), and no
    all-gather moves more than one layer's weight matrix or the output head (float32 bytes:
    XLA:CPU moves bf16 as float32).
    Before the `branches` rule every device ran all G branches and XLA all-reduced their
    activations instead: each layer's [G, t, 18944] float32 MLP activations (5 all-reduces of
    77 MB at t = 127) and the head's [1, G, t, 152064] float32 logits (618 MB)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "plan_memory.py"), f"--out={tmp_path}",
         "--frames=16", "--phases=update", "--config.rl.max_new_tokens=128"],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads((tmp_path / "plan_memory.json").read_text())["rows"]
    found = [c for c in row["collectives"] if c["op"] != "collective-permute"]
    llm = vlm_config_from(longvila_r1_7b.get_config("grpo").model).llm
    g, t, e, chunk = 8, 127, llm.hidden_size, llm.attention.query_chunk
    rows = [c for c in found if c["shape"][:2] == [1, g] or t in c["shape"]]
    assert rows and rows[0]["bytes"] <= g * chunk * llm.num_heads * llm.head_dim * 4, rows[:3]
    assert any(c["op"] == "reduce-scatter" and c["shape"][:2] == [1, 1] for c in found)
    m, v = llm.intermediate_size, llm.vocab_size
    gathers = [c for c in found if c["op"] == "all-gather"]
    assert gathers[0]["bytes"] <= max(e * m, e * v) * 4, gathers[:3]
