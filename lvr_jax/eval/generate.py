"""Answer a multiple-choice question about one video with a VILA-layout checkpoint
(`Generator`, behind launch/generate.py, whose flags are defined here):

    python launch/generate.py --checkpoint=runs/demo/grpo_model --video=clip.mp4 \\
        --question="What happened first?" --options="a red ball,a blue cube,a green star,nothing"
    python launch/generate.py --checkpoint=DIR --video=clip.mp4 \\
        --question=$'Which came first?\\nA. x\\nB. y' --num_samples=4 --temperature=1.0 \\
        --seed=3 --json_out=answers.json

The video is sampled and preprocessed as in training (`num_frames` uniform frames, optional
`fps` cap, SigLIP preprocessing of the checkpoint's `vision_tower/`), the prompt is the
reasoning prompt of `lvr_jax.data.prompts.rl_prompt_ids` (with `data.pipeline.system_prompt` of
the config), the frames are encoded frame-parallel and the answers decoded with the shared-prefix
sampler on the config's mesh (`--config.mesh.seq=...` etc.). Greedy by default
(`--temperature=0`); `--num_samples=G` draws G answers from one prefill. Prints each response
with the answer `lvr_jax.rl.rewards.extract_answer` reads from it under the config's
`rl.reward_style`.

Options: inline as lines "A. ..." in --question, or --options: one value is split on commas,
a repeated flag gives one option per value (commas kept). Not both.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

_INLINE_OPTION = re.compile(r"^\s*\(?[A-Z][.):]\s", re.M)


class InputError(ValueError):
    """A bad command-line input; the message names the flag and the value."""


def check_checkpoint(checkpoint) -> Path:
    """The checkpoint folder, which must be a VILA layout (config.json + llm/ with a tokenizer +
    vision_tower/ + mm_projector/)."""
    from lvr_jax.weights.hf import vila_folder_problem

    if not checkpoint:
        raise InputError("--checkpoint is required (a VILA-layout folder)")
    path = Path(checkpoint)
    problem = vila_folder_problem(path, tokenizer=True)
    if problem:
        raise InputError(f"--checkpoint {path}{problem}")
    return path


def check_video_file(video) -> Path:
    """The video path must name an existing, non-empty regular file (decoding is checked later)."""
    if not video:
        raise InputError("--video is required (an mp4 path)")
    path = Path(video)
    if not path.exists():
        raise InputError(f"--video {path}: file not found")
    if not path.is_file():
        raise InputError(f"--video {path}: not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"--video {path}: empty file (0 bytes)")
    return path


def parse_options(values) -> list[str] | None:
    """--options values -> option texts: one value is split on commas, several are kept whole."""
    values = [str(v) for v in (values or []) if str(v).strip()]
    if not values:
        return None
    if len(values) == 1:
        values = values[0].split(",")
    return [v.strip() for v in values if v.strip()]


def question_text(question: str, options=None) -> str:
    """The question with its options (inline "A. ..." lines, or `options` appended)."""
    from lvr_jax.data.prompts import format_question

    if not question or not str(question).strip():
        raise InputError("--question is empty")
    question = str(question)
    if options:
        if _INLINE_OPTION.search(question):
            raise InputError("--question already lists options (lines like 'A. ...') and "
                             "--options gives them too; use one of the two")
        try:
            return format_question(question, list(options))
        except ValueError as e:
            raise InputError(f"--options {list(options)}: {e}") from e
    return format_question(question)


def check_sampling(*, num_frames, fps, max_new_tokens, temperature, top_p, top_k, num_samples):
    checks = [("--num_frames", num_frames, num_frames >= 1, ">= 1"),
              ("--fps", fps, fps >= 0, ">= 0 (0 = no cap)"),
              ("--max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
              ("--temperature", temperature, temperature >= 0, ">= 0 (0 = greedy)"),
              ("--top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
              ("--top_k", top_k, top_k >= 0, ">= 0 (0 = off)"),
              ("--num_samples", num_samples, num_samples >= 1, ">= 1")]
    for flag, value, ok, want in checks:
        if not ok:
            raise InputError(f"{flag}={value}: must be {want}")
    if num_samples > 1 and temperature == 0:
        log.warning("--num_samples=%d with --temperature=0 (greedy): all samples are the same",
                    num_samples)


class Generator:
    """A checkpoint on a mesh, ready to answer questions about videos.

    Inputs are checked (video decodable, question length) before the weights are loaded; the
    model loads on the first `answer` (or `load`)."""

    def __init__(self, config, checkpoint, *, mesh=None):
        from lvr_jax.data.video import Preprocessor
        from lvr_jax.weights import hf

        self.config = config
        self.checkpoint = check_checkpoint(checkpoint)
        try:
            self.preprocessor = Preprocessor.from_pretrained(self.checkpoint / "vision_tower")
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--checkpoint {self.checkpoint}: {e}") from e
        self.tokenizer = hf.load_tokenizer(self.checkpoint / "llm")
        self._mesh = mesh
        self._layout = None
        self.model = None
        self._sampler = None

    # -- inputs ---------------------------------------------------------------------------------
    def prompt_ids(self, question: str, options=None, *, max_prompt_tokens: int | None = None):
        """Token ids of the reasoning prompt (one video placeholder); errors name the input."""
        from lvr_jax.data.prompts import rl_prompt_ids

        text = question_text(question, options)
        try:
            ids = rl_prompt_ids(self.tokenizer, text,
                                system=self.config.data.pipeline.get("system_prompt"),
                                template=self.config.data.pipeline.get("prompt_template"))
        except ValueError as e:
            raise InputError(f"--question {question[:80]!r}: {e}") from e
        limit = (self.config.data.pipeline.get("max_length") if max_prompt_tokens is None
                 else max_prompt_tokens)
        if limit and len(ids) > limit:
            raise InputError(f"--question is too long: the prompt is {len(ids)} tokens with the chat "
                             f"template and options, more than {limit} (data.pipeline.max_length "
                             f"of the config, --max_prompt_tokens to change it)")
        return ids

    def frames(self, video, num_frames: int, fps: float = 0.0):
        """(preprocessed frames float32 [T, S, S, 3], sampled frame indices [T])."""
        from lvr_jax.data.video import VideoError, read_frames

        path = check_video_file(video)
        try:
            raw, idx = read_frames(path, num_frames, fps, return_indices=True,
                                   short=self.config.data.pipeline.get("short_video", "all"))
        except VideoError as e:
            raise InputError(f"--video {e}") from e
        return self.preprocessor(raw), idx

    # -- model ----------------------------------------------------------------------------------
    @property
    def layout(self):
        """The config's mesh (or the one given) with the config's sharding rules."""
        if self._layout is None:
            from lvr_jax.train import settings
            from sharding.mesh import Layout

            self._layout = (settings.mesh_and_layout(self.config)[1] if self._mesh is None else
                            Layout.of(self._mesh, settings.sharding_rules(self.config)))
        return self._layout

    def load(self):
        """Load the weights onto the mesh (once)."""
        if self.model is None:
            from lvr_jax.rollout.sampler import Sampler
            from lvr_jax.train import settings

            layout = self.layout
            self.model, _, _ = settings.load_model(self.config, self.checkpoint, layout.mesh)
            self._sampler = Sampler.for_tokenizer(self.model, layout.mesh, self.tokenizer,
                                                  rules=layout.table)
        return self.model

    # -- answering ------------------------------------------------------------------------------
    def answer(self, video, question: str, options=None, *, num_frames: int | None = None,
               fps: float | None = None, max_new_tokens: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               num_samples: int = 1, max_prompt_tokens: int | None = None) -> dict:
        """G answers to `question` about `video`. Returns a JSON-able dict: checkpoint, video,
        question (with options), frame_indices, prompt_tokens, sequence_length, sampling, and
        responses [{text, answer, token_ids, num_tokens, finished}]."""
        import jax.numpy as jnp

        from lvr_jax.data.prompts import expanded_length
        from lvr_jax.models.vlm import encode_batch, make_prompts
        from lvr_jax.rl.rewards import extract_answer
        from lvr_jax.rollout.sampler import SamplingParams
        from lvr_jax.train import settings

        pipe = self.config.data.pipeline
        num_frames = int(pipe.num_frames if num_frames is None else num_frames)
        fps = float(pipe.get("fps", 0.0) if fps is None else fps)
        max_new_tokens = int(self.config.eval.max_new_tokens if max_new_tokens is None
                             else max_new_tokens)
        check_sampling(num_frames=num_frames, fps=fps, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples)
        ids = self.prompt_ids(question, options, max_prompt_tokens=max_prompt_tokens)
        pixels, idx = self.frames(video, num_frames, fps)
        model = self.load()
        total = expanded_length(len(ids), len(pixels), model.cfg.tokens_per_frame) + max_new_tokens
        max_pos = model.cfg.llm.max_position_embeddings
        if total > max_pos:
            raise InputError(f"{len(pixels)} frames x {model.cfg.tokens_per_frame} tokens + "
                             f"{len(ids)} prompt tokens + --max_new_tokens={max_new_tokens} = "
                             f"{total} positions, more than the model's max_position_embeddings "
                             f"{max_pos}; lower --num_frames or --max_new_tokens")
        layout, sampler = self.layout, self._sampler
        feats = encode_batch(model, jnp.asarray(pixels[None]), layout=layout)
        prompt = make_prompts(model, feats, jnp.asarray(ids[None]),
                              jnp.ones((1, len(ids)), jnp.int32), layout)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature),
                                top_p=float(top_p), top_k=int(top_k),
                                num_samples=int(num_samples))
        tokens, _, lengths = sampler.generate_padded(prompt, None, params, seed=int(seed))
        stops = set(sampler.eos_ids)
        style = settings.reward_style(self.config)
        responses = []
        for row, n in zip(tokens, lengths):
            toks = [int(t) for t in row[:int(n)]]
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            responses.append({"text": text, "answer": extract_answer(text, style=style), "token_ids": toks,
                              "num_tokens": len(toks), "finished": bool(toks and toks[-1] in stops)})
        return {"checkpoint": str(self.checkpoint), "video": str(video),
                "question": question_text(question, options),
                "frame_indices": [int(i) for i in idx], "prompt_tokens": len(ids),
                "sequence_length": total - max_new_tokens,
                "sampling": {"max_new_tokens": max_new_tokens, "temperature": float(temperature),
                             "top_p": float(top_p), "top_k": int(top_k), "seed": int(seed),
                             "num_samples": int(num_samples), "num_frames": num_frames,
                             "fps": fps},
                "responses": responses}


def format_result(result: dict) -> str:
    """What the CLI prints: one block per response, the extracted answer on its header line."""
    n = len(result["responses"])
    lines = [f"[generate] {result['video']}: {len(result['frame_indices'])} frames "
             f"{result['frame_indices']}, prompt {result['prompt_tokens']} tokens "
             f"({result['sequence_length']} positions with the video)"]
    for i, r in enumerate(result["responses"]):
        end = "" if r["finished"] else ", not finished: hit --max_new_tokens"
        lines.append(f"--- response {i + 1}/{n} ({r['num_tokens']} tokens{end}) answer: "
                     f"{r['answer']}")
        lines.append(r["text"])
    return "\n".join(lines)


def run(config, checkpoint, video, question, *, options=None, json_out: str | None = None,
        **kw) -> dict:
    """The CLI body: cheap input checks first, then load, answer, print, write --json_out.
    With several processes (`--coordinator_address` / run_local.py) every process runs it (the
    video must be readable on every host) and process 0 prints and writes."""
    check_checkpoint(checkpoint)
    check_video_file(video)
    if json_out and Path(json_out).is_dir():
        raise InputError(f"--json_out {json_out} is a folder; give a file path")
    gen = Generator(config, checkpoint)
    result = gen.answer(video, question, options, **kw)
    import jax
    if jax.process_index() != 0:        # multi-process: every process decodes, process 0 reports
        return result
    print(format_result(result), flush=True)
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"[generate] wrote {out}", flush=True)
    return result


def define_flags(flag_values=None, argv=None) -> dict:
    """The CLI flags (on absl's global FLAGS unless `flag_values`); returns their holders.
    `argv`: the command line the config flag reads its `--config.x=...` overrides from
    (default sys.argv; give it when parsing another list into `flag_values`)."""
    from absl import flags
    from ml_collections import config_flags

    from lvr_jax.cli import config_file

    fv = flags.FLAGS if flag_values is None else flag_values
    kw = {"flag_values": fv}
    return dict(
        config=config_flags.DEFINE_config_file(
            "config", config_file("demo.py"),
            "config: mesh, dtypes, sharding rules, data.pipeline (frames, max_length, system "
            "prompt), eval.max_new_tokens", sys_argv=argv, **kw),
        checkpoint=flags.DEFINE_string("checkpoint", None, "VILA-layout checkpoint folder", **kw),
        video=flags.DEFINE_string("video", None, "video file (mp4, ...)", **kw),
        question=flags.DEFINE_string("question", None, "question; options may follow as lines "
                                     "'A. ...'", **kw),
        options=flags.DEFINE_multi_string("options", [], "answer options: one comma-separated "
                                          "value, or the flag repeated (one option each)", **kw),
        num_frames=flags.DEFINE_integer("num_frames", None, "frames sampled (default: "
                                        "config.data.pipeline.num_frames)", **kw),
        fps=flags.DEFINE_float("fps", None, "cap on the sampling rate, 0 = none (default: "
                               "config.data.pipeline.fps)", **kw),
        max_new_tokens=flags.DEFINE_integer("max_new_tokens", None, "default: "
                                            "config.eval.max_new_tokens", **kw),
        temperature=flags.DEFINE_float("temperature", 0.0, "0 = greedy", **kw),
        top_p=flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass", **kw),
        top_k=flags.DEFINE_integer("top_k", 0, "top-k sampling, 0 = off", **kw),
        seed=flags.DEFINE_integer("seed", 0, "sampling seed", **kw),
        num_samples=flags.DEFINE_integer("num_samples", 1, "G answers from one prefill", **kw),
        max_prompt_tokens=flags.DEFINE_integer("max_prompt_tokens", None, "longest prompt in "
                                               "tokens (default: config.data.pipeline.max_length)",
                                               **kw),
        json_out=flags.DEFINE_string("json_out", None, "also write the result as JSON here", **kw),
    )


def run_flags(holders: dict) -> dict:
    """`run` with the parsed flag values."""
    v = {k: h.value for k, h in holders.items()}
    return run(v.pop("config"), v.pop("checkpoint"), v.pop("video"), v.pop("question"),
               options=parse_options(v.pop("options")), **v)
