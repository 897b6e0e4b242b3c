"""`python -m maxlm.grpo`: maxlm/posttrain/grpo.py under a short name (the command line and the module).

Importing `maxlm.grpo` gives that module itself, so every name it has stays importable from here.
"""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("maxlm.posttrain.grpo", run_name="__main__", alter_sys=True)
else:
    from maxlm.posttrain import grpo

    sys.modules[__name__] = grpo
