"""`python -m maxlm.lm_eval [lm_eval's own arguments]`: lm-evaluation-harness's command line with maxlm
registered as `--model maxlm`.

    python -m maxlm.lm_eval --model maxlm --model_args workdir=runs/tiny --tasks my_task --include_path tasks/
    python -m maxlm.lm_eval run --model maxlm --model_args hf=exported/,batch_size=16 --tasks my_task ...

lm_eval 0.4 finds models only in its own tree (no entry-point discovery; `--include_path` adds tasks), so
`lm_eval --model maxlm` itself cannot see maxlm: this imports the model class, which registers it, and runs
lm_eval's CLI on the arguments unchanged -- every other model, task and flag works as under `lm_eval`. A
mistake in maxlm's model_args is one line on stderr and exit status 2. Needs `pip install 'maxlm[lm_eval]'`.
"""

from __future__ import annotations

import sys

from maxlm import cli

try:  # registers --model maxlm; lm_eval is optional, so this module imports (and explains) without it
    from maxlm.evaluation import lm_eval_model
except ModuleNotFoundError as e:
    if not (e.name or "").startswith("lm_eval"):
        raise
    lm_eval_model = None


def main(argv: list[str]) -> None:
    """Run lm_eval's CLI on `argv` (the arguments after the program name) with `--model maxlm` available."""
    if lm_eval_model is None:
        print("error: lm-evaluation-harness is not installed: pip install 'maxlm[lm_eval]'", file=sys.stderr,
              flush=True)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except cli.USER_ERRORS as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
