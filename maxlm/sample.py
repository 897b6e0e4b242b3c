"""`python -m maxlm.sample`: sample from a run's newest checkpoint, through the generation engine
(maxlm/inference/engine.py; every prompt is one request of its continuous batch)."""

from __future__ import annotations

import os
import sys

from maxlm import cli
from maxlm import tokenizer
from maxlm.inference.engine import Engine, SamplingParams
from maxlm.interop import pretrained
from maxlm.model.sampler import SampleError, check_request, generate  # noqa: F401  (maxlm.sample.generate)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "(required) Training workdir: the newest checkpoint under "
                        "<workdir>/checkpoints is loaded, and its tokenizer (config.tokenizer.path, else "
                        "<workdir>/tokenizer.json or tokenizer.model).")
    flags.DEFINE_multi_string("prompt", None, "Text to continue; repeat the flag for a batch of prompts.")
    flags.DEFINE_integer("max_new_tokens", 128, "Most tokens generated per prompt (fewer if eos comes first).")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature (> 0); lower is more conservative.")
    flags.DEFINE_integer("top_k", 50, "Sample only among the k most likely tokens; 0 disables.")
    flags.DEFINE_float("top_p", 0.95, "Nucleus sampling: the smallest set of tokens with probability >= p; "
                       "1 disables.")
    flags.DEFINE_float("repetition_penalty", 1.1, "CTRL repetition penalty on tokens already in the text; "
                       "1 disables.")
    flags.DEFINE_bool("greedy", False, "Argmax decoding (ignores temperature, top_k, top_p).")
    flags.DEFINE_integer("seed", 0, "Random seed for sampling (prompt i uses seed + i).")
    pretrained.define_quant_flags()
    flags.DEFINE_bool("print_completion_only", False, "Print only each continuation's text, one per prompt "
                      "(nothing else on stdout).")


def main(argv: list[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SampleError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir = FLAGS.workdir
    if not workdir:
        raise SampleError("--workdir is required (a training workdir with checkpoints)")
    if not FLAGS.prompt:
        raise SampleError("give at least one --prompt")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no such workdir: {workdir}")
    try:
        config, params, step = pretrained.load_workdir(workdir)
    except pretrained.BaseModelError as e:
        raise SampleError(str(e)) from None
    params = pretrained.quantize(config, params, FLAGS.quant, FLAGS.quant_group_size)
    path = tokenizer.run_tokenizer_path(config, workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}")
    tok = tokenizer.load(path)
    bos = tokenizer.text_prefix(tok)
    encoded = [list(tok.encode(p)) for p in FLAGS.prompt]
    prompts = [bos + ids for ids in encoded]
    eos = tok.eos_id if tok.eos_id is not None and tok.eos_id >= 0 else None
    if FLAGS.max_new_tokens < 1:
        raise SampleError(f"max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}")
    if not FLAGS.greedy and not FLAGS.temperature > 0:
        raise SampleError(f"temperature must be > 0 (use --greedy for argmax), got {FLAGS.temperature}")
    engine = Engine(config, params, slots=min(len(prompts), 32), eos_id=eos, detokenize=tok.decode)
    settings = [SamplingParams(max_tokens=FLAGS.max_new_tokens, temperature=0.0 if FLAGS.greedy else FLAGS.temperature,
                               top_k=FLAGS.top_k, top_p=FLAGS.top_p, repetition_penalty=FLAGS.repetition_penalty,
                               seed=FLAGS.seed + i) for i in range(len(prompts))]
    for prompt, setting in zip(prompts, settings):
        engine.check(prompt, setting)
    print(f"step {step} of {workdir}; {len(prompts)} prompt(s)", file=sys.stderr, flush=True)
    done = engine.generate(prompts, settings)
    for text, ids, req in zip(FLAGS.prompt, encoded, done):
        if FLAGS.print_completion_only:
            print(req.text, flush=True)
            continue
        print(f"=== prompt: {text!r}")
        stopped = ", stopped at eos" if req.finish_reason == "stop" else ""
        print(f"--- prompt + completion ({len(req.tokens)} new tokens{stopped}):")
        # Decoding prompt and completion together keeps SentencePiece's word-boundary spaces right.
        print(tok.decode(ids + req.tokens), flush=True)


def _run() -> None:
    _define_flags()
    cli.run(main, user_errors=(SampleError,))


if __name__ == "__main__":
    _run()
