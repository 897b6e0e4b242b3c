"""`python -m maxlm.serve --workdir=W | --hf=FOLDER [--host --port]`: an OpenAI-compatible HTTP server
(maxlm/inference/server.py) over the continuous-batching engine (maxlm/inference/engine.py).

    python -m maxlm.serve --workdir=/tmp/maxlm_run --port=8000
    curl localhost:8000/v1/completions -d '{"prompt": "Once upon a time", "max_tokens": 32}'

Needs the `serve` extra (FastAPI and uvicorn): `pip install -e '.[serve]'`.
"""

from __future__ import annotations

import os
import sys

from maxlm import cli
from maxlm import tokenizer as tokenizer_lib
from maxlm.data import chat
from maxlm.errors import UserError
from maxlm.inference.engine import Engine
from maxlm.interop import pretrained
from maxlm.model.sampler import SampleError

try:
    from maxlm.inference import server
except ImportError as _missing:  # FastAPI / uvicorn: the serve extra
    server, _SERVER_MISSING = None, _missing


class ServeError(UserError):
    """A user mistake on the command line (one line, exit status 2)."""


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", "", "A maxlm run to serve (its newest checkpoint; LoRA runs merged; PPO's policy).")
    flags.DEFINE_string("hf", "", "A Hugging Face folder to serve instead (config.json, safetensors, tokenizer).")
    flags.DEFINE_integer("step", -1, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_string("served_model_name", "", "The model's name in the API (default: the folder's name).")
    flags.DEFINE_integer("slots", 32, "Sequences decoded together (the engine's continuous batch).")
    flags.DEFINE_integer("max_len", 0, "Most tokens per sequence, prompt + reply (default: model.max_seq_len).")
    flags.DEFINE_integer("chunk", 256, "Prompt tokens per prefill chunk.")
    flags.DEFINE_string("template", "", "Chat template for /v1/chat/completions: chatml | internlm2 | hf | a .json "
                        "(default: the run's sft.template; a Hugging Face folder's own template).")
    pretrained.define_quant_flags()
    flags.DEFINE_enum("log_level", "info", ["critical", "error", "warning", "info", "debug"], "uvicorn's log level.")


def load(FLAGS) -> tuple:
    """(config, params, tokenizer, chat template or None, default name) of --workdir or --hf."""
    if bool(FLAGS.workdir) == bool(FLAGS.hf):
        raise ServeError("give exactly one of --workdir (a maxlm run) or --hf (a Hugging Face folder)")
    if FLAGS.workdir:
        if not os.path.isdir(FLAGS.workdir):
            raise FileNotFoundError(f"no such workdir: {FLAGS.workdir}")
        config, params, _ = pretrained.load_workdir(FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step)
        tok_path = tokenizer_lib.run_tokenizer_path(config, FLAGS.workdir)
        template_name = FLAGS.template or config.sft.template
    else:
        if not pretrained.is_hf_folder(FLAGS.hf):
            raise ServeError(f"--hf={FLAGS.hf} is not a Hugging Face folder (no config.json there)")
        config, params, tok_path = pretrained.load_base(FLAGS.hf, key="hf")
        template_name = FLAGS.template or chat.HF
    if not tok_path or not os.path.exists(tok_path):
        raise FileNotFoundError(f"no tokenizer at {tok_path or FLAGS.hf}")
    tok = tokenizer_lib.load(tok_path)
    params = pretrained.quantize(config, params, FLAGS.quant, FLAGS.quant_group_size)
    try:
        template = chat.load_template(template_name, tok_path)
    except UserError as e:
        if FLAGS.template:
            raise
        print(f"no chat template ({e}): /v1/chat/completions is off", file=sys.stderr, flush=True)
        template = None
    name = FLAGS.served_model_name or os.path.basename(os.path.normpath(FLAGS.workdir or FLAGS.hf))
    return config, params, tok, template, name


def main(argv: list[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise ServeError(f"unexpected arguments: {' '.join(argv[1:])}")
    if server is None:
        raise ServeError(f"the server needs the serve extra: pip install -e '.[serve]' ({_SERVER_MISSING})")
    config, params, tok, template, name = load(FLAGS)
    eos = tok.eos_id if tok.eos_id is not None and tok.eos_id >= 0 else None
    engine = Engine(config, params, slots=FLAGS.slots, max_len=FLAGS.max_len or None, chunk=FLAGS.chunk, eos_id=eos,
                    detokenize=tok.decode)
    print(f"serving {name!r} ({engine.slots} slots of {engine.max_len} tokens) on http://{FLAGS.host}:{FLAGS.port}",
          file=sys.stderr, flush=True)
    server.run(server.Served(engine, tok, name, template), FLAGS.host, FLAGS.port, FLAGS.log_level)


def _run() -> None:
    _define_flags()
    cli.run(main, user_errors=(ServeError, SampleError, pretrained.BaseModelError))


if __name__ == "__main__":
    _run()
