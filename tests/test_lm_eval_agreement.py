"""Issue 22's acceptance check, run by experiments/lm_eval_agreement.py: lm-evaluation-harness's HF model on
maxlm's export (as written, no model args) and its `--model maxlm` on the workdir agree with
`python -m maxlm.evaluate` item by item -- every choice's log-likelihood within 1e-3, acc / acc_norm /
acc_bytes equal, letter and text choices -- and on bits per byte; for a tokenizer without bos (Qwen's)
all three agree on bits per byte too. For a tokenizer that adds bos, lm_eval 0.4's HF `loglikelihood_rolling`
puts bos twice (it also scores log p(bos | bos)): the test checks that this, and nothing else, is the
difference. Slow (a few lm_eval runs on the CPU); skipped where lm_eval is not installed (CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_lm_eval_and_maxlm_agree(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[lm_eval_hf]')")
    pytest.importorskip("accelerate", reason="lm_eval's HF model needs accelerate (pip install -e '.[lm_eval_hf]')")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "lm_eval_agreement.py"),
                           f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {r["pair"]: r for r in figures["rows"]}
    for pair in ("sp: maxlm.evaluate vs lm_eval lm_eval_maxlm", "nobos: maxlm.evaluate vs lm_eval hf",
                 "nobos: maxlm.evaluate vs lm_eval lm_eval_maxlm"):
        assert rows[pair]["agrees"], rows[pair]
    # generations: equal strings for the byte-level tokenizer; for SentencePiece equal greedy tokens (decoded by
    # the export's AutoTokenizer), as sentencepiece and tokenizers render invalid UTF-8 byte runs differently
    assert rows["nobos: maxlm.evaluate vs lm_eval hf"]["gen_equal"] == [6, 6]
    hf = rows["sp: maxlm.evaluate vs lm_eval hf"]
    assert hf["mc_letter_max_ll_diff"] <= 1e-3 and hf["mc_text_max_ll_diff"] <= 1e-3
    assert all(hf[f"{t}_{m}"][0] == hf[f"{t}_{m}"][1] for t in ("mc_letter", "mc_text")
               for m in ("acc", "acc_norm", "acc_bytes"))
    assert hf["bpb"][1] > hf["bpb"][0]  # the extra log p(bos | bos) term costs bits
    assert figures["double_bos_max_ll_diff"] <= 1e-3  # ... and explains the whole difference
    assert figures["sp_gen_equal_with_hf_decoding"][0] == figures["sp_gen_equal_with_hf_decoding"][1]
