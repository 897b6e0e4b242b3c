"""maxlm: a JAX/Flax reference codebase for the language-model life cycle (data -> pretrain -> SFT -> RLHF -> eval).

Entry points: `python -m maxlm.train`, `python -m maxlm.sample`; library API: `maxlm.model.apply`,
`maxlm.convert.from_hf` / `to_hf`. See README.md.
"""
