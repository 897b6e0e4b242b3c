"""`python -m maxlm.aot`: will a config fit a TPU slice? (maxlm/training/aot.py; needs the `tpu` extra).

The compile is for devices this host does not have, so JAX itself runs on the CPU: `JAX_PLATFORMS=cpu` unless
the caller set it.
"""

import os
import sys

if __name__ == "__main__":
    import runpy

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    runpy.run_module("maxlm.training.aot", run_name="__main__", alter_sys=True)
else:
    from maxlm.training import aot

    sys.modules[__name__] = aot
