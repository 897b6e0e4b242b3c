"""Compatibility path: `maxlm.data.dedup` is maxlm/curation/dedup.py (imported as that very module)."""

import sys

from maxlm.curation import dedup

sys.modules[__name__] = dedup
