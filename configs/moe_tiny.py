"""configs/tiny.py as a mixture of experts (Mixtral-style, `maxlm/model/moe.py`): every layer's MLP replaced by
4 SwiGLU experts of width 128, top-2 routed and renormalised, so a token uses as many MLP parameters as the
dense tiny model's (2 x 128 = 256) while the model holds twice as many. Dropless (grouped matmuls) by
default; `--config.model.moe_impl=capacity` for GShard's fixed-capacity dispatch. CPU, minutes.
"""

import os

from maxlm.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
    m = c.model
    m.num_experts = 4
    m.experts_per_token = 2
    m.expert_mlp_dim = 128
    m.router_renormalize = True
    m.router_aux_coef = 0.01
    m.router_z_coef = 0.001
    return c
