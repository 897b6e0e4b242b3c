"""Perplexity before and after context extension: the measuring half of `experiments/longctx_demo.sh`.

    python experiments/longctx_demo.py --workdir=W --before_step=600

The run in W trained at a short length L (its first stage, ending at `before_step`) and then continued at
4L with scaled RoPE (its last stage). On the run's own held-out documents (those of at least 4L + 1 tokens,
cut to 8L) this prints, with sliding windows moved by half a window:

- ppl_short: the short model at its trained length (window L);
- ppl_long_before: the same model at window 4L, no extension (positions it never saw);
- ppl_long_scaled_only: the same parameters with the last stage's RoPE scaling, before any long training;
- ppl_long_after / ppl_short_after: the extended model at window 4L / L.

Last line: one JSON object with these, the ratios the issue's bars are stated in, and `passed`.
"""

from __future__ import annotations

import argparse
import json
import sys

from maxlm import tokenizer as tokenizer_lib
from maxlm.data import mixture
from maxlm.interop import pretrained
from maxlm.model import scoring


def held_out_texts(config, tok, min_tokens: int, max_tokens: int) -> list[str]:
    """The run's eval documents with at least `min_tokens` tokens, each cut to its first `max_tokens`."""
    source = mixture.make_source(config, "eval")
    texts = []
    for i in range(len(source)):
        text = source.get(i)
        ids = tok.encode(text) if text else []
        if len(ids) >= min_tokens:
            texts.append(tok.decode(ids[:max_tokens]))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--before_step", type=int, required=True, help="last step of the short stage")
    parser.add_argument("--bar", type=float, default=1.15, help="ppl_long_after / ppl_short must be at most this")
    args = parser.parse_args()

    after_config, after_params, after_step = pretrained.load_workdir(args.workdir)
    before_config, before_params, _ = pretrained.load_workdir(args.workdir, args.before_step)
    short, long = before_config.data.seq_len, after_config.data.seq_len
    tok = tokenizer_lib.load(f"{args.workdir}/tokenizer.model")
    texts = held_out_texts(after_config, tok, min_tokens=long + 1, max_tokens=2 * long)
    if not texts:
        sys.exit(f"error: no held-out document has {long + 1} tokens; raise data.eval_fraction")

    def ppl(config, params, window: int) -> float:
        return round(scoring.perplexity(config, params, tok, texts, window=window)["ppl"], 3)

    out = {"L": short, "long": long, "documents": len(texts), "tokens_per_document": 2 * long,
           "before_step": args.before_step, "after_step": after_step,
           "rope_after": f"{after_config.model.rope_scaling} x{after_config.model.rope_factor:g}",
           "ppl_short": ppl(before_config, before_params, short),
           "ppl_long_before": ppl(before_config, before_params, long),
           "ppl_long_scaled_only": ppl(after_config, before_params, long),  # extended rope, short weights
           "ppl_long_after": ppl(after_config, after_params, long),
           "ppl_short_after": ppl(after_config, after_params, short)}
    out["after_over_short"] = round(out["ppl_long_after"] / out["ppl_short"], 4)
    out["before_over_after"] = round(out["ppl_long_before"] / out["ppl_long_after"], 4)
    out["passed"] = out["after_over_short"] <= args.bar and out["ppl_long_after"] < out["ppl_long_before"]
    for key in ("ppl_short", "ppl_long_before", "ppl_long_scaled_only", "ppl_long_after", "ppl_short_after"):
        print(f"{key:22s} {out[key]:8.3f}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
