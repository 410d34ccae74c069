"""lvr_jax.train.memory_plan (behind launch/plan_memory.py) on the tiny demo config: abstract
compiles of the GRPO step's phases give per-device memory that behaves as sharding and sequence
length say it must."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import demo
from lvr_jax.models.attention import AttentionOptions
from lvr_jax.train import memory_plan
from sharding.mesh import make_mesh


@pytest.fixture(scope="module")
def pm():
    return memory_plan


def config(**rules):
    c = demo.get_config("grpo")
    c.data.pipeline.max_length = 32
    c.data.pipeline.batch_size = 2
    c.sharding_rules.update(rules)
    return c


def mesh(seq: int):
    return make_mesh({"data": 1, "fsdp": 1, "seq": seq, "tensor": 1}, devices=jax.devices()[:seq])


def test_prefill_memory_scales_with_frames_and_seq(pm):
    ring = pm.Plan.build(config(), mesh(4))
    short, = pm.plan_step(ring, 4, phases=("prefill",), log=lambda _: None)
    long, = pm.plan_step(ring, 16, phases=("prefill",), log=lambda _: None)
    single, = pm.plan_step(pm.Plan.build(config(), mesh(1)), 16, phases=("prefill",),
                           log=lambda _: None)
    for r in (short, long, single):
        assert r.phase == "prefill" and min(r.args, r.outputs, r.temp, r.held) > 0
        assert r.peak == r.args + r.outputs - r.alias + r.temp + r.held
        # held = what the step keeps outside the prefill: optimizer, reference, frames, features,
        # and the embedding table, passed with the LLM but unread (jit prunes it from args)
        assert set(r.held_items) == set(pm.HOLDS["prefill"]) | {"unread_args"}
    embed = pm.shard_bytes(ring.model.llm.embed.get_value())
    assert short.held_items["unread_args"] == long.held_items["unread_args"] == embed > 0
    assert long.temp > short.temp
    assert long.outputs > short.outputs          # the prefix K/V grows with the prompt
    # the ring splits the prompt over 4 devices: each holds much less than the whole
    assert long.temp < 0.5 * single.temp
    assert long.outputs < 0.5 * single.outputs
    tokens = pm.step_shapes(ring.config, ring.mesh, 16).prompt_tokens
    assert tokens == 16 * 17 + 32 - 1             # 17 embeddings per tiny frame + text - placeholder


def test_seq_shared_param_rule_shards_the_state(pm):
    plain = pm.Plan.build(config(), mesh(4)).persistent()
    zero3 = pm.Plan.build(config(embed="fsdp+seq"), mesh(4)).persistent()
    assert plain["ref_params"] == plain["policy_params"] > 0
    assert plain["opt_state"] > plain["policy_params"] - plain["non_llm_params"]   # mu + nu
    for k in ("policy_params", "opt_state", "ref_params"):
        assert zero3[k] < 0.5 * plain[k]


def test_verdict_and_table(pm):
    row = lambda phase, temp: pm.PhaseMemory(phase, 8, 10, 5, 5, temp, 3, {"opt_state": 3}, 1.0)  # noqa: E731
    rows = [row("prefill", 100), row("update", 200)]
    assert pm.verdict(rows, 300) == {8: ("update", 213, True)}
    assert pm.verdict(rows, 212) == {8: ("update", 213, False)}
    info = dict(devices=8, mesh={"seq": 8}, rules_changed={}, batch=1, group=8, new_tokens=16,
                text=32, tokens={8: 167}, persistent={"opt_state": 3})
    table = pm.markdown(rows, info, 212)
    assert "| 8 | 167 | update |" in table and "DOES NOT FIT (largest: update" in table


def test_offload_adjusts_the_update_by_the_prompts_checkpoints(pm):
    row = pm.PhaseMemory("update", 8, 10, 5, 5, 200, 3, {"opt_state": 3}, 1.0, host_offload=150)
    plain = pm.PhaseMemory("ref_logprobs", 8, 10, 5, 5, 100, 3, {"opt_state": 3}, 1.0)
    assert (row.peak, row.adjusted, plain.adjusted) == (213, 63, None)
    assert row.as_dict()["adjusted"] == 63 and "adjusted" not in plain.as_dict()
    assert pm.verdict([row, plain], 110) == {8: ("ref_logprobs", 113, False)}
    assert pm.verdict([row, plain], 113) == {8: ("ref_logprobs", 113, True)}
    info = dict(devices=8, mesh={"seq": 8}, rules_changed={}, batch=1, group=8, new_tokens=16,
                text=32, tokens={8: 167}, persistent={"opt_state": 3})
    assert "**0.00** (adjusted 0.00: less offload 0.00)" in pm.markdown([row], info, 113)

    c = config()
    ring = mesh(4)
    s = pm.step_shapes(c, ring, 16)
    layout = pm.Layout.of(ring, pm.settings.sharding_rules(c))
    assert pm.offloaded_checkpoints(c, layout, s) == 0
    c.model.remat, c.model.remat_offload = True, True
    llm = c.model.llm          # layers x prompts x a quarter of the padded prompt x hidden x f32
    want = llm.num_layers * 2 * (s.padded() // 4) * llm.hidden_size * 4
    assert pm.offloaded_checkpoints(c, layout, s) == want > 0
    c.rl.ppo_minibatches = 2          # one minibatch's prompts: half of them
    assert pm.offloaded_checkpoints(c, layout, s) == want // 2
    c.rl.ppo_minibatches = 1
    data2 = make_mesh({"data": 2, "fsdp": 1, "seq": 4, "tensor": 1})   # the rows split over data
    assert pm.offloaded_checkpoints(c, pm.Layout.of(data2, pm.settings.sharding_rules(c)),
                                    pm.step_shapes(c, data2, 16)) == want // 2
    update, = pm.plan_step(pm.Plan.build(c, ring), 16, phases=("update",), log=lambda _: None)
    assert update.host_offload == want and update.adjusted == update.peak - want


def test_stand_in_is_an_argument_and_leaves_no_trace(pm):
    quiet = lambda _: None  # noqa: E731
    what_if = pm.Plan.build(config(), mesh(4), stand_ins=("ring",))
    attention = what_if.model.llm.cfg.attention
    assert attention.prompt is pm.ring_stand_in and attention.prefix is None
    assert attention.tie_positions == "on"                     # as the GPU program does
    assert what_if.ref.llm.cfg.attention.prompt is pm.ring_stand_in
    stand_in, = pm.plan_step(what_if, 4, phases=("prefill",), log=quiet)
    plain = pm.Plan.build(config(), mesh(4))
    real, = pm.plan_step(plain, 4, phases=("prefill",), log=quiet)
    # the O(length) stand-in replaces the ring's sub-block scores: less temp
    assert stand_in.temp < real.temp
    # nothing global changed: a plain plan and the defaults have no stand-in
    for options in (plain.model.llm.cfg.attention, plain.ref.llm.cfg.attention):
        assert options.prompt is None and options.prefix is None and options.tie_positions == "on"
    assert AttentionOptions() == AttentionOptions(tie_positions="auto", prompt=None, prefix=None)
    with pytest.raises(ValueError, match="unknown stand-ins"):
        pm.Plan.build(config(), mesh(4), stand_ins=("flash",))


def test_hosts_flag_spans_the_ring_over_the_nodes(tmp_path):
    """`launch/plan_memory.py --hosts=2`: 2 x --devices virtual devices, the config's seq axis
    twice as long (the demo's fsdp 2 x seq 4 -> fsdp 2 x seq 8 on 16 devices), recorded."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "launch" / "plan_memory.py"), f"--out={tmp_path}",
         f"--config={root / 'configs' / 'demo.py'}:grpo", "--hosts=2", "--frames=4",
         "--phases=encode"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""})     # this process's 8-device count would win
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "plan_memory.json").read_text())
    assert report["devices"] == 16 and report["hosts"] == 2
    assert report["mesh"] == {"data": 1, "fsdp": 2, "seq": 8, "tensor": 1}


