"""The README's example sweep: the tiny model's peak learning rate against its width (a 2 x 2 grid).

    python -m maxlm.sweep --config=configs/tiny.py --sweep=experiments/sweeps/tiny_lr_width.py \
        --workdir=runs/sweep --parallel=2 --config.train.num_steps=200
"""

from maxlm.sweep import product


def get_sweep():
    return product({"optim.peak_lr": [1e-3, 3e-3]}, {"model.d_model": [64, 128]})
