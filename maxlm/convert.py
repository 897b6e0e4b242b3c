"""`python -m maxlm.convert to_hf`: export a checkpoint as a Hugging Face folder. The conversion is
maxlm/interop/hf.py; `maxlm.convert.from_hf` / `to_hf` stay importable from here."""

from __future__ import annotations

import json
import os
import sys

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy loader reads bf16)

from maxlm import cli
from maxlm import tokenizer
from maxlm.data import chat
from maxlm.errors import UserError
from maxlm.interop import pretrained
from maxlm.interop.hf import from_hf, to_hf  # noqa: F401  (stable library names)


def main(argv: list[str]) -> None:
    """`python -m maxlm.convert to_hf --workdir=W --out=DIR [--step=N] [--architecture=A] [--dtype=bfloat16]
    [--max_shard_size=5GB]`."""
    from absl import flags

    FLAGS = flags.FLAGS
    if argv[1:] != ["to_hf"]:
        raise ConvertError(f"expected the command `to_hf`, got {' '.join(argv[1:]) or 'nothing'}")
    if not FLAGS.workdir or not FLAGS.out:
        raise ConvertError("to_hf needs --workdir (a training workdir) and --out (the folder to write)")
    # A LoRA run comes back with its adapters merged into the base weights.
    config, params, step = pretrained.load_workdir(FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step)
    if FLAGS.dtype not in ("", "float32", "bfloat16", "float16"):
        raise ConvertError(f"--dtype={FLAGS.dtype}: choose float32, bfloat16 or float16 (default: the checkpoint's)")
    to_hf(config, params, FLAGS.out, architecture=FLAGS.architecture or None, dtype=FLAGS.dtype or None,
          max_shard_size=FLAGS.max_shard_size)
    tok_path = tokenizer.run_tokenizer_path(config, FLAGS.workdir)
    if os.path.exists(tok_path):  # what AutoTokenizer needs for maxlm's ids, bos included (tokenizer.export)
        tokenizer.export(tok_path, FLAGS.out, model_max_length=config.model.max_seq_len,
                         chat_template=_chat_template(config, tok_path))
        with open(os.path.join(FLAGS.out, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
        if model_type == "qwen2" and not tokenizer.is_hf(tok_path):
            print("warning: transformers 5 loads the tokenizer of a qwen2 folder as Qwen2Tokenizer, which rebuilds it "
                  "as byte-level BPE and misreads this SentencePiece tokenizer: export with --architecture=llama (or "
                  "qwen3) for AutoTokenizer to reproduce maxlm's ids", file=sys.stderr, flush=True)
    print(f"wrote step {step} of {FLAGS.workdir} to {FLAGS.out}", flush=True)


def _chat_template(config, tok_path: str) -> str | None:
    """The Jinja chat template an export carries: a post-trained run's piece template (`chat.to_jinja`) when
    its markers are single tokens of the run's tokenizer; None for a pretraining run, and for
    `sft.template=hf`, whose model's own template travels with its tokenizer files."""
    if not (config.sft.base or config.ppo.policy or config.reward.base) or config.sft.template == chat.HF:
        return None
    template = chat.load_template(config.sft.template)
    tok = tokenizer.load(tok_path)
    if any(len(tok.encode(marker)) != 1 for marker in template.special_tokens):
        return None
    return chat.to_jinja(template, bos=tok.add_bos)


class ConvertError(UserError):
    """A user mistake on the command line (reported as one line, exit status 2)."""


def _run() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", "", "Training workdir whose checkpoint to export.")
    flags.DEFINE_string("out", "", "Folder to write (config.json + model.safetensors [+ tokenizer.json, "
                        "tokenizer_config.json, special_tokens_map.json, and a SentencePiece run's tokenizer.model]).")
    flags.DEFINE_integer("step", -1, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_string("architecture", "",
                        "llama | qwen2 | qwen3 | mistral | gemma3 | internlm2 (default: from the model config).")
    flags.DEFINE_string("dtype", "", "Weights on disk: float32 | bfloat16 | float16 (default: the checkpoint's).")
    flags.DEFINE_string("max_shard_size", "5GB", "Split the weights into shards of at most this size, with "
                        "model.safetensors.index.json (transformers' layout).")
    cli.run(main, user_errors=(ConvertError,))


if __name__ == "__main__":
    _run()
