"""Orbax checkpoints of the training state, the data iterator's position and the config.

One step directory holds four items: `params`, `opt_state` (array pytrees, written asynchronously while
training continues), `meta` (JSON: step, the feed's position, and which stage wrote it: its name, the
parameter tree's layout (`maxlm.trees`) and where the policy sits in it) and `config` (JSON). Parameters are their
own item so that inference (`maxlm.sample`) and conversion restore them without the optimizer state.
Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint is visible
only once whole; a run killed mid-save leaves only a temporary directory, which is never listed. A
complete-looking checkpoint that still fails to restore (a truncated file, a disk error) is moved aside as
`<step>.damaged` (`.damaged.2`, ... when that name is taken) with a warning naming it, and the next older one
is tried. A readable checkpoint of another run -- another stage, other config keys that make a run
(`maxlm.training.workdir.check_resume`), parameters or optimizer state of other shapes -- is not damage:
restoring refuses with one line and leaves every checkpoint in place. Restoring onto an abstract
target (ShapeDtypeStructs carrying shardings) creates every array directly with its sharding on the
current mesh, which is also what reshards a checkpoint written under another mesh.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from maxlm import config as config_lib
from maxlm.errors import ConfigError, UserError, WorkdirError
from maxlm.model import trees

ITEMS = ("params", "opt_state", "meta", "config")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """A thin owner of an Orbax `CheckpointManager` with maxlm's item layout."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, stage: str = "", layout: Any = None,
                 policy: str | None = ""):
        ck = config.checkpoint
        options = ocp.CheckpointManagerOptions(max_to_keep=ck.max_to_keep, keep_period=ck.keep_period or None,
                                               create=True, enable_async_checkpointing=ck.async_save)
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.config = config
        self.stage = {"stage": stage, "layout": layout, "policy": policy} if stage else {}
        self._pending_bytes = 0  # bytes of a save that may still be being written (async)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, data_state: dict) -> None:
        """Start an (asynchronous) save; returns as soon as the arrays are copied off the step's buffers.

        A disk without room for the arrays refuses the save up front (WorkdirError, one line) instead of
        failing half-way in Orbax's writer threads: the checkpoints already saved stay as they are.
        """
        need = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))
        in_progress = getattr(self.manager, "is_saving_in_progress", lambda: True)()
        pending = self._pending_bytes if in_progress else 0
        free = shutil.disk_usage(self.directory).free
        if free < need + pending + (1 << 20):
            self.manager.wait_until_finished()  # the save already under way completes before the error exits
            raise WorkdirError(f"no room for checkpoint {step} in {self.directory}: it needs ~{_mib(need + pending)}, "
                               f"{_mib(free)} is free; the checkpoints already saved are intact (free space and "
                               "rerun to resume)")
        self._pending_bytes = need
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({"step": int(step), "data": data_state, **self.stage}),
            config=ocp.args.JsonSave(self.config.to_dict()),
        ))

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore(),
        ))
        return out["params"], out["opt_state"], out["meta"]

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any,
                       check: Callable[[int, ml_collections.ConfigDict, dict], None] | None = None
                       ) -> tuple[Any, Any, dict] | None:
        """The newest checkpoint that restores, or None. Before its arrays are read, `check(step, saved config,
        meta)` may refuse it (by raising), and arrays of other shapes than the targets' raise WorkdirError;
        only checkpoints that cannot be read are moved aside (with a warning) for the next older one."""
        self.manager.wait_until_finished()
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                info = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                                          meta=ocp.args.JsonRestore()))
                saved = config_lib.from_dict(info["config"])
                params_shapes = saved_shapes(os.path.join(self.directory, str(step), "params"))
                opt_shapes = saved_shapes(os.path.join(self.directory, str(step), "opt_state"))
            except ConfigError as e:
                raise WorkdirError(f"checkpoint {os.path.join(self.directory, str(step))} has a config this "
                                   f"version of maxlm does not know ({e}); was it written by a newer one?") from None
            except Exception as e:  # noqa: BLE001 -- any failure to read means this checkpoint is unusable
                self._set_aside(step, e)
                continue
            if check is not None:
                check(step, saved, info["meta"])
            mismatch = shape_mismatch(params_shapes, abstract_params)
            if mismatch:
                raise WorkdirError(f"{os.path.dirname(self.directory)} holds a run whose parameters have other "
                                   f"shapes ({mismatch}); use a new workdir")
            if sorted(opt_shapes.values()) != sorted(_shapes(abstract_opt_state).values()):
                raise WorkdirError(f"{os.path.dirname(self.directory)} holds a run whose optimizer state has "
                                   f"another structure ({len(opt_shapes)} arrays, {len(_shapes(abstract_opt_state))} "
                                   "expected: optim.grad_clip or LoRA settings changed?); use a new workdir")
            try:
                return self.restore(step, abstract_params, abstract_opt_state)
            except Exception as e:  # noqa: BLE001 -- readable metadata, unreadable arrays: damaged
                self._set_aside(step, e)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        path = os.path.join(self.directory, str(step))
        message = f"checkpoint {path} is damaged and is skipped ({type(error).__name__}: {str(error)[:200]})"
        if jax.process_index() != 0:
            logging.warning(message)
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)
            if os.path.isdir(path):
                target, n = f"{path}.damaged", 1
                while os.path.exists(target):  # an earlier set-aside of this step keeps its name
                    n += 1
                    target = f"{path}.damaged.{n}"
                os.replace(path, target)
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{key path: shape} of a tree's array leaves (arrays, ShapeDtypeStructs or Orbax array metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def saved_shapes(item_dir: str) -> dict[str, tuple[int, ...]]:
    """{key path: shape} of a checkpoint item's arrays, from its metadata (no array is read)."""
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
    return _shapes(getattr(metadata, "tree", metadata))


