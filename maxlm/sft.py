"""`python -m maxlm.sft`: maxlm/posttrain/sft.py under its old name (the command line and the module).

Importing `maxlm.sft` gives that module itself, so every name it has stays importable from here.
"""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("maxlm.posttrain.sft", run_name="__main__", alter_sys=True)
else:
    from maxlm.posttrain import sft

    sys.modules[__name__] = sft
