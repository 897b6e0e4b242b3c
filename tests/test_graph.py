"""The shortest-path task (maxlm/posttrain/graph.py): a hand-made graph with known answers, random graphs checked
against an independent Floyd-Warshall, walks, the pretraining data, and the PPO environment."""

import json
import random
import subprocess
import sys

import pytest

from maxlm.config import default_config
from maxlm.data.sources import JsonlSource
from maxlm.posttrain import graph

A, B, C, D, E = range(5)
# a is the goal. b -> a directly; c and e are two steps away (via b); d is three steps away, by two routes
# (d c b a, d e b a). The goal's own out-edge must not matter.
SMALL = graph.Graph(edges=((C,), (A, C), (B, D), (C, E), (B, D)), goal=A)
SMALL_DIST = [0, 1, 2, 3, 2]
INF = float("inf")


def floyd_warshall(edges, n):
    d = [[0 if i == j else INF for j in range(n)] for i in range(n)]
    for i, outs in enumerate(edges):
        for j in outs:
            d[i][j] = min(d[i][j], 1)
    for k in range(n):
        for i in range(n):
            for j in range(n):
                if d[i][k] + d[k][j] < d[i][j]:
                    d[i][j] = d[i][k] + d[k][j]
    return d


def is_edge_walk(g, walk):
    return all(b in g.edges[a] for a, b in zip(walk, walk[1:]))


# ----------------------------------------------------------------------------------------------------------
# The hand-made graph


def test_small_graph_distances_and_optimal_walks():
    assert SMALL.n == 5
    assert graph.distances(SMALL) == SMALL_DIST
    for start in (B, C, D, E):
        walk = graph.optimal_walk(SMALL, start)
        assert walk[0] == start and walk[-1] == A and A not in walk[:-1]
        assert len(walk) - 1 == SMALL_DIST[start]
        assert is_edge_walk(SMALL, walk)
    assert graph.optimal_walk(SMALL, C) == [C, B, A]
    assert graph.optimal_walk(SMALL, D) in ([D, C, B, A], [D, E, B, A])


def test_unreachable_node_has_distance_minus_one():
    g = graph.Graph(edges=((), (0,), (1,), ()), goal=0)  # node 3 has no way out
    assert graph.distances(g) == [0, 1, 2, -1]
    with pytest.raises(ValueError):
        graph.optimal_walk(g, 3)


@pytest.mark.parametrize("start,response,max_len,expected", [
    (D, "c b a", 10, 1.0),  # optimal
    (D, "e b a", 10, 1.0),  # the other optimal route
    (B, "a", 10, 1.0),
    (D, "  c b a\n", 10, 1.0),  # surrounding whitespace is fine
    (D, "e d c b a", 10, 3 / 5),  # a valid detour: 5 edges instead of 3
    (C, "d c b a", 10, 2 / 4),
    (D, "e d e d c b a", 8, 3 / 7),  # 8 nodes, exactly the limit
    (D, "e d e d c b a", 7, 0.0),  # too long
    (D, "b a", 10, 0.0),  # d -> b is not an edge
    (E, "c b a", 10, 0.0),  # e -> c is not an edge
    (D, "c b", 10, 0.0),  # does not reach the goal
    (D, "", 10, 0.0),  # nothing
    (D, "c b a c b a", 10, 0.0),  # passes through the goal before the end (a -> c is an edge)
    (D, "c,b,a", 10, 0.0),  # garbage
    (D, "cb a", 10, 0.0),
    (D, "C B A", 10, 0.0),
    (D, "c b a.", 10, 0.0),
    (D, "c b z", 10, 0.0),  # not a node of this graph
    (D, "the answer is a", 10, 0.0),
])
def test_small_graph_score(start, response, max_len, expected):
    assert graph.score(SMALL, start, response, max_len) == pytest.approx(expected)


def test_walk_text_round_trip():
    assert graph.walk_text([D, C, B, A]) == "d c b a"
    assert graph.parse_walk("d c b a") == [3, 2, 1, 0]
    assert graph.parse_walk(" z  a ") == [25, 0]
    assert graph.parse_walk("") == [] and graph.parse_walk("  \n") == []
    for bad in ("ab", "a1", "A", "a, b", "é"):
        assert graph.parse_walk(bad) is None
    assert graph.NODE_NAMES == "abcdefghijklmnopqrstuvwxyz"


# ----------------------------------------------------------------------------------------------------------
# Random graphs and walks


@pytest.mark.parametrize("n_nodes,seed", [(21, 0), (21, 1), (21, 7), (8, 0), (26, 3)])
def test_make_graph(n_nodes, seed):
    g = graph.make_graph(n_nodes, seed=seed)
    assert g == graph.make_graph(n_nodes, seed=seed)  # deterministic
    assert g.n == n_nodes and g.goal == 0
    for i, outs in enumerate(g.edges):
        assert i not in outs  # no self-loops
        assert list(outs) == sorted(set(outs)) and all(0 <= j < n_nodes for j in outs)
    fw = floyd_warshall(g.edges, n_nodes)
    expected = [0 if i == g.goal else fw[i][g.goal] for i in range(n_nodes)]
    assert all(d < INF for d in expected)  # every node reaches the goal
    assert max(expected) >= 3
    assert graph.distances(g) == expected


def test_make_graph_seeds_differ_and_limits():
    assert graph.make_graph(seed=0) != graph.make_graph(seed=1)
    for n in (27, 30, 3):
        with pytest.raises(ValueError):
            graph.make_graph(n)