def shape_mismatch(saved: dict[str, tuple[int, ...]], target: Any) -> str:
    """"" when `saved` ({path: shape}) has exactly the target tree's arrays and shapes; else the first
    differences, as one readable phrase."""
    want = _shapes(target)
    diffs = [f"{k} {saved[k]} saved, {want[k]} here" for k in sorted(saved.keys() & want.keys()) if saved[k] != want[k]]
    diffs += [f"{k} only saved" for k in sorted(saved.keys() - want.keys())]
    diffs += [f"{k} missing" for k in sorted(want.keys() - saved.keys())]
    return "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint step in `workdir`, or None (no checkpoint, or no workdir)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    step = manager.latest_step()
    manager.close()
    return step


def stage_of(meta: dict, config: ml_collections.ConfigDict) -> dict:
    """{"stage", "layout", "policy"} of a checkpoint's meta; checkpoints written before stages were
    recorded are language models (LoRA adapters when the config has a LoRA rank)."""
    if "layout" in meta:
        return {k: meta[k] for k in ("stage", "layout", "policy")}
    return {"stage": "", "layout": "lora" if config.lora.rank else "lm", "policy": ""}


def load_latest(workdir: str, step: int | None = None, abstract: Callable[[ml_collections.ConfigDict], Any] | None = None,
                with_meta: bool = False, check: Callable[[dict], None] | None = None) -> tuple:
    """(config, params, step) of the newest (or the given) checkpoint in `workdir`, params on one device,
    restored in the layout the checkpoint records (`abstract(config)` overrides it) -- a LoRA run's are
    its adapters (`maxlm.pretrained.load_workdir` merges them into the base). With `with_meta`, also the
    checkpoint's meta, completed by `stage_of`.

    Without a step, a newest checkpoint that cannot be read is skipped with a warning for the next older one,
    as a resumed run does -- but left in place: reading a workdir never changes it. Raises FileNotFoundError
    with a readable message when there is nothing to load. `check(meta)` may refuse the run before its arrays
    are read (a UserError: a reward model where a policy is wanted, say), which no older checkpoint changes.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints under {directory}")
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    try:
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint under {directory}")
        for i, candidate in enumerate(steps):
            try:
                out = _load(manager, candidate, abstract, check)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 -- any failure to read makes this checkpoint unusable
                if i + 1 == len(steps):
                    if step is not None:
                        raise
                    raise FileNotFoundError(f"no checkpoint under {directory} can be read (the oldest, step "
                                            f"{candidate}: {type(e).__name__}: {str(e)[:200]})") from None
                message = (f"checkpoint {os.path.join(directory, str(candidate))} cannot be read ({type(e).__name__}: "
                           f"{str(e)[:200]}); using step {steps[i + 1]}")
                print(f"warning: {message}", file=sys.stderr, flush=True)
                continue
            config, params, meta = out
            return (config, params, candidate, meta) if with_meta else (config, params, candidate)
    finally:
        manager.close()


def _load(manager: ocp.CheckpointManager, step: int, abstract: Callable[[ml_collections.ConfigDict], Any] | None,
          check: Callable[[dict], None] | None = None) -> tuple[ml_collections.ConfigDict, Any, dict]:
    items = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    config = config_lib.from_dict(items["config"])
    meta = {**items["meta"], **stage_of(items["meta"], config)}
    if check is not None:
        check(meta)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = abstract(config) if abstract is not None else trees.abstract(config, meta["layout"])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), target)
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    return config, params, meta
