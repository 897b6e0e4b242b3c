"""lm-evaluation-harness's `--model maxlm`: a maxlm training workdir (`workdir=W`, its newest checkpoint or
`step=N`) or a Hugging Face folder (`hf=FOLDER`) scored by maxlm's jitted scorer and KV-cache sampler.

Importing this module registers the model with lm_eval (it needs lm_eval installed: `pip install
'maxlm[lm_eval]'`; maxlm itself never imports it). lm_eval 0.4 has no plugin hook for models outside its
tree -- its registry is filled from its own MODEL_MAPPING, and `--include_path` adds tasks only -- so its
command line reaches this model through `python -m maxlm.lm_eval` (maxlm/lm_eval.py), which imports this
module and hands its arguments to lm_eval's CLI unchanged. From Python, `lm_eval.simple_evaluate(
model="maxlm", model_args="workdir=W", ...)` works once this module is imported.

The requests are answered by `maxlm.evaluation.lm_eval_adapter.Adapter`, which documents how each is framed.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401 -- lm_eval fills its registry with its own models only while the registry
# is empty: they must be in before "maxlm" is, or `--model hf` would no longer be found in this process.
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from maxlm.evaluation import lm_eval_adapter


@register_model("maxlm")
class MaxlmLM(LM):
    """`--model maxlm --model_args workdir=W` (or `hf=FOLDER`), with `step`, `batch_size`, `max_length` and
    `max_gen_toks` as lm_eval's HF model takes them. `device` is accepted and ignored: JAX runs on the
    accelerator it finds (JAX_PLATFORMS=cpu keeps it on the CPU)."""

    def __init__(self, workdir: str = "", hf: str = "", step: Any = None, batch_size: Any = None,
                 max_batch_size: Any = None, device: Any = None, max_length: Any = None, max_gen_toks: Any = None,
                 **unknown: Any):
        super().__init__()
        self.adapter = lm_eval_adapter.from_model_args(workdir=workdir, hf=hf, step=step, batch_size=batch_size,
                                                       max_length=max_length, max_gen_toks=max_gen_toks, **unknown)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        out = self.adapter.loglikelihood(pairs)
        for pair, result in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = self.adapter.loglikelihood_rolling(texts)
        for text, result in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        args = [(r.args[0], dict(r.args[1])) for r in requests]
        out = self.adapter.generate_until(args)
        for (context, gen_kwargs), result in zip(args, out):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), result)
        return out
