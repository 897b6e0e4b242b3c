"""The SFT demonstration end to end (slow: ~50 minutes on 2 cores): the tiny base, then full and LoRA
fine-tuning on the task suite, with the issue's acceptance bars checked on the script's JSON line."""

import json
import subprocess

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_sft_demo_meets_the_bars(tmp_path):
    done = subprocess.run(["bash", "experiments/sft_demo.sh", str(tmp_path / "demo")], cwd=ROOT,
                          capture_output=True, text=True, timeout=5400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    before, after, lora = result["accuracy_before"], result["accuracy_after"], result["accuracy_after_lora"]
    assert set(after) == {"format", "reverse", "sort", "add"}
    assert all(v < 0.05 for v in before.values()), before
    easiest = max(after, key=after.get)
    assert after[easiest] >= 0.9, after
    assert lora[easiest] >= after[easiest] - 0.10, (lora, after)
    assert result["lora_opt_state_fraction"] < 0.05
    assert result["sft_seconds"] <= 15 * 60
