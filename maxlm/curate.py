"""`python -m maxlm.curate`: maxlm/curation/pipeline.py under its old name (the command line and the module).

Importing `maxlm.curate` gives that module itself, so every name it has stays importable from here.
"""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("maxlm.curation.pipeline", run_name="__main__", alter_sys=True)
else:
    from maxlm.curation import pipeline

    sys.modules[__name__] = pipeline
