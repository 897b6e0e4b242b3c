"""Ring attention on 4 forced CPU devices against the plain-jnp reference on the whole sequence.

    python tests/ring_check.py

For each case (token order, sliding window) prints one `RESULT` line: the largest differences of the output
and of dq / dk / dv from `kernels.reference.mha_reference` (GQA, two packed documents per row and padding),
and whether the compiled program passes blocks with collective-permutes. Run as a
subprocess by tests/test_ring.py, because the device count is fixed before jax starts.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from kernels import reference  # noqa: E402
from maxlm.model import ring_attention  # noqa: E402

B, T, N, K, H, DEVICES = 2, 32, 4, 2, 8, 4


def _inputs():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    v = rng.normal(size=(B, T, K, H)).astype(np.float32)
    seg = np.ones((B, T), np.int32)
    seg[:, 13:] = 2
    seg[1, 27:] = 0  # padding at the end of row 1
    dout = rng.normal(size=(B, T, N, H)).astype(np.float32)
    return q, k, v, seg, dout


def main() -> None:
    mesh = jax.make_mesh((DEVICES,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, seg, dout = _inputs()
    for zigzag in (True, False):
        for window in (0, 6):
            order = ring_attention.zigzag_permutation(T, DEVICES) if zigzag else np.arange(T)

            def ref_loss(q, k, v):
                out = reference.mha_reference(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                                              window=window)
                return jnp.sum(out * dout), out

            def ring_loss(q, k, v):
                body = lambda q, k, v, qs, ks: ring_attention.ring_attention(
                    q, k, v, qs, ks, "sequence", DEVICES, zigzag, True, H ** -0.5, window)
                spec, seg_spec = P(None, "sequence"), P(None, "sequence")
                out = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec),
                                    out_specs=spec, check_vma=False)(q[:, order], k[:, order], v[:, order],
                                                                     seg[:, order], seg[:, order])
                out = out[:, np.argsort(order)]
                return jnp.sum(out * dout), out

            (_, want), want_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
            placed = [jax.device_put(x, NamedSharding(mesh, P())) for x in (q, k, v)]
            fn = jax.jit(jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True))
            (_, got), got_grads = fn(*placed)
            hlo = fn.lower(*placed).compile().as_text()
            diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip((want, *want_grads), (got, *got_grads))]
            ring = "collective-permute" in hlo
            print(f"RESULT zigzag={zigzag} window={window} out={diffs[0]:.2e} dq={diffs[1]:.2e} "
                  f"dk={diffs[2]:.2e} dv={diffs[3]:.2e} permutes={ring}", flush=True)


if __name__ == "__main__":
    main()