def test_random_walks_follow_edges_and_end_at_goal():
    g = graph.make_graph(21, seed=0)
    rng = random.Random(0)
    reached = 0
    for _ in range(300):
        start = rng.randrange(1, g.n)
        walk = graph.random_walk(g, start, rng, max_len=12)
        assert walk[0] == start and 1 <= len(walk) <= 12
        assert is_edge_walk(g, walk)
        assert g.goal not in walk[:-1]
        if walk[-1] == g.goal:
            reached += 1
        else:
            assert len(walk) == 12  # only the length limit stops a walk short of the goal
    assert reached > 0
    walk = graph.random_walk(SMALL, B, random.Random(1), max_len=50)
    assert walk[-1] == A and is_edge_walk(SMALL, walk)


def test_write_walks(tmp_path):
    g = graph.make_graph(21, seed=0)
    path = tmp_path / "walks.jsonl"
    graph.write_walks(str(path), g, 300, seed=5, max_len=10)
    lines = path.read_text().splitlines()
    assert len(lines) == 300
    fw = floyd_warshall(g.edges, g.n)
    starts = set()
    for line in lines:
        text = json.loads(line)["text"]
        walk = [ord(ch) - ord("a") for ch in text.split(" ")]
        assert text == " ".join(chr(ord("a") + i) for i in walk)
        assert walk[0] != g.goal and walk[-1] == g.goal and g.goal not in walk[:-1]
        assert 2 <= len(walk) <= 10 and len(walk) - 1 >= fw[walk[0]][g.goal]
        assert is_edge_walk(g, walk)
        starts.add(walk[0])
    assert len(starts) > g.n // 2
    # the jsonl source the pretraining stage reads sees the same documents
    source = JsonlSource(str(path))
    assert len(source) == 300 and source.get(0) == json.loads(lines[0])["text"]
    again = tmp_path / "again.jsonl"
    graph.write_walks(str(again), g, 300, seed=5, max_len=10)
    assert again.read_text() == path.read_text()


def test_cli(tmp_path):
    out = tmp_path / "w.jsonl"
    proc = subprocess.run([sys.executable, "-m", "maxlm.graph", f"--out={out}", "--n=40", "--nodes=12",
                           "--graph_seed=2", "--max_len=8"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == 40
    assert "40 walks" in proc.stdout and "diameter" in proc.stdout


# ----------------------------------------------------------------------------------------------------------
# The PPO environment


class FakeTokenizer:
    """One id per letter; decode shows control tokens, so a reward that forgot to cut at eos would fail."""

    pad_id, bos_id, eos_id = 0, 1, 2
    OFFSET = 3

    def encode(self, text):
        return [ord(ch) - ord("a") + self.OFFSET for ch in text if ch != " "]

    def decode(self, ids):
        names = {0: "<pad>", 1: "<s>", 2: "</s>"}
        return " ".join(names.get(i, chr(ord("a") + i - self.OFFSET)) for i in ids)


def _config(nodes=12, seed=3):
    config = default_config()
    with config.unlocked():
        config.ppo.graph_nodes = nodes
        config.ppo.graph_seed = seed
        config.ppo.reward_fn = "shortest_path"
        config.ppo.max_new_tokens = 10
    return config


def test_environment():
    config, tok = _config(), FakeTokenizer()
    env = graph.Environment(config, tok)
    g = graph.make_graph(12, seed=3)
    fw = floyd_warshall(g.edges, g.n)
    assert env.stop_id == tok.eos_id
    assert env.train_items == env.eval_items == list(range(1, 12))
    for start in env.eval_items:
        pr = env.prompt(start)
        assert pr.policy_ids == [tok.bos_id, start + tok.OFFSET] and pr.reward_ids == pr.policy_ids
        assert pr.item == start
        walk = graph.optimal_walk(g, start)
        assert len(walk) - 1 == fw[start][0]
        response = [i + tok.OFFSET for i in walk[1:]] + [tok.eos_id]  # rollouts keep the stop token
        assert env.true_score(pr, response) == 1.0
        assert env.reward(pr, response) == 1.0
        assert env.reward(pr, response[:-1]) == 1.0  # cut by max_new_tokens exactly at the goal
        assert env.reward(pr, response[:-2] + [tok.eos_id]) == 0.0  # stops before the goal
        assert env.reward(pr, [tok.eos_id]) == 0.0
    batch = env.sample_prompts(1, 64)  # more prompts than starts: drawn with replacement
    assert len(batch) == 64 and {p.item for p in batch} <= set(env.train_items)
    assert [p.item for p in batch] == [p.item for p in env.sample_prompts(1, 64)]
    assert [p.item for p in batch] != [p.item for p in env.sample_prompts(2, 64)]


def test_environment_walk_limit():
    """A response may hold up to max_new_tokens nodes (the walk: max_new_tokens + 1 with the start)."""
    tok = FakeTokenizer()
    g = graph.make_graph(12, seed=3)
    dist = graph.distances(g)
    start = max(range(1, g.n), key=lambda i: dist[i])
    response = [i + tok.OFFSET for i in graph.optimal_walk(g, start)[1:]] + [tok.eos_id]
    for max_new, expected in ((dist[start], 1.0), (dist[start] - 1, 0.0)):
        config = _config()
        config.ppo.max_new_tokens = max_new
        env = graph.Environment(config, tok)
        assert env.reward(env.prompt(start), response) == expected
