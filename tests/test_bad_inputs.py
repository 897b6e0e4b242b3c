"""Bad input on every command, table-driven (issue 21): each case runs one command line as a user would and
checks the exit status, that stderr is exactly one line (`error: ...` naming the cause), that no traceback
is printed, and that the trained workdir's checkpoints are byte-identical afterwards.

    python -m tests.test_bad_inputs            # the whole table, printed as the probe's report
    pytest -q tests/test_bad_inputs.py         # the fast cases; -m slow for the rest

A case is `Case(name, command, args, expect)`: `args(fx)` builds the command line (and whatever bad file it
needs) from the shared fixtures `fx`; `expect` is a fragment the error line must contain. Cases with
`code=0` are the ones where continuing is right (the line is then a warning, and the run must succeed).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import pytest

from tests.helpers import ROOT, small_config, write_corpus

# ------------------------------------------------------------------------------------------- fixtures


class Fixtures:
    """What the cases share, built once: a corpus, a tokenizer, a config file, a trained language-model
    workdir with two checkpoints (steps 3 and 6), its Hugging Face export, and a reward-model workdir."""

    def __init__(self, root: str, reward_workdir: str | None = None):
        from maxlm import tokenizer
        from maxlm.interop import hf, pretrained
        from maxlm.training import pretrain

        self.root = root
        self._n = 0
        self.corpus = os.path.join(root, "corpus.jsonl")
        write_corpus(self.corpus)
        self.tok_dir = os.path.join(root, "tok")
        os.makedirs(self.tok_dir)
        tokenizer.load_or_train(small_config(self.corpus), self.tok_dir)
        self.tok = os.path.join(self.tok_dir, "tokenizer.model")
        self.cfg = self.write("config.py", "from tests.helpers import small_config\n\n\ndef get_config():\n"
                              f"    return small_config({self.corpus!r}, **{{'tokenizer.path': {self.tok!r}, "
                              "'train.num_steps': 6, 'train.num_samples': 0, 'checkpoint.async_save': False,\n"
                              "        'sft.eval_items': 0, 'sft.task_train_size': 8, 'sft.task_eval_size': 4})\n")
        self.lm = os.path.join(root, "lm")
        pretrain.train(self._load_cfg(), self.lm)
        self.hf = os.path.join(root, "hf")
        config, params, _ = pretrained.load_workdir(self.lm)
        hf.to_hf(config, params, self.hf)
        shutil.copy(self.tok, os.path.join(self.hf, "tokenizer.model"))
        self.rm = reward_workdir

    def _load_cfg(self):
        from maxlm.config import load_config_file
        return load_config_file(self.cfg)

    def path(self, name: str) -> str:
        """A fresh path under the fixtures' root (nothing created)."""
        self._n += 1
        return os.path.join(self.root, f"case{self._n}_{name}")

    def write(self, name: str, text: str | bytes) -> str:
        path = self.path(name)
        with open(path, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        return path

    def mkdir(self, name: str) -> str:
        path = self.path(name)
        os.makedirs(path)
        return path

    def copy_lm(self) -> str:
        """A copy of the trained workdir (for cases that damage it)."""
        dst = self.path("lm_copy")
        shutil.copytree(self.lm, dst)
        return dst

    def mount(self, options: str) -> str:
        """A tmpfs mounted with `options` (e.g. "ro", "size=256k"); skips the case where mounting is not
        allowed (an unprivileged CI container)."""
        where = self.path("mnt")
        os.makedirs(where)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", where], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        return where


def _digest(folder: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    command: str  # the module after `python -m maxlm.`
    args: Callable[[Fixtures], list[str]]
    expect: str  # a fragment of the one stderr line
    code: int = 2
    lines: int = 1  # stderr lines: 2 where the command streams its progress there (curate) before the error
    needs_rm: bool = False  # uses a reward-model workdir (the session's `reward_run`)


def _train(fx: Fixtures, *overrides: str, workdir: str | None = None) -> list[str]:
    return [f"--config={fx.cfg}", f"--workdir={workdir or fx.path('w')}", *overrides]


def _config_file(text: str) -> Callable[[Fixtures], list[str]]:
    return lambda fx: [f"--config={fx.write('bad_config.py', text)}", f"--workdir={fx.path('w')}"]


def _damaged(fx: Fixtures, how: str) -> str:
    """A copy of the trained workdir whose newest checkpoint (6) is damaged `how`."""
    work = fx.copy_lm()
    step = os.path.join(work, "checkpoints", "6")
    if how == "missing_params":
        shutil.rmtree(os.path.join(step, "params"))
    elif how == "garbage_config":
        for name in os.listdir(step):
            if name.startswith("config"):
                with open(os.path.join(step, name, "metadata") if os.path.isdir(os.path.join(step, name))
                          else os.path.join(step, name), "w") as f:
                    f.write("{garbage")
    return work


def _hf_copy(fx: Fixtures, edit_config=None, edit_tensors=None) -> str:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    folder = fx.path("hf")
    shutil.copytree(fx.hf, folder)
    if edit_config:
        path = os.path.join(folder, "config.json")
        cfg = json.load(open(path))
        edit_config(cfg)
        json.dump(cfg, open(path, "w"))
    if edit_tensors:
        path = os.path.join(folder, "model.safetensors")
        tensors = dict(load_file(path))
        edit_tensors(tensors)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    return folder


def _gz_truncated(fx: Fixtures) -> str:
    data = gzip.compress(open(fx.corpus, "rb").read())
    return fx.write("corpus.jsonl.gz", data[: len(data) // 2])


def _mc_folder(fx: Fixtures, dev: str, test: str) -> str:
    folder = fx.path("mc")
    for part, text in (("dev", dev), ("test", test)):
        os.makedirs(os.path.join(folder, part))
        with open(os.path.join(folder, part, f"subject_{part}.csv"), "w") as f:
            f.write(text)
    return folder


_CONFIG_FILES = {
    "syntax_error": ("def get_config(:\n    pass\n", "syntax"),
    "get_config_wrong_type": ("def get_config():\n    return 42\n", "get_config"),
    "get_config_raises": ("def get_config():\n    return undefined_name\n", "undefined_name"),
    "no_get_config": ("x = 1\n", "get_config"),
}

CASES: list[Case] = []
for _command in ("train", "sft", "reward", "ppo"):
    for _what, (_text, _fragment) in _CONFIG_FILES.items():
        CASES.append(Case(f"{_command}:config_{_what}", _command, _config_file(_text), _fragment))
del _command, _what, _text, _fragment

CASES += [
    # --- pretraining: config, tokenizer, corpus, workdir, disk, checkpoints
    Case("train:missing_config_file", "train", lambda fx: ["--config=nope.py"], "no such config file"),
    Case("train:unknown_key", "train", lambda fx: _train(fx, "--config.model.d_modle=8"), "d_model"),
    Case("train:bad_value", "train", lambda fx: _train(fx, "--config.model.num_layers=0"), "model.num_layers"),
    Case("train:positional_argument", "train", lambda fx: _train(fx, "extra"), "unexpected arguments"),
    Case("train:flag_of_wrong_type", "train", lambda fx: _train(fx, "--config.model.d_model=wide"), "d_model"),
    Case("train:unknown_flag", "train", lambda fx: _train(fx, "--wrokdir=x"), "wrokdir"),
    Case("train:negative_steps", "train", lambda fx: _train(fx, "--config.train.num_steps=-1"), "train.num_steps"),
    Case("train:zero_batch", "train", lambda fx: _train(fx, "--config.data.batch_size=0"), "data.batch_size"),
    Case("train:unknown_schedule", "train", lambda fx: _train(fx, "--config.optim.schedule=bogus"), "optim.schedule"),
    Case("train:unknown_rope_scaling", "train", lambda fx: _train(fx, "--config.model.rope_scaling=bogus"),
         "model.rope_scaling"),
    Case("train:unknown_data_source", "train", lambda fx: _train(fx, "--config.data.source=bogus"), "data.source"),
    Case("train:mesh_does_not_fit", "train", lambda fx: _train(fx, "--config.mesh.tensor=3"), "mesh"),
    Case("train:heads_not_divisible", "train", lambda fx: _train(fx, "--config.model.num_kv_heads=3"), "num_kv_heads"),
    Case("train:seq_len_over_max", "train", lambda fx: _train(fx, "--config.data.seq_len=4096"), "seq_len"),
    Case("train:vocab_mismatch", "train", lambda fx: _train(fx, "--config.model.vocab_size=512"), "vocab"),
    Case("train:tokenizer_not_a_model", "train",
         lambda fx: _train(fx, f"--config.tokenizer.path={fx.corpus}"), "tokenizer"),
    Case("train:tokenizer_missing", "train",
         lambda fx: _train(fx, "--config.tokenizer.path=/nonexistent/t.model"), "/nonexistent/t.model"),
    Case("train:corpus_missing", "train",
         lambda fx: _train(fx, "--config.data.path=/nonexistent/*.jsonl"), "/nonexistent"),
    Case("train:corpus_empty", "train",
         lambda fx: _train(fx, f"--config.data.path={fx.write('empty.jsonl', '')}"), "no"),
    Case("train:corpus_only_bad_lines", "train",
         lambda fx: _train(fx, f"--config.data.path={fx.write('bad.jsonl', '{oops' + chr(10) + '[1]' + chr(10))}"),
         "no"),
    Case("train:corpus_truncated_gzip", "train",
         lambda fx: _train(fx, f"--config.data.path={_gz_truncated(fx)}"), "gz"),
    Case("train:corpus_one_document", "train",
         lambda fx: _train(fx, f"--config.data.path={fx.write('one.jsonl', json.dumps({'text': 'a b c'}) + chr(10))}",
                           "--config.data.eval_fraction=0.5", "--config.train.eval_every=3"), "document"),
    Case("train:workdir_is_a_file", "train",
         lambda fx: _train(fx, workdir=fx.write("a_file", "x")), "a_file"),
    Case("train:workdir_read_only", "train", lambda fx: _train(fx, workdir=os.path.join(fx.mount("ro"), "w")),
         "Read-only"),
    Case("train:disk_full", "train", lambda fx: _train(fx, workdir=os.path.join(fx.mount("size=160k"), "w")),
         "no room for checkpoint"),
    Case("train:rerun_other_shape", "train", lambda fx: _train(fx, "--config.model.d_model=32", workdir=fx.lm),
         "model.d_model"),
    Case("train:rerun_other_data", "train",
         lambda fx: _train(fx, f"--config.data.path={fx.write('other.jsonl', open(fx.corpus).read())}",
                           workdir=fx.lm), "data.path"),
    Case("train:checkpoint_missing_items", "train",
         lambda fx: _train(fx, "--config.train.num_steps=7", workdir=_damaged(fx, "missing_params")), "warning",
         code=0),
    Case("train:checkpoint_garbage_config", "train",
         lambda fx: _train(fx, "--config.train.num_steps=7", workdir=_damaged(fx, "garbage_config")), "warning",
         code=0),
    Case("train:tfds_without_name", "train", lambda fx: _train(fx, "--config.data.source=tfds"), "tfds_name"),
    # --- sample
    Case("sample:no_prompt", "sample", lambda fx: [f"--workdir={fx.lm}"], "prompt"),
    Case("sample:bad_top_k", "sample", lambda fx: [f"--workdir={fx.lm}", "--prompt=a", "--top_k=-1"], "top_k"),
    Case("sample:zero_max_new_tokens", "sample", lambda fx: [f"--workdir={fx.lm}", "--prompt=a", "--max_new_tokens=0"],
         "max_new_tokens"),
    Case("sample:bad_repetition_penalty", "sample",
         lambda fx: [f"--workdir={fx.lm}", "--prompt=a", "--repetition_penalty=0"], "repetition_penalty"),
    Case("sample:no_workdir_flag", "sample", lambda fx: ["--prompt=a"], "workdir"),
    Case("sample:workdir_missing", "sample", lambda fx: ["--workdir=/nonexistent/w", "--prompt=a"], "/nonexistent/w"),
    Case("sample:workdir_empty", "sample", lambda fx: [f"--workdir={fx.mkdir('empty')}", "--prompt=a"], "checkpoint"),
    Case("sample:workdir_is_a_file", "sample", lambda fx: [f"--workdir={fx.corpus}", "--prompt=a"], "corpus"),
    Case("sample:bad_temperature", "sample", lambda fx: [f"--workdir={fx.lm}", "--prompt=a", "--temperature=-1"],
         "temperature"),
    Case("sample:context_too_long", "sample", lambda fx: [f"--workdir={fx.lm}", "--prompt=a", "--max_new_tokens=64"],
         "max_seq_len"),
    Case("sample:bad_top_p", "sample", lambda fx: [f"--workdir={fx.lm}", "--prompt=a", "--top_p=1.5"], "top_p"),
    Case("sample:damaged_newest_falls_back", "sample",
         lambda fx: [f"--workdir={_damaged(fx, 'missing_params')}", "--prompt=a", "--max_new_tokens=2"],
         "warning", code=0),
    Case("sample:garbage_config_falls_back", "sample",
         lambda fx: [f"--workdir={_damaged(fx, 'garbage_config')}", "--prompt=a", "--max_new_tokens=2"],
         "warning", code=0),
    Case("sample:reward_model_workdir", "sample", lambda fx: [f"--workdir={fx.rm}", "--prompt=a"], "reward", needs_rm=True),
    # --- convert
    Case("convert:no_command", "convert", lambda fx: [f"--workdir={fx.lm}", f"--out={fx.path('o')}"], "to_hf"),
    Case("convert:out_is_a_file", "convert", lambda fx: ["to_hf", f"--workdir={fx.lm}", f"--out={fx.corpus}"],
         "corpus"),
    Case("convert:out_read_only", "convert",
         lambda fx: ["to_hf", f"--workdir={fx.lm}", f"--out={os.path.join(fx.mount('ro'), 'o')}"], "Read-only"),
    Case("convert:workdir_missing", "convert", lambda fx: ["to_hf", "--workdir=/nonexistent/w", f"--out={fx.path('o')}"],
         "/nonexistent/w"),
    Case("convert:bad_architecture", "convert",
         lambda fx: ["to_hf", f"--workdir={fx.lm}", f"--out={fx.path('o')}", "--architecture=gpt2"], "gpt2"),
    Case("convert:step_missing", "convert",
         lambda fx: ["to_hf", f"--workdir={fx.lm}", f"--out={fx.path('o')}", "--step=99"], "99"),
    Case("convert:extra_argument", "convert", lambda fx: ["to_hf", "again", f"--workdir={fx.lm}", f"--out={fx.path('o')}"],
         "to_hf again"),
    Case("convert:damaged_newest_falls_back", "convert",
         lambda fx: ["to_hf", f"--workdir={_damaged(fx, 'missing_params')}", f"--out={fx.path('o')}"], "warning",
         code=0),
    Case("convert:reward_model_workdir", "convert",
         lambda fx: ["to_hf", f"--workdir={fx.rm}", f"--out={fx.path('o')}"], "reward", needs_rm=True),
    # --- evaluate: models
    Case("evaluate:hf_config_missing_keys", "evaluate",
         lambda fx: [f"--hf={_hf_copy(fx, edit_config=lambda c: c.pop('hidden_size'))}", "--task=sort", "--n=2"],
         "hidden_size"),
    Case("evaluate:hf_config_garbage", "evaluate",
         lambda fx: [f"--hf={_hf_garbage_config(fx)}", "--task=sort", "--n=2"], "JSON"),
    Case("evaluate:hf_transposed_tensor", "evaluate",
         lambda fx: [f"--hf={_hf_copy(fx, edit_tensors=_transpose_gate)}", "--task=sort", "--n=2"],
         "gate_proj.weight has shape"),
    Case("evaluate:hf_missing_weights", "evaluate",
         lambda fx: [f"--hf={_hf_without_weights(fx)}", "--task=sort", "--n=2"], "safetensors"),
    Case("evaluate:damaged_newest_falls_back", "evaluate",
         lambda fx: [f"--workdir={_damaged(fx, 'missing_params')}", "--task=ppl", f"--data={fx.corpus}", "--n=2"],
         "warning", code=0),
    Case("evaluate:hf_folder_missing", "evaluate", lambda fx: ["--hf=/nonexistent/hf", "--task=sort"],
         "--hf=/nonexistent/hf"),
    Case("evaluate:hf_unsupported_architecture", "evaluate",
         lambda fx: [f"--hf={_hf_copy(fx, edit_config=lambda c: c.update(architectures=['GPT2LMHeadModel'], model_type='gpt2'))}",
                     "--task=sort"], "architecture"),
    Case("evaluate:no_model", "evaluate", lambda fx: ["--task=sort"], "workdir"),
    Case("evaluate:passkey_bad_lengths", "evaluate", lambda fx: [f"--workdir={fx.lm}", "--task=passkey", "--lengths=long"],
         "long"),
    Case("evaluate:contamination_without_corpus", "evaluate",
         lambda fx: ["--task=contamination", f"--data={fx.mkdir('bench')}"], "corpus"),
    Case("evaluate:workdir_missing", "evaluate", lambda fx: ["--workdir=/nonexistent/w", "--task=sort"],
         "/nonexistent/w"),
    Case("evaluate:step_missing", "evaluate", lambda fx: [f"--workdir={fx.lm}", "--task=sort", "--step=99"], "99"),
    Case("evaluate:unknown_task", "evaluate", lambda fx: [f"--workdir={fx.lm}", "--task=chess"], "chess"),
    Case("evaluate:reward_model_workdir", "evaluate", lambda fx: [f"--workdir={fx.rm}", "--task=sort", "--n=2"],
         "reward", needs_rm=True),
    # --- evaluate: data
    Case("evaluate:ppl_empty_file", "evaluate",
         lambda fx: [f"--workdir={fx.lm}", "--task=ppl", f"--data={fx.write('e.jsonl', '')}"], "no document"),
    Case("evaluate:ppl_only_bad_lines", "evaluate",
         lambda fx: [f"--workdir={fx.lm}", "--task=ppl", f"--data={fx.write('b.jsonl', '{x' + chr(10) + '3' + chr(10))}"],
         "bad_json 1"),
    Case("evaluate:ppl_missing_file", "evaluate",
         lambda fx: [f"--workdir={fx.lm}", "--task=ppl", "--data=/nonexistent/*.jsonl"], "/nonexistent"),
    Case("evaluate:gen_malformed_rows", "evaluate",
         lambda fx: [f"--workdir={fx.lm}", "--task=gen", f"--data={fx.write('g.jsonl', '{oops' + chr(10))}",
                     "--shots=0"], "g.jsonl"),
    Case("evaluate:gen_empty_answers", "evaluate",
         lambda fx: [f"--workdir={fx.lm}", "--task=gen", "--shots=0",
                     f"--data={fx.write('g.jsonl', chr(10).join(json.dumps({'question': 'q', 'answer': ''}) for _ in range(3)))}"],
         "no scoreable row"),
    Case("evaluate:mc_malformed_csv", "evaluate",
         lambda fx: [f"--workdir={fx.lm}", "--task=mc", "--shots=0",
                     f"--data={_mc_folder(fx, 'q,a,b' + chr(10), 'only,two' + chr(10))}"], "subject"),
    Case("evaluate:mc_no_rows", "evaluate",
         lambda fx: [f"--workdir={fx.lm}", "--task=mc", "--shots=0", f"--data={_mc_folder(fx, '', '')}"], "no test"),
    Case("evaluate:mc_missing_folder", "evaluate",
         lambda fx: [f"--workdir={fx.lm}", "--task=mc", "--data=/nonexistent"], "/nonexistent"),
    # --- sft
    Case("sft:base_missing", "sft", lambda fx: _train(fx, "--config.sft.base=/nonexistent/b"), "/nonexistent/b"),
    Case("sft:base_unset", "sft", lambda fx: _train(fx), "sft.base"),
    Case("sft:no_usable_conversation", "sft",
         lambda fx: _train(fx, f"--config.sft.base={fx.lm}",
                           f"--config.sft.data_path={fx.write('c.jsonl', '{x' + chr(10) + json.dumps({'messages': []}) + chr(10))}"),
         "conversation"),
    Case("sft:unknown_template", "sft", lambda fx: _train(fx, f"--config.sft.base={fx.lm}", "--config.sft.template=nope"),
         "sft.template"),
    Case("sft:unknown_task", "sft", lambda fx: _train(fx, f"--config.sft.base={fx.lm}", "--config.sft.tasks=('chess',)"),
         "chess"),
    Case("sft:data_path_missing", "sft",
         lambda fx: _train(fx, f"--config.sft.base={fx.lm}", "--config.sft.data_path=/nonexistent/*.jsonl"), "/nonexistent"),
    Case("sft:base_transposed_hf_tensor", "sft",
         lambda fx: _train(fx, f"--config.sft.base={_hf_copy(fx, edit_tensors=_transpose_gate)}"),
         "gate_proj.weight has shape"),
    Case("sft:base_is_reward_model", "sft", lambda fx: _train(fx, f"--config.sft.base={fx.rm}"), "reward", needs_rm=True),
    # --- reward
    Case("reward:pairs_all_skipped", "reward",
         lambda fx: _train(fx, f"--config.reward.base={fx.lm}", "--config.data.seq_len=64",
                           f"--config.reward.data_path={_bad_pairs(fx)}"), "identical"),
    Case("reward:unknown_domain", "reward",
         lambda fx: _train(fx, f"--config.reward.base={fx.lm}", "--config.reward.domains=('kind',)"), "kind"),
    Case("reward:with_lora", "reward", lambda fx: _train(fx, f"--config.reward.base={fx.lm}", "--config.lora.rank=4"),
         "lora.rank"),
    Case("reward:base_missing", "reward", lambda fx: _train(fx, "--config.reward.base=/nonexistent/b"),
         "/nonexistent/b"),
    # --- ppo
    Case("ppo:policy_missing", "ppo",
         lambda fx: _train(fx, "--config.ppo.policy=/nonexistent/p", f"--config.ppo.reward_model={fx.lm}"),
         "/nonexistent/p"),
    Case("ppo:unknown_reward_fn", "ppo",
         lambda fx: _train(fx, f"--config.ppo.policy={fx.lm}", "--config.ppo.reward_fn=bogus"), "ppo.reward_fn"),
    Case("ppo:reward_model_missing", "ppo",
         lambda fx: _train(fx, f"--config.ppo.policy={fx.lm}", "--config.ppo.reward_model=/nonexistent/rm"),
         "/nonexistent/rm"),
    Case("ppo:reward_model_is_a_language_model", "ppo",
         lambda fx: _train(fx, f"--config.ppo.policy={fx.lm}", f"--config.ppo.reward_model={fx.lm}"),
         "not a reward model"),
    Case("ppo:policy_is_a_reward_model", "ppo",
         lambda fx: _train(fx, f"--config.ppo.policy={fx.rm}", f"--config.ppo.reward_model={fx.rm}"), "reward", needs_rm=True),
    # --- curate
    Case("curate:input_missing", "curate",
         lambda fx: ["--input=/nonexistent/*.jsonl", f"--output={fx.path('c')}", _STAGES], "/nonexistent"),
    Case("curate:output_is_a_file", "curate", lambda fx: [f"--input={fx.corpus}", f"--output={fx.corpus}", _STAGES],
         "corpus"),
    Case("curate:input_only_bad_lines", "curate",
         lambda fx: [f"--input={fx.write('b.jsonl', '{x' + chr(10))}", f"--output={fx.path('c')}", _STAGES], "bad_json",
         lines=2),
    Case("curate:perplexity_model_missing", "curate",
         lambda fx: [f"--input={fx.corpus}", f"--output={fx.path('c')}", "--config.perplexity.workdir=/nonexistent/w"],
         "/nonexistent/w"),
    Case("curate:unknown_stage", "curate",
         lambda fx: [f"--input={fx.corpus}", f"--output={fx.path('c')}", "--config.stages=normalize,shine"], "shine"),
    Case("curate:unknown_runner", "curate",
         lambda fx: [f"--input={fx.corpus}", f"--output={fx.path('c')}", "--config.runner=spark"], "runner"),
    Case("curate:beam_options_unbalanced_quote", "curate",
         lambda fx: [f"--input={fx.corpus}", f"--output={fx.path('c')}", "--config.runner=beam",
                     "--config.beam_options=--runner='DirectRunner"], "beam_options"),
    # --- graph (the shortest-path walks)
    Case("graph:no_out", "graph", lambda fx: [], "--out"),
    Case("graph:too_few_nodes", "graph", lambda fx: [f"--out={fx.path('walks.jsonl')}", "--nodes=2"], "n_nodes"),
    Case("graph:out_is_a_folder", "graph", lambda fx: [f"--out={fx.mkdir('walks')}", "--n=10"], "walks"),
    # sweeps: a broken sweep file, a trial with a bad key, a folder that holds no sweep
    Case("sweep:missing_sweep_file", "sweep", lambda fx: [f"--config={fx.cfg}", "--sweep=nope.py",
                                                         f"--workdir={fx.path('sw')}"], "no such sweep file"),
    Case("sweep:no_get_sweep", "sweep", lambda fx: [f"--config={fx.cfg}", f"--sweep={fx.write('s.py', 'x = 1')}",
                                                   f"--workdir={fx.path('sw')}"], "get_sweep"),
    Case("sweep:not_a_list", "sweep", lambda fx: [f"--config={fx.cfg}", f"--workdir={fx.path('sw')}",
                                                 f"--sweep={fx.write('s.py', 'def get_sweep():  return 3')}"],
         "list of override dicts"),
    Case("sweep:trial_of_wrong_type", "sweep",
         lambda fx: [f"--config={fx.cfg}", f"--workdir={fx.path('sw')}", "--sweep=" + fx.write(
             "s.py", "def get_sweep():\n    return [{'model.d_model': 32}, {'model.d_model': 'wide'}]")],
         "trial 1 (d_model=wide)"),
    Case("sweep:report_of_no_sweep", "sweep", lambda fx: [f"--report={fx.mkdir('empty')}"], "holds no sweep"),
    Case("sweep:trial_without_a_sweep", "sweep", lambda fx: [f"--workdir={fx.lm}", "--trial=0"], "holds no sweep"),
    Case("sweep:file_raises", "sweep", lambda fx: [f"--config={fx.cfg}", f"--workdir={fx.path('sw')}",
                                                  f"--sweep={fx.write('s.py', 'def get_sweep():  return 1 / 0')}"],
         "ZeroDivisionError"),
]


_STAGES = "--config.stages=normalize,exact"


def _transpose_gate(tensors: dict) -> None:
    for key in [k for k in tensors if k.endswith("gate_proj.weight")]:
        tensors[key] = tensors[key].T  # [D, F] where [F, D] belongs: the same element count


def _hf_garbage_config(fx: Fixtures) -> str:
    folder = _hf_copy(fx)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{not json")
    return folder


def _hf_without_weights(fx: Fixtures) -> str:
    folder = _hf_copy(fx)
    os.remove(os.path.join(folder, "model.safetensors"))
    return folder


def _bad_pairs(fx: Fixtures) -> str:
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 10 + [{"prompt": "p", "chosen": "c"}] * 3
    return fx.write("pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")


# ---------------------------------------------------------------------------------------------- running


def run_case(case: Case, fx: Fixtures, timeout: float = 600) -> dict:
    """Run one case; returns what the checks look at (and the probe prints)."""
    before = _digest(os.path.join(fx.lm, "checkpoints"))
    argv = [sys.executable, "-m", f"maxlm.{case.command}", *case.args(fx)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.time()
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        code, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as e:
        code, stderr = "hang", (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {"name": case.name, "code": code, "lines": lines, "seconds": time.time() - start,
            "traceback": "Traceback" in stderr, "lm_intact": _digest(os.path.join(fx.lm, "checkpoints")) == before}


def check(case: Case, r: dict) -> list[str]:
    """What is wrong with result `r` of `case` (empty: it passes)."""
    problems = []
    if r["code"] != case.code:
        problems.append(f"exit {r['code']}, expected {case.code}")
    if r["traceback"]:
        problems.append("a traceback")
    errors = [line for line in r["lines"] if line.startswith(("error:", "warning:"))]
    if case.code != 0 and len(r["lines"]) != case.lines:
        problems.append(f"{len(r['lines'])} stderr lines")
    if not any(case.expect.lower() in line.lower() for line in errors):
        problems.append(f"no line mentions {case.expect!r}")
    if not r["lm_intact"]:
        problems.append("the trained workdir's checkpoints changed")
    return problems


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad_inputs"))
    yield Fixtures(root)
    subprocess.run(f"grep ' {root}' /proc/mounts | cut -d' ' -f2 | xargs -r umount", shell=True)


# One case per command and input class runs by default (~5 s each: a process start and jax import); the rest
# are marked slow (`pytest -m slow tests/test_bad_inputs.py`, or the whole table with `python -m`).
FAST = {"train:config_syntax_error", "train:vocab_mismatch", "train:corpus_truncated_gzip", "train:workdir_is_a_file",
        "train:disk_full", "train:rerun_other_shape", "train:checkpoint_missing_items", "sample:garbage_config_falls_back",
        "convert:out_is_a_file", "evaluate:hf_transposed_tensor", "evaluate:ppl_only_bad_lines",
        "evaluate:gen_empty_answers", "sft:no_usable_conversation", "reward:pairs_all_skipped",
        "ppo:reward_model_is_a_language_model", "curate:input_only_bad_lines", "graph:too_few_nodes",
        "sweep:trial_of_wrong_type"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[] if c.name in FAST else [pytest.mark.slow])
                                  for c in CASES])
def test_bad_input(case: Case, fx: Fixtures, request):
    if case.needs_rm:
        fx.rm = request.getfixturevalue("reward_run")[0]
    r = run_case(case, fx)
    assert not check(case, r), (check(case, r), r["lines"][-5:])


def main() -> None:
    """Run every case and print the table (the probe's report)."""
    only = sys.argv[1:]
    root = tempfile.mkdtemp(prefix="bad_inputs_")
    fx = Fixtures(root, reward_workdir=os.environ.get("REWARD_WORKDIR"))
    failures = 0
    print("| case | exit | stderr (last line) | verdict |\n|---|---|---|---|")
    for case in CASES:
        if only and not any(o in case.name for o in only):
            continue
        if case.needs_rm and not fx.rm:
            continue
        try:
            r = run_case(case, fx)
        except BaseException as e:  # noqa: BLE001  (a skip: no tmpfs here)
            print(f"| {case.name} | - | {type(e).__name__}: {e} | skipped |", flush=True)
            continue
        problems = check(case, r)
        failures += bool(problems)
        last = (r["lines"][-1] if r["lines"] else "").replace("|", "/")[:160]
        print(f"| {case.name} | {r['code']} | {last} | {'; '.join(problems) or 'ok'} |", flush=True)
    subprocess.run(f"grep ' {root}' /proc/mounts | cut -d' ' -f2 | xargs -r umount", shell=True)
    print(f"{failures} failing", file=sys.stderr)


if __name__ == "__main__":
    main()
