"""Peak host memory of loading a Hugging Face checkpoint: maxlm's lazy `from_hf` against transformers.

Writes a randomly initialised checkpoint of a real model's shape (default: Llama 3.2 1B -- 16 layers, width
2048, 32 query / 8 kv heads, MLP 8192, vocabulary 128256, tied embeddings: 1.24B parameters) as sharded bf16
safetensors with an index, then loads it in fresh processes and reads each one's peak resident set size:

* `maxlm float32 host`: `from_hf(folder)`, numpy float32 parameters (the model in float32 is the floor);
* `maxlm bf16 sharded`: `from_hf(folder, dtype=bfloat16, shardings=...)` onto 8 CPU devices, FSDP-style
  (every leaf split over its largest divisible axis); CPU devices live in host memory, so the floor is the
  model in bf16, and what the host holds beyond it is the loader's own transient (one leaf at a time);
* `transformers bf16`: `AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)` (the peer; needs
  torch and transformers, the test extras), every weight then read once, since transformers may leave them
  memory-mapped from the files (resident only once touched).

    python experiments/load_hf_memory.py [--shape=1b|tiny] [--dir=/tmp/hf_1b] [--keep]

Prints a table, and last one JSON line: {"shape", "params", "files", "rows": [{"loader", "peak_gb", "start_gb",
"model_gb", "over_model_gb", "seconds"}]}: peak RSS, RSS once the framework has started, the bytes of the
loaded parameters, and peak - start - model (what loading held beyond the model itself). `--shape=tiny` runs the whole script in seconds (what the test does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, head_dim=16, tie_word_embeddings=True),
}


def _hf_tensors(cfg: dict):
    """(name, HF shape) of every tensor of a Llama checkpoint with config `cfg`."""
    d, f, h = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], d)
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        yield pre + "self_attn.q_proj.weight", (n * h, d)
        yield pre + "self_attn.k_proj.weight", (k * h, d)
        yield pre + "self_attn.v_proj.weight", (k * h, d)
        yield pre + "self_attn.o_proj.weight", (d, n * h)
        yield pre + "mlp.gate_proj.weight", (f, d)
        yield pre + "mlp.up_proj.weight", (f, d)
        yield pre + "mlp.down_proj.weight", (d, f)
        yield pre + "input_layernorm.weight", (d,)
        yield pre + "post_attention_layernorm.weight", (d,)
    yield "model.norm.weight", (d,)


def write(folder: str, shape: str) -> int:
    """A random bf16 Llama checkpoint in `folder`, sharded at 1 GB (tiny: 20 kB); returns its parameter count."""
    import numpy as np

    from maxlm.interop import hf

    cfg = {**SHAPES[shape], "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    rng = np.random.default_rng(0)
    shapes = dict(_hf_tensors(cfg))

    def tensors():
        for name, s in shapes.items():
            x = np.ones(s, np.float32) if name.endswith("norm.weight") else rng.standard_normal(s, np.float32) * 0.02
            yield name, x.astype(np.dtype("bfloat16"))

    hf._write_safetensors(tensors(), folder, 10**9 if shape == "1b" else 20_000)
    return sum(int(np.prod(s)) for s in shapes.values())


def _fsdp(config):
    """Each leaf split over the 8 devices along its largest axis that 8 divides (replicated if none)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from maxlm.model import decoder

    mesh = Mesh(np.array(jax.devices()), ("fsdp",))

    def spec(x):
        axes = [a for a in np.argsort(x.shape)[::-1] if x.shape[a] % len(jax.devices()) == 0]
        names = [None] * len(x.shape)
        if axes:
            names[axes[0]] = "fsdp"
        return NamedSharding(mesh, PartitionSpec(*names))

    return jax.tree_util.tree_map(spec, decoder.abstract_params(config))


def load(folder: str, loader: str) -> None:
    """Load `folder` with `loader` in this process; print one JSON line with the peak RSS and resident bytes."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if loader == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after importing torch
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        with torch.no_grad():  # weights may still be memory-mapped from the files: read every one once
            for p in model.parameters():
                p.sum()
        held = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        import jax
        import numpy as np

        from maxlm.interop import hf

        jax.devices()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after jax's start-up
        t0 = time.perf_counter()
        if loader == "sharded":
            _, params = hf.from_hf(folder, dtype=np.dtype("bfloat16"), shardings=_fsdp)
            shards = {d: 0 for d in jax.devices()}
            for x in jax.tree_util.tree_leaves(params):
                for s in x.addressable_shards:
                    shards[s.device] += s.data.nbytes
            held = sum(shards.values())
            assert max(shards.values()) < 0.2 * held, shards  # each device holds about an eighth
        else:
            _, params = hf.from_hf(folder)
            held = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "start": before, "held": held, "seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--dir", default="")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    p.add_argument("--load", default="", help=argparse.SUPPRESS)  # internal: one loader in this process
    p.add_argument("--write", action="store_true", help=argparse.SUPPRESS)  # internal: write the checkpoint
    args = p.parse_args()
    if args.load:
        load(args.dir, args.load)
        return
    if args.write:
        print(write(args.dir, args.shape))
        return
    folder = args.dir or f"/tmp/maxlm_hf_{args.shape}"
    t0 = time.perf_counter()
    # Every step in its own process: a child inherits its parent's peak RSS, so this one stays small.
    out = subprocess.run([sys.executable, __file__, "--dir", folder, "--shape", args.shape, "--write"],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"writing the checkpoint failed:\n{out.stderr[-3000:]}")
    n_params = int(out.stdout.split()[-1])
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    print(f"wrote {n_params / 1e9:.3f}B parameters as {len(files)} bf16 safetensors files in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    rows = []
    loaders = [("maxlm float32 host", "host"), ("maxlm bf16 sharded", "sharded")]
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        loaders.append(("transformers bf16", "transformers"))
    except ImportError:
        print("transformers / torch not installed: the peer row is skipped", flush=True)
    print(f"{'loader':22s} {'peak RSS GB':>12s} {'start GB':>9s} {'model GB':>9s} {'over model':>11s} {'s':>6s}")
    for name, loader in loaders:
        out = subprocess.run([sys.executable, __file__, "--dir", folder, "--load", loader], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{loader} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        over = r["peak"] - r["start"] - r["held"]
        rows.append({"loader": name, "peak_gb": round(r["peak"] / 1e9, 3), "start_gb": round(r["start"] / 1e9, 3),
                     "model_gb": round(r["held"] / 1e9, 3), "over_model_gb": round(over / 1e9, 3),
                     "seconds": round(r["seconds"], 1)})
        print(f"{name:22s} {r['peak'] / 1e9:12.2f} {r['start'] / 1e9:9.2f} {r['held'] / 1e9:9.2f} "
              f"{over / 1e9:11.2f} {r['seconds']:6.1f}", flush=True)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"shape": args.shape, "params": n_params, "files": len(files), "rows": rows}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
