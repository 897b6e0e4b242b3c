"""`python -m maxlm.graph`: maxlm/posttrain/graph.py under its old name (the command line and the module).

Importing `maxlm.graph` gives that module itself, so every name it has stays importable from here.
"""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("maxlm.posttrain.graph", run_name="__main__", alter_sys=True)
else:
    from maxlm.posttrain import graph

    sys.modules[__name__] = graph