@pytest.mark.parametrize("flag,message", [
    ("--frames=", "--frames takes integers >= 1, got ''"), ("--frames=8,abc", "got 'abc'"),
    ("--frames=0", "got '0'"), ("--phases=", "unknown phases ''"),
    ("--devices=abc", "--devices takes integers >= 1"), ("--hosts=0", "--hosts takes integers"),
    ("--batch=-1", "--batch must be >= 0"),
])
def test_bad_flags_are_named(tmp_path, flag, message):
    """Bad flag values stop the script with a message naming the flag (they had ended in
    tracebacks from inside the plan, or `--frames=0` in a "FITS" verdict)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "launch" / "plan_memory.py"),
                          f"--out={tmp_path}", f"--config={root / 'configs' / 'demo.py'}:grpo",
                          flag], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "plan_memory.json").exists()


def test_cpu_upcast_is_measured_for_bf16_updates_only(pm):
    """XLA:CPU slices bf16 in float32 and hoists the upcast of the whole stacked checkpoints out
    of the backward loop; the planner measures that temp by a second compile without loop-invariant
    code motion and subtracts it in `adjusted` (a GPU slices bf16 in place)."""
    quiet = lambda _: None  # noqa: E731
    ring = mesh(4)
    for dtype in ("float32", "bfloat16"):
        c = config()
        c.model.dtype, c.model.remat = dtype, True
        update, = pm.plan_step(pm.Plan.build(c, ring), 16, phases=("update",), log=quiet)
        s, llm = pm.step_shapes(c, ring, 16), c.model.llm
        f32_stack = llm.num_layers * 2 * (s.padded() // 4) * llm.hidden_size * 4
        if dtype == "float32":
            assert update.cpu_upcast == 0 and update.adjusted is None
        else:   # at least the float32 copy of the layers' checkpoints
            assert f32_stack <= update.cpu_upcast < update.temp
            assert update.adjusted == update.peak - update.cpu_upcast
            assert update.as_dict()["cpu_upcast"] == update.cpu_upcast


def test_a_batch_the_minibatches_do_not_split_is_refused_before_compiling(pm):
    c = config()
    c.rl.ppo_minibatches = 2
    with pytest.raises(ValueError, match=r"3 prompts per rollout do not split into "
                                         r"rl.ppo_minibatches=2"):
        pm.plan_step(pm.Plan.build(c, mesh(4)), 4, batch=3, log=lambda _: None)
