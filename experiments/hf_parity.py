"""The logit-parity table of maxlm's Hugging Face conversion, family by family, against transformers.

For every variant of `tests/test_convert.py` (Llama 2 / 3, Qwen2 / 2.5, Qwen3, Mistral, Gemma 3, ...): a small
random transformers model (O(1)-scale weights, float32) is saved, read with `maxlm.convert.from_hf` and run by
`maxlm.model.apply` ("import": max |logit difference| against the transformers model), then written with
`maxlm.convert.to_hf` and loaded by `AutoModelForCausalLM` ("export": the reloaded model against maxlm).
Needs torch and transformers (the test extras).

    python experiments/hf_parity.py

Prints a table, and last one JSON line: {"tolerance", "rows": [{"variant", "class", "import", "export"}]}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import transformers

    from maxlm.interop.hf import from_hf, to_hf
    from maxlm.model import decoder
    from tests.helpers import HF_TOL, HF_VOCAB, build_hf, hf_logits
    from tests.test_convert import VARIANTS

    tokens = np.random.default_rng(0).integers(0, HF_VOCAB, (2, 17)).astype(np.int32)
    rows = []
    print(f"{'variant':18s} {'transformers class':22s} {'import':>10s} {'export':>10s}")
    for name, (class_name, kwargs) in sorted(VARIANTS.items()):
        with tempfile.TemporaryDirectory() as tmp:
            reference = build_hf(class_name, **kwargs)
            reference.save_pretrained(os.path.join(tmp, "src"))
            config, params = from_hf(os.path.join(tmp, "src"))
            ours = np.asarray(decoder.apply(config, params, tokens), np.float64)
            imported = float(np.abs(ours - hf_logits(reference, tokens)).max())
            to_hf(config, params, os.path.join(tmp, "out"))
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.join(tmp, "out"), attn_implementation="eager").eval()
            exported = float(np.abs(ours - hf_logits(reloaded, tokens)).max())
        rows.append({"variant": name, "class": class_name, "import": imported, "export": exported})
        print(f"{name:18s} {class_name:22s} {imported:10.2e} {exported:10.2e}", flush=True)
    worst = max(max(r["import"], r["export"]) for r in rows)
    print(f"worst {worst:.2e} (tolerance {HF_TOL:g})")
    print(json.dumps({"tolerance": HF_TOL, "worst": worst, "rows": rows}))


if __name__ == "__main__":
    main()
