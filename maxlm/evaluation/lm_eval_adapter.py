"""lm-evaluation-harness's three request types answered by maxlm's own jitted scorer and KV-cache sampler,
without importing lm_eval (maxlm/evaluation/lm_eval_model.py wraps this as lm_eval's `--model maxlm`; the
logic lives here so that it is tested where lm_eval is not installed).

Each request is framed the way lm_eval frames it for a Hugging Face model, so a run scored through
`--model maxlm` and its export scored through `--model hf` see the same token ids:

* `loglikelihood(context, continuation)`: trailing spaces of the context move to the continuation; the
  continuation's ids are those of `context + continuation` after the context's own ids (a merge across the
  boundary stays with the continuation); both start with the tokenizer's `text_prefix` (bos, or nothing for
  a tokenizer without one). An empty context scores the continuation after `score_prefix_id` (bos, else eos:
  lm_eval's `prefix_token_id`). Rows longer than `max_length + 1` tokens lose context from the left.
* `loglikelihood_rolling(text)`: every token of the text after `score_prefix_id`, in disjoint windows of
  `max_length` scored tokens each seeing up to `max_length` tokens (lm_eval's rolling windows with
  `context_len=1`: maxlm's `sliding_windows` with window `max_length + 1`, stride `max_length`). This is
  maxlm's `--task=ppl` quantity; lm_eval 0.4's HF backend differs for tokenizers that add bos: it encodes the
  text with bos and prepends bos again, so it also scores log p(bos | bos) and shifts every context by one.
* `generate_until(context, gen_kwargs)`: the context with `text_prefix`, cut from the left to leave
  `max_gen_toks` of room; greedy unless `do_sample` (or a temperature above 0) asks for sampling; stops at
  eos or after `max_gen_toks` tokens; decoded without special tokens (chat markers too, as lm_eval's
  `skip_special_tokens=True`) and cut before the first of the `until` strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from maxlm import tokenizer as tokenizer_lib
from maxlm.errors import UserError
from maxlm.interop import pretrained
from maxlm.model import sampler as sample
from maxlm.model import scoring

MAX_GEN_TOKS = 256  # lm_eval's default for a request that names no max_gen_toks (HFLM.max_gen_toks)
_MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm_eval's order
_GEN_KEYS = frozenset({"until", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", *_MAX_TOKENS_KEYS})


class LmEvalArgsError(UserError):
    """A bad `--model_args` for `--model maxlm`, or a generation request maxlm cannot honour: one line."""


def load(*, workdir: str = "", hf: str = "", step: int | None = None
         ) -> tuple[ml_collections.ConfigDict, dict, tokenizer_lib.Tokenizer | tokenizer_lib.HFTokenizer]:
    """(config, params, tokenizer) of a maxlm training workdir (its newest checkpoint, or `step`; a LoRA
    run merged) or of a Hugging Face folder -- exactly one of the two."""
    if bool(workdir) == bool(hf):
        raise LmEvalArgsError("give exactly one of workdir=W (a maxlm training workdir) or hf=FOLDER (a Hugging "
                              "Face folder) in --model_args")
    if workdir:
        if not os.path.isdir(workdir):
            raise LmEvalArgsError(f"workdir={workdir} is not a directory")
        config, params, _ = pretrained.load_workdir(workdir, step)
        tok_path = tokenizer_lib.run_tokenizer_path(config, workdir)
    else:
        if step is not None:
            raise LmEvalArgsError("step= selects a checkpoint of a workdir; a Hugging Face folder has one model")
        if not pretrained.is_hf_folder(hf):
            raise LmEvalArgsError(f"hf={hf} is not a Hugging Face folder (no config.json there)")
        config, params, tok_path = pretrained.load_base(hf, key="hf")
    if not tok_path or not os.path.exists(tok_path):
        raise LmEvalArgsError(f"no tokenizer for {workdir or hf} (tokenizer.json or tokenizer.model)")
    return config, params, tokenizer_lib.load(tok_path)


def _positive_int(name: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n <= 0 or (isinstance(value, float) and value != n):
        raise LmEvalArgsError(f"{name} must be a positive integer, got {value!r}")
    return n


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any non-empty string of `until` (lm_eval's post-processing)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class Adapter:
    """One loaded model answering lm_eval's requests (see the module docstring for how each is framed).

    `batch_size` rows are scored or generated per compiled call; `max_length` (default: the model's
    `max_seq_len`, the most it accepts) bounds every row as lm_eval's `max_length` does; `max_gen_toks` is
    the generation budget of a request that names none (default lm_eval's 256, at most half of max_length:
    a small model's context would otherwise have no room left for the prompt).
    """

    def __init__(self, config: ml_collections.ConfigDict, params: dict, tok: Any, *,
                 batch_size: int = scoring.SCORE_BATCH, max_length: int | None = None,
                 max_gen_toks: int | None = None):
        self.config, self.params, self.tok = config, params, tok
        self.batch_size = _positive_int("batch_size", batch_size)
        limit = config.model.max_seq_len
        self.max_length = limit if max_length is None else _positive_int("max_length", max_length)
        if self.max_length > limit:
            raise LmEvalArgsError(f"max_length={self.max_length} exceeds the model's max_seq_len={limit}")
        self.max_gen_toks = (min(MAX_GEN_TOKS, self.max_length // 2) if max_gen_toks is None
                             else _positive_int("max_gen_toks", max_gen_toks))

    # ---- loglikelihood ----------------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of one `loglikelihood` request, as lm_eval's HF backend makes them."""
        if not context:
            cont = self.tok.encode(continuation)
            start = tokenizer_lib.score_prefix_id(self.tok)
            return ([start], cont) if cont[:1] != [start] else (cont[:1], cont[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        prefix = tokenizer_lib.text_prefix(self.tok)
        whole = prefix + self.tok.encode(context + continuation)
        ctx = prefix + self.tok.encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding would produce it) per pair."""
        contexts, continuations = [], []
        for i, (context, continuation) in enumerate(pairs):
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise LmEvalArgsError(f"request {i}: the continuation {continuation!r} has no tokens")
            if len(cont) > self.max_length:
                raise LmEvalArgsError(f"request {i}: a continuation of {len(cont)} tokens exceeds max_length="
                                      f"{self.max_length}")
            contexts.append(ctx[-(self.max_length + 1 - len(cont)):])
            continuations.append(cont)
        return scoring.loglikelihoods(self.config, self.params, contexts, continuations, batch_size=self.batch_size,
                                      with_greedy=True)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Total log-likelihood of each whole text (every token scored once; see the module docstring)."""
        contexts, continuations, counts = [], [], []
        for text in texts:
            ids = [tokenizer_lib.score_prefix_id(self.tok)] + self.tok.encode(text)
            spans = scoring.sliding_windows(len(ids), self.max_length + 1, self.max_length)
            counts.append(len(spans))
            for begin, scored, end in spans:
                contexts.append(ids[begin:scored])
                continuations.append(ids[scored:end])
        ll = scoring.loglikelihoods(self.config, self.params, contexts, continuations, batch_size=self.batch_size)
        out, k = [], 0
        for n in counts:
            out.append(float(sum(ll[k:k + n])))
            k += n
        return out

    # ---- generate_until ---------------------------------------------------------------------------------

    def generation_args(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """(stop strings, max new tokens, sampler keyword arguments) of one request's generation kwargs."""
        unknown = sorted(set(gen_kwargs) - _GEN_KEYS)
        if unknown:
            raise LmEvalArgsError(f"generation kwargs {', '.join(unknown)} are not supported by --model maxlm (it "
                                  f"takes {', '.join(sorted(_GEN_KEYS))})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        budget = next((gen_kwargs[k] for k in _MAX_TOKENS_KEYS if gen_kwargs.get(k) is not None), self.max_gen_toks)
        max_new = _positive_int("max_gen_toks", budget)
        if max_new >= self.max_length:
            raise LmEvalArgsError(f"max_gen_toks={max_new} leaves no room for a context in max_length="
                                  f"{self.max_length}")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        greedy = not do_sample if do_sample is not None else temperature == 0.0
        args: dict[str, Any] = dict(greedy=greedy, repetition_penalty=float(gen_kwargs.get("repetition_penalty", 1.0)))
        if not greedy:
            args.update(temperature=temperature or 1.0, top_k=int(gen_kwargs.get("top_k") or 0),
                        top_p=float(gen_kwargs.get("top_p") or 1.0))
        return until, max_new, args

    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """The continuation of each (context, gen_kwargs) request, cut before its stop strings."""
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(requests):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        eos = self.tok.eos_id if self.tok.eos_id is not None and self.tok.eos_id >= 0 else None
        pad = self.tok.pad_id if self.tok.pad_id is not None and self.tok.pad_id >= 0 else 0
        prefix = tokenizer_lib.text_prefix(self.tok)
        out = [""] * len(requests)
        for members in groups.values():
            until, max_new, args = self.generation_args(requests[members[0]][1])
            room = self.max_length - max_new
            prompts = {i: (prefix + self.tok.encode(requests[i][0]))[-room:] for i in members}
            order = sorted(members, key=lambda i: len(prompts[i]))  # similar lengths share a padded shape
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                if not all(prompts[i] for i in chunk):
                    raise LmEvalArgsError("a generation request with an empty context (and no bos to start from)")
                news = sample.generate(self.config, self.params, [prompts[i] for i in chunk], max_new_tokens=max_new,
                                       rng=jax.random.key(0), eos_id=eos, pad_id=pad, **args)
                for i, ids in zip(chunk, news):
                    out[i] = cut_at_stops(self.tok.decode(ids, skip_special=True), until)
        return out


def from_model_args(*, workdir: str = "", hf: str = "", step: Any = None, batch_size: Any = None,
                    max_length: Any = None, max_gen_toks: Any = None, **unknown: Any) -> Adapter:
    """An Adapter from lm_eval's `--model_args` (strings, numbers or None as lm_eval parses them) and its
    `--batch_size` ("auto" and "auto:N" mean maxlm's default batch: one compiled shape per length bucket)."""
    if unknown:
        raise LmEvalArgsError(f"unknown model_args {', '.join(sorted(unknown))}; --model maxlm takes workdir=W or "
                              "hf=FOLDER, and step, batch_size, max_length, max_gen_toks")
    if batch_size is None or str(batch_size).startswith("auto"):
        batch_size = scoring.SCORE_BATCH
    if step not in (None, ""):
        step = 0 if str(step) == "0" else _positive_int("step", step)
    config, params, tok = load(workdir=str(workdir or ""), hf=str(hf or ""), step=None if step == "" else step)
    return Adapter(config, params, tok, batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks)
