"""`python -m maxlm.evaluate`: maxlm/evaluation/harness.py under its old name (the command line and the module).

Importing `maxlm.evaluate` gives that module itself, so every name it has stays importable from here.
"""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("maxlm.evaluation.harness", run_name="__main__", alter_sys=True)
else:
    from maxlm.evaluation import harness

    sys.modules[__name__] = harness
