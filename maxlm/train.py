"""`python -m maxlm.train`: maxlm/training/pretrain.py under its old name (the command line and the module).

Importing `maxlm.train` gives that module itself, so every name it has stays importable from here.
"""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("maxlm.training.pretrain", run_name="__main__", alter_sys=True)
else:
    from maxlm.training import pretrain

    sys.modules[__name__] = pretrain
