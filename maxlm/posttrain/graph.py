"""Shortest paths in a small random directed graph: an RL task whose optimal policy is known exactly.

    python -m maxlm.graph --out=data/walks.jsonl --n=20000 --seed=0 --nodes=21 --graph_seed=0 --max_len=10

The idea is trlX's "randomwalks" benchmark (CarperAI/trlx, examples/randomwalks): a language model is
pretrained on random walks through a fixed graph, written as node letters ("d k f a"), so it learns which
moves are legal but not which are good. PPO (`python -m maxlm.ppo --config.ppo.reward_fn=shortest_path`)
then prompts it with a start node and rewards walks that reach the goal in few steps. Because BFS gives the
true distances, the reward of the optimal policy is known (1.0 per start), so a PPO run reads directly as
"fraction of optimal" -- a check of the whole RL stack (sampling, KL penalty, GAE, clipping) that needs no
reward model and no human judgement.

Nodes are the ints 0..n-1, written as the letters a, b, c, ...; the goal is node 0 ("a") by default. A walk
ends when it reaches the goal, so the goal has no out-edges here. Pretraining documents are one walk each;
the packer frames every document as [bos] + tokens + [eos], so the model learns to stop (emit eos) once it
has written the goal, and a PPO prompt is [bos] + the start letter, exactly how a document begins.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import string
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from maxlm import cli
from maxlm import tokenizer as tokenizer_lib
from maxlm.model import sampler as sample
from maxlm.posttrain import environments

NODE_NAMES = string.ascii_lowercase
MAX_ATTEMPTS = 10_000  # random graphs drawn before make_graph gives up
GENERATE_BATCH = 64
SAMPLES_PER_START = 16


@dataclasses.dataclass(frozen=True)
class Graph:
    """A directed graph: `edges[i]` are the out-neighbours of node i (sorted); walks end at `goal`."""

    edges: tuple[tuple[int, ...], ...]
    goal: int

    @property
    def n(self) -> int:
        return len(self.edges)


def make_graph(n_nodes: int = 21, edge_prob: float = 0.15, seed: int = 0, goal: int = 0) -> Graph:
    """A random directed graph without self-loops (each edge present with `edge_prob`), deterministic in
    `seed`. Graphs are re-drawn (attempt k uses a seed derived from (seed, k)) until every node can reach
    the goal and some node is at distance >= 3, so that the shortest path is not trivial. The goal gets no
    out-edges: a walk stops there."""
    if not 4 <= n_nodes <= len(NODE_NAMES):
        raise ValueError(f"n_nodes must be in [4, {len(NODE_NAMES)}] (one letter per node, a distance of 3 "
                         f"needs 4 nodes), got {n_nodes}")
    if not 0 < edge_prob <= 1:
        raise ValueError(f"edge_prob must be in (0, 1], got {edge_prob}")
    if not 0 <= goal < n_nodes:
        raise ValueError(f"goal must be in [0, {n_nodes}), got {goal}")
    for attempt in range(MAX_ATTEMPTS):
        rng = random.Random(f"maxlm.graph:{seed}:{attempt}")
        edges = tuple(() if i == goal else tuple(j for j in range(n_nodes) if j != i and rng.random() < edge_prob)
                      for i in range(n_nodes))
        graph = Graph(edges, goal)
        dist = distances(graph)
        if min(dist) >= 0 and max(dist) >= 3:
            return graph
    raise ValueError(f"no graph with n_nodes={n_nodes}, edge_prob={edge_prob} in {MAX_ATTEMPTS} draws has every "
                     "node reaching the goal and a node at distance >= 3; change edge_prob")


def _predecessors(graph: Graph) -> list[list[int]]:
    preds: list[list[int]] = [[] for _ in range(graph.n)]
    for i, outs in enumerate(graph.edges):
        for j in outs:
            preds[j].append(i)
    return preds


def distances(graph: Graph) -> list[int]:
    """Shortest number of edges from each node to the goal (BFS over reversed edges); 0 at the goal, -1 for
    nodes that cannot reach it."""
    dist = [-1] * graph.n
    dist[graph.goal] = 0
    preds = _predecessors(graph)
    queue = collections.deque([graph.goal])
    while queue:
        j = queue.popleft()
        for i in preds[j]:
            if dist[i] < 0:
                dist[i] = dist[j] + 1
                queue.append(i)
    return dist


def optimal_walk(graph: Graph, start: int) -> list[int]:
    """A shortest walk [start, ..., goal] (at each step the smallest-numbered neighbour one step closer)."""
    dist = distances(graph)
    if dist[start] < 0:
        raise ValueError(f"node {NODE_NAMES[start]} cannot reach the goal {NODE_NAMES[graph.goal]}")
    walk = [start]
    while walk[-1] != graph.goal:
        walk.append(next(j for j in graph.edges[walk[-1]] if dist[j] == dist[walk[-1]] - 1))
    return walk


def random_walk(graph: Graph, start: int, rng: random.Random, max_len: int) -> list[int]:
    """Uniformly random out-edges from `start` until the goal is reached or the walk has `max_len` nodes
    (or reaches a node without out-edges)."""
    walk = [start]
    while walk[-1] != graph.goal and len(walk) < max_len and graph.edges[walk[-1]]:
        walk.append(rng.choice(graph.edges[walk[-1]]))
    return walk


def walk_text(nodes: Sequence[int]) -> str:
    """Node letters separated by single spaces: [3, 10, 0] -> "d k a"."""
    return " ".join(NODE_NAMES[i] for i in nodes)


def parse_walk(text: str) -> list[int] | None:
    """The inverse of `walk_text` (surrounding whitespace ignored; "" -> []); None if any whitespace-separated
    token is not a single node letter."""
    nodes = []
    for token in text.split():
        if len(token) != 1 or token not in NODE_NAMES:
            return None
        nodes.append(NODE_NAMES.index(token))
    return nodes


def score(graph: Graph, start: int, response_text: str, max_len: int) -> float:
    """The reward of a response that continues the walk after `start`: the full walk is [start] + the parsed
    response.

    The walk is valid iff the text parses (letters of existing nodes separated by whitespace), every step is
    an edge of the graph, it reaches the goal, the goal appears only as its last node, and it has at most
    `max_len` nodes. A valid walk scores distance(start) / (its number of edges): 1.0 for a shortest walk,
    less for a detour, never more. Anything invalid scores 0.0.
    """
    if start == graph.goal:
        raise ValueError("the start node is the goal: there is nothing to walk")
    parsed = parse_walk(response_text)
    if parsed is None or any(i >= graph.n for i in parsed):
        return 0.0
    walk = [start] + parsed
    if len(walk) > max_len or walk[-1] != graph.goal or graph.goal in walk[:-1]:
        return 0.0
    if any(b not in graph.edges[a] for a, b in zip(walk, walk[1:])):
        return 0.0
    return distances(graph)[start] / (len(walk) - 1)


def write_walks(path: str, graph: Graph, n: int, seed: int, max_len: int) -> None:
    """`n` pretraining documents, one jsonl line `{"text": "d k a"}` each (`text` is what `data.source =
    "jsonl"` reads by default): random walks from uniformly random non-goal starts, keeping only walks that
    reach the goal within `max_len` nodes."""
    starts = [i for i in range(graph.n) if i != graph.goal]
    if not any(d > 0 and d < max_len for d in distances(graph)):
        raise ValueError(f"no node reaches the goal within max_len={max_len} nodes")
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n:
            walk = random_walk(graph, rng.choice(starts), rng, max_len)
            if walk[-1] == graph.goal:
                f.write(json.dumps({"text": walk_text(walk)}) + "\n")
                written += 1


def graph_from_config(config: ml_collections.ConfigDict) -> Graph:
    return make_graph(config.ppo.graph_nodes, seed=config.ppo.graph_seed)


@environments.register("shortest_path")
class Environment:
    """The shortest-path task for `maxlm.ppo` (the interface of `maxlm.environments`).

    Items are start nodes (ints). The policy sees [bos] + the start letter, as a pretraining walk begins
    (no chat template); the reward is `score` of the decoded response, whose stop token is eos.
    """

    def __init__(self, config: ml_collections.ConfigDict, tok: Any):
        self.config, self.tok = config, tok
        self.graph = graph_from_config(config)
        self.max_len = config.ppo.max_new_tokens + 1
        self.stop_id = tok.eos_id
        dist = distances(self.graph)
        self.train_items = [i for i in range(self.graph.n) if dist[i] > 0]
        self.eval_items = list(self.train_items)

    def prompt(self, item: int) -> environments.Prompt:
        ids = tokenizer_lib.text_prefix(self.tok) + self.tok.encode(NODE_NAMES[item])
        return environments.Prompt(ids, ids, item)

    def sample_prompts(self, iteration: int, n: int, salt: int = 0) -> list[Any]:
        rng = np.random.default_rng(environments.seed_sequence(self.config.train.seed, iteration, salt=salt))
        return [self.prompt(self.train_items[i]) for i in rng.choice(len(self.train_items), n, replace=True)]

    def response_text(self, response: Sequence[int]) -> str:
        """The decoded response, cut before the first stop token (the rollouts keep it)."""
        ids = list(response)
        if self.stop_id in ids:
            ids = ids[:ids.index(self.stop_id)]
        return self.tok.decode(ids)

    def reward(self, prompt: Any, response: Sequence[int]) -> float:
        return score(self.graph, prompt.item, self.response_text(response), self.max_len)

    def true_score(self, prompt: Any, response: Sequence[int]) -> float:
        return self.reward(prompt, response)

    def held_out_score(self, config: ml_collections.ConfigDict, actor: dict) -> float:
        """The policy's mean reward as a fraction of the optimal policy's (1.0): `SAMPLES_PER_START` walks
        sampled at `ppo.temperature` from every start (a fixed seed, so evaluations are comparable). Sampled,
        not greedy: the policy is the distribution, and the argmax of a walker pretrained on random walks is
        already close to optimal from most starts while its samples are not."""
        prompts = [self.prompt(i) for i in self.eval_items for _ in range(SAMPLES_PER_START)]
        scores = []
        for lo in range(0, len(prompts), GENERATE_BATCH):
            chunk = prompts[lo:lo + GENERATE_BATCH]
            outs = sample.generate(config, actor, [p.policy_ids for p in chunk],
                                   max_new_tokens=config.ppo.max_new_tokens, rng=jax.random.key(lo),
                                   temperature=config.ppo.temperature, eos_id=self.stop_id, pad_id=self.tok.pad_id)
            scores += [self.reward(p, o) for p, o in zip(chunk, outs)]
        return float(np.mean(scores))


def _define_flags() -> None:
    flags.DEFINE_string("out", "", "Where to write the walks (jsonl, one {\"text\": ...} per line).")
    flags.DEFINE_integer("n", 20000, "Number of walks.")
    flags.DEFINE_integer("seed", 0, "Seed of the walks.")
    flags.DEFINE_integer("nodes", 21, "Nodes in the graph (config.ppo.graph_nodes).")
    flags.DEFINE_integer("graph_seed", 0, "Seed of the graph (config.ppo.graph_seed).")
    flags.DEFINE_integer("max_len", 10, "Longest walk kept, in nodes (start and goal included).")


def main(argv: list[str]) -> None:
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.out:
        raise ValueError("--out is required")
    graph = make_graph(FLAGS.nodes, seed=FLAGS.graph_seed)
    write_walks(FLAGS.out, graph, FLAGS.n, FLAGS.seed, FLAGS.max_len)
    dist = [d for d in distances(graph) if d > 0]
    print(f"wrote {FLAGS.n} walks to {FLAGS.out}; graph of {graph.n} nodes, {sum(map(len, graph.edges))} edges, "
          f"diameter to the goal {max(dist)}, mean optimal distance {np.mean(dist):.3f}", flush=True)


if __name__ == "__main__":
    _define_flags()
    cli.run(main, user_errors=(ValueError,))
