"""`python -m maxlm.reward`: maxlm/posttrain/reward.py under its old name (the command line and the module).

Importing `maxlm.reward` gives that module itself, so every name it has stays importable from here.
"""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("maxlm.posttrain.reward", run_name="__main__", alter_sys=True)
else:
    from maxlm.posttrain import reward

    sys.modules[__name__] = reward
