"""`python -m maxlm.convert to_hf`: export a checkpoint as a Hugging Face folder. The conversion is
maxlm/interop/hf.py; `maxlm.convert.from_hf` / `to_hf` stay importable from here."""

from __future__ import annotations

import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy loader reads bf16)

from maxlm import cli
from maxlm import tokenizer
from maxlm.errors import UserError
from maxlm.interop import pretrained
from maxlm.interop.hf import from_hf, to_hf  # noqa: F401  (stable library names)


def main(argv: list[str]) -> None:
    """`python -m maxlm.convert to_hf --workdir=W --out=DIR [--step=N] [--architecture=A]`."""
    from absl import flags

    FLAGS = flags.FLAGS
    if argv[1:] != ["to_hf"]:
        raise ConvertError(f"expected the command `to_hf`, got {' '.join(argv[1:]) or 'nothing'}")
    if not FLAGS.workdir or not FLAGS.out:
        raise ConvertError("to_hf needs --workdir (a training workdir) and --out (the folder to write)")
    # A LoRA run comes back with its adapters merged into the base weights.
    config, params, step = pretrained.load_workdir(FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step)
    to_hf(config, params, FLAGS.out, architecture=FLAGS.architecture or None)
    tok_path = tokenizer.run_tokenizer_path(config, FLAGS.workdir)
    if os.path.exists(tok_path):  # tokenizer.json (+ its config) or the SentencePiece model LlamaTokenizer reads
        tokenizer.export(tok_path, FLAGS.out)
    print(f"wrote step {step} of {FLAGS.workdir} to {FLAGS.out}", flush=True)


class ConvertError(UserError):
    """A user mistake on the command line (reported as one line, exit status 2)."""


def _run() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", "", "Training workdir whose checkpoint to export.")
    flags.DEFINE_string("out", "", "Folder to write (config.json + model.safetensors [+ the run's tokenizer files]).")
    flags.DEFINE_integer("step", -1, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_string("architecture", "",
                        "llama | qwen2 | qwen3 | mistral | gemma3 | internlm2 (default: from the model config).")
    cli.run(main, user_errors=(ConvertError,))


if __name__ == "__main__":
    _run()
