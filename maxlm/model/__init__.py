"""The model: the decoder (functional init / apply), attention and rotary embeddings, LoRA, the
value head, the parameter-tree registry, the KV-cache sampler and log-likelihood scoring.

`maxlm.model.init`, `apply`, ... are the decoder's (maxlm/model/decoder.py), re-exported here."""

from maxlm.model.decoder import *  # noqa: F401,F403
