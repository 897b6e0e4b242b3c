#!/usr/bin/env bash
# PPO on a task with a known optimum: experiments/rl_shortest_path.sh WORKDIR ppo (see there), kept under its
# first name. Prints, as its last line, one JSON object with fraction_of_optimal (after PPO),
# fraction_of_optimal_before, reward_mean_last, kl, iterations and ppo_seconds.
#
#   bash experiments/ppo_shortest_path.sh WORKDIR
set -euo pipefail
W=${1:?usage: bash experiments/ppo_shortest_path.sh WORKDIR}
exec bash "$(dirname "$0")/rl_shortest_path.sh" "$W" ppo
