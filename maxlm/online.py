"""`python -m maxlm.online`: maxlm/posttrain/online.py under a short name (the command line and the module).

Importing `maxlm.online` gives that module itself, so every name it has stays importable from here.
"""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("maxlm.posttrain.online", run_name="__main__", alter_sys=True)
else:
    from maxlm.posttrain import online

    sys.modules[__name__] = online
