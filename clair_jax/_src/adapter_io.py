r"""LoRA adapters on disk and in memory: PEFT directories and state dicts, Flax NNX state.

**PEFT** (PyTorch) adapter directory: ``adapter_model.safetensors`` and
``adapter_config.json``. A module ``<name>`` (its path in the base model, e.g.
``model.layers.0.self_attn.q_proj``) holds

* a linear layer: ``base_model.model.<name>.lora_A.weight`` ``A (r, in)`` and
  ``...lora_B.weight`` ``B (out, r)``;
* an embedding: ``base_model.model.<name>.lora_embedding_A`` ``A (r, num_embeddings)`` and
  ``...lora_embedding_B`` ``B (embedding_dim, r)``.

Both read as one *factored update* ``Delta_k = scaling * B A`` of shape ``(out, in)``
(``in = num_embeddings``, ``out = embedding_dim`` for an embedding), the orientation CLAIR
shares on the ``out`` side. The scaling is PEFT's

.. math::
  \text{scaling} = \frac{\alpha}{r}\quad\text{or}\quad \frac{\alpha}{\sqrt r}
  \ \ (\texttt{use\_rslora}),

with ``r`` and ``alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` when a pattern
key matches the module name as PEFT matches it (``re.match(rf"(.*\.)?({key})$", name)``,
first match in the dict's order, PEFT's ``get_pattern_key``), else ``r`` / ``lora_alpha``.
The rank read from the tensors must agree with the config's. The weight-layout delta (what
merging adds to the base weight) is ``Delta`` for a linear layer, ``Delta^T`` with
``fan_in_fan_out`` (GPT-2's ``Conv1D`` stores ``(in, out)``) and ``Delta^T``
``(num_embeddings, embedding_dim)`` for an embedding; ``fan_in_fan_out`` does not change the
factors' layout, only the merged delta's (:func:`dense_delta`).

**Flax NNX**: ``nnx.LoRA`` / ``nnx.LoRALinear`` hold ``lora_a (in, r)`` and
``lora_b (r, out)`` and compute ``x @ lora_a @ lora_b`` (no scaling), so the kernel delta
is ``lora_a @ lora_b`` ``(in, out)`` and, in PEFT terms, ``A = lora_a^T``,
``B = lora_b^T`` with scaling 1. The module name is the state's path to the node holding
``lora_a`` and ``lora_b`` (``layers.0.lora``; integer keys of ``nnx.List`` written as
digits and read back as ints).

Tensors are NumPy arrays in the file's dtype (float32, float16, bfloat16 through
``ml_dtypes``, float64). Refused, by name: pickled ``adapter_model.bin`` (say how to convert
it), ``peft_type`` other than ``LORA``, LoRA variants whose saved tensors are not plain
factors (DoRA, QALoRA, LoRA bias, aLoRA, ...), and tensors that are not LoRA factors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes  # registers bfloat16 with NumPy, for safetensors
import numpy as np

PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAME = "adapter_model.bin"

# (suffix of A, suffix of B, kind)
_SUFFIXES = ((".lora_A.weight", ".lora_B.weight", "linear"),
             (".lora_embedding_A", ".lora_embedding_B", "embedding"))
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
                 np.dtype(ml_dtypes.bfloat16))

# LoraConfig fields that, when set, make the saved tensors something else than plain LoRA
# factors ``B A * scaling`` (or change how they act on the model).
_VARIANTS = {
    "use_dora": "DoRA (use_dora: a magnitude vector per module rescales W + B A)",
    "use_qalora": "QALoRA (use_qalora)",
    "lora_bias": "LoRA with a bias on lora_B (lora_bias)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens: activated LoRA)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora: block-diagonal factors)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "modules_to_save": "modules_to_save (full copies of modules saved beside the factors)",
}
# PEFT's defaults for the fields the scaling reads.
DEFAULT_R = 8
DEFAULT_ALPHA = 8


class Adapter(NamedTuple):
  """A LoRA adapter in PEFT form.

  Attributes:
    tensors: PEFT-keyed ``{key: array}`` (``base_model.model.<name>.lora_A.weight``, ...).
    config: the ``adapter_config.json`` dict, or ``None`` (scaling 1 for every module).
    source: the directory it was read from, or ``None``.
  """

  tensors: dict
  config: dict | None = None
  source: str | None = None


class LoraModule(NamedTuple):
  """One adapted module: ``Delta = scaling * lora_b @ lora_a``, shape ``(out, in)``.

  Attributes:
    name: the module's path in the base model (the key without prefix and suffix).
    kind: ``"linear"`` or ``"embedding"``.
    a_key, b_key: the PEFT keys of the factors.
    lora_a: ``(r, in)``.
    lora_b: ``(out, r)``.
    scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rslora; 1 without a config).
  """

  name: str
  kind: str
  a_key: str
  b_key: str
  lora_a: np.ndarray
  lora_b: np.ndarray
  scaling: float

  @property
  def rank(self) -> int:
    return int(self.lora_a.shape[0])

  @property
  def shape(self) -> tuple[int, int]:
    """``(out, in)`` of the update ``B A``."""
    return (int(self.lora_b.shape[0]), int(self.lora_a.shape[1]))


def _who(client) -> str:
  return "" if client is None else f"client {client!r}: "


# --------------------------------------------------------------------------- PEFT files


def read_peft(path, *, client=None) -> Adapter:
  """Reads a PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``).

  Args:
    path: the directory.
    client: a name for error messages.

  Returns:
    :class:`Adapter` with NumPy tensors in the file's dtypes.

  Raises:
    ValueError: a missing directory or file, a pickled ``adapter_model.bin`` only (with how
      to convert it), an unreadable config, or an adapter that is not plain LoRA
      (:func:`check_lora`).
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"{_who(client)}{path!r} is not a directory (expected a PEFT adapter "
                     f"directory with {WEIGHTS_NAME} and {CONFIG_NAME}).")
  weights = os.path.join(path, WEIGHTS_NAME)
  if not os.path.isfile(weights):
    if os.path.isfile(os.path.join(path, PICKLE_NAME)):
      raise ValueError(
          f"{_who(client)}{path!r} holds a pickled {PICKLE_NAME}, which needs torch to read "
          f"(and unpickling runs code); convert it once where torch is installed: "
          f"`import torch, safetensors.torch; sd = torch.load('{PICKLE_NAME}', "
          f"map_location='cpu', weights_only=True); safetensors.torch.save_file(sd, "
          f"'{WEIGHTS_NAME}', metadata={{'format': 'pt'}})` (or load it with PEFT and "
          f"`model.save_pretrained(dir, safe_serialization=True)`).")
    raise ValueError(f"{_who(client)}{path!r} has no {WEIGHTS_NAME}.")
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise ValueError(f"{_who(client)}{path!r} has no {CONFIG_NAME} (it sets the LoRA "
                     f"scaling lora_alpha / r).")
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{_who(client)}cannot read {config_path!r}: {e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"{_who(client)}{config_path!r} is not a JSON object.")
  try:
    tensors = dict(safetensors.numpy.load_file(weights))
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f"{_who(client)}cannot read {weights!r}: {e}") from e
  adapter = Adapter(tensors, config, path)
  check_lora(adapter, client=client)
  return adapter


def write_peft(path, adapter: Adapter) -> None:
  """Writes ``adapter`` as a PEFT directory (creates ``path``; overwrites the two files).

  Tensors are written in their dtypes (contiguous, little-endian) with PEFT's
  ``{"format": "pt"}`` metadata; the config as JSON (keys sorted).
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = {k: np.ascontiguousarray(v) for k, v in adapter.tensors.items()}
  safetensors.numpy.save_file(tensors, os.path.join(path, WEIGHTS_NAME),
                              metadata={"format": "pt"})
  with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump(adapter.config or {}, f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")


def file_sha256(path) -> str:
  """Hex SHA-256 of a file (read in 1 MiB chunks)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def as_adapter(value, *, client=None) -> Adapter:
  """An :class:`Adapter` from a PEFT directory path, an :class:`Adapter`, a
  ``(state_dict, config)`` pair or a PEFT-keyed state dict (then scaling 1).

  Arrays may be NumPy or JAX; they are converted to NumPy.
  """
  if isinstance(value, (str, os.PathLike)):
    return read_peft(value, client=client)
  if isinstance(value, Adapter):
    tensors, config, source = value
  elif isinstance(value, tuple) and len(value) == 2:
    (tensors, config), source = value, None
  elif isinstance(value, Mapping):
    tensors, config, source = value, None, None
  else:
    raise ValueError(f"{_who(client)}expected a PEFT directory path, an Adapter, a "
                     f"(state_dict, config) pair or a state dict; got {type(value).__name__}.")
  if not isinstance(tensors, Mapping):
    raise ValueError(f"{_who(client)}the state dict must be a mapping of key -> array; got "
                     f"{type(tensors).__name__}.")
  if config is not None and not isinstance(config, Mapping):
    raise ValueError(f"{_who(client)}the config must be a dict or None; got "
                     f"{type(config).__name__}.")
  adapter = Adapter({k: np.asarray(v) for k, v in tensors.items()},
                    None if config is None else dict(config), source)
  check_lora(adapter, client=client)
  return adapter


# --------------------------------------------------------------------------- LoRA checks


def check_lora(adapter: Adapter, *, client=None) -> None:
  """Refuses, by name, what is not a plain LoRA adapter.

  Raises:
    ValueError: ``peft_type`` other than ``LORA``, a LoRA variant set in the config
      (``use_dora``, ...; see ``_VARIANTS``), ``bias`` other than ``"none"``, or a tensor
      key that is not a LoRA factor (DoRA's ``lora_magnitude_vector`` named as such).
  """
  config = adapter.config or {}
  peft_type = config.get("peft_type", "LORA")
  if str(peft_type).upper() != "LORA":
    raise ValueError(f"{_who(client)}peft_type {peft_type!r} is not supported; only LoRA "
                     f"adapters (peft_type 'LORA') can be aggregated.")
  for field, what in _VARIANTS.items():
    if config.get(field):
      raise ValueError(f"{_who(client)}{what} is not supported: only plain LoRA factors "
                       f"(update = scaling * B A) can be aggregated.")
  if config.get("bias", "none") not in ("none", None):
    raise ValueError(f"{_who(client)}bias={config['bias']!r} saves bias terms beside the "
                     f"factors; only bias='none' is supported.")
  for key in adapter.tensors:
    if "lora_magnitude_vector" in key:
      raise ValueError(f"{_who(client)}key {key!r} is a DoRA magnitude vector; DoRA "
                       f"(use_dora) is not supported.")
    if _split_key(key) is None:
      hint = (" It looks like a whole model.state_dict(); save the adapter with PEFT's "
              "save_pretrained (or get_peft_model_state_dict), which drops the adapter name "
              "and the base weights." if ".lora_" in key else "")
      raise ValueError(f"{_who(client)}key {key!r} is not a LoRA factor (expected keys "
                       f"ending in .lora_A.weight / .lora_B.weight or .lora_embedding_A / "
                       f".lora_embedding_B).{hint}")


def _split_key(key: str):
  """``(module name, "A" | "B", kind)`` of a PEFT factor key, or ``None``."""
  for a_suffix, b_suffix, kind in _SUFFIXES:
    for side, suffix in (("A", a_suffix), ("B", b_suffix)):
      if key.endswith(suffix) and len(key) > len(suffix):
        name = key[:-len(suffix)]
        return name.removeprefix(PEFT_PREFIX), side, kind
  return None


def pattern_value(patterns: Mapping | None, name: str, default):
  r"""PEFT's per-module override: the value of the first key ``p`` of ``patterns`` with
  ``re.match(rf"(.*\.)?({p})$", name)``, else ``default`` (``get_pattern_key``)."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def module_scaling(config: Mapping | None, name: str, rank: int, *, client=None) -> float:
  """``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) for module ``name``.

  Args:
    config: adapter config (``None``: scaling 1).
    name: module name (without ``base_model.model.``).
    rank: the rank read from the tensors.
    client: a name for error messages.

  Raises:
    ValueError: the config's rank for the module (``rank_pattern`` or ``r``) is not the
      tensors' rank.
  """
  if config is None:
    return 1.0
  r = pattern_value(config.get("rank_pattern"), name, config.get("r", DEFAULT_R))
  if int(r) != rank:
    raise ValueError(f"{_who(client)}module {name!r}: the config gives r={r} (r / "
                     f"rank_pattern) but the tensors have rank {rank}.")
  alpha = float(pattern_value(config.get("alpha_pattern"), name,
                              config.get("lora_alpha", DEFAULT_ALPHA)))
  return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def lora_modules(adapter: Adapter, *, client=None) -> dict[str, LoraModule]:
  """Pairs the factors of every module and reads its scaling.

  Returns:
    ``{name: LoraModule}`` in the order of the tensors' keys.

  Raises:
    ValueError: a factor without its partner, non-2-D or non-float factors, ranks of ``A``
      and ``B`` that differ, or a config rank that is not the tensors' (naming the key).
  """
  parts: dict[str, dict] = {}
  for key in adapter.tensors:
    split = _split_key(key)
    if split is None:
      raise ValueError(f"{_who(client)}key {key!r} is not a LoRA factor.")
    name, side, kind = split
    entry = parts.setdefault(name, {"kind": kind})
    if entry["kind"] != kind:
      raise ValueError(f"{_who(client)}module {name!r} mixes linear and embedding factors "
                       f"(key {key!r}).")
    entry[side] = key
  modules = {}
  for name, entry in parts.items():
    for side in ("A", "B"):
      if side not in entry:
        present = entry["A" if side == "B" else "B"]
        raise ValueError(f"{_who(client)}key {present!r} has no matching lora_{side} "
                         f"factor.")
    a, b = adapter.tensors[entry["A"]], adapter.tensors[entry["B"]]
    for key, x in ((entry["A"], a), (entry["B"], b)):
      if x.ndim != 2:
        raise ValueError(f"{_who(client)}key {key!r} must be 2-D; got shape {x.shape}.")
      if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{_who(client)}key {key!r} has dtype {x.dtype}; expected float16, "
                         f"bfloat16, float32 or float64.")
    if a.shape[0] != b.shape[1]:
      raise ValueError(f"{_who(client)}ranks differ: key {entry['A']!r} has shape "
                       f"{a.shape} (r, in) and key {entry['B']!r} has shape {b.shape} "
                       f"(out, r).")
    scaling = module_scaling(adapter.config, name, int(a.shape[0]), client=client)
    modules[name] = LoraModule(name, entry["kind"], entry["A"], entry["B"], a, b, scaling)
  return modules


def module_update(module: LoraModule) -> np.ndarray:
  """``scaling * B A`` ``(out, in)`` in float32, float64 for float64 factors (dense; for
  tests and small modules)."""
  dtype = np.promote_types(np.result_type(module.lora_a, module.lora_b), np.float32)
  return module.scaling * (module.lora_b.astype(dtype) @ module.lora_a.astype(dtype))


def dense_delta(module: LoraModule, fan_in_fan_out: bool = False) -> np.ndarray:
  """The weight-layout delta merging adds to the base weight (float32).

  ``(out, in)`` for a linear layer, ``(in, out)`` with ``fan_in_fan_out``, and
  ``(num_embeddings, embedding_dim)`` (``(B A)^T * scaling``) for an embedding.
  """
  delta = module_update(module)
  return delta.T if (module.kind == "embedding" or fan_in_fan_out) else delta


def dense_deltas(adapter: Adapter) -> dict[str, np.ndarray]:
  """``{name: dense_delta}`` for every module (honours ``fan_in_fan_out``)."""
  fan_in_fan_out = bool((adapter.config or {}).get("fan_in_fan_out", False))
  return {name: dense_delta(m, fan_in_fan_out) for name, m in lora_modules(adapter).items()}


# --------------------------------------------------------------------------- configs


def rank_pattern_key(name: str) -> str:
  """A ``rank_pattern`` / ``alpha_pattern`` key that PEFT matches to module ``name`` only
  (the name with regex metacharacters escaped)."""
  return re.escape(name)


def lora_config(ranks: Mapping[str, int], base: Mapping | None = None) -> dict:
  """An ``adapter_config.json`` for factors with scaling 1 and per-module ranks.

  ``r`` is the most common rank (the largest on ties), ``lora_alpha = r``,
  ``use_rslora = False`` (so ``alpha / r = 1``); modules of another rank get
  ``rank_pattern[key] = alpha_pattern[key] = rank`` with ``key`` their escaped full name.
  Every other field is copied from ``base`` (``base_model_name_or_path``,
  ``target_modules``, ``fan_in_fan_out``, ``task_type``, ...); without ``base``,
  ``target_modules`` lists the last components of the module names.
  """
  values = [int(v) for v in ranks.values()] or [1]
  counts = {v: values.count(v) for v in values}
  r = max(counts, key=lambda v: (counts[v], v))
  if base is None:
    base = {
        "peft_type": "LORA",
        "base_model_name_or_path": None,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in ranks}),
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": None,
        "inference_mode": True,
    }
  config = dict(base)
  patterns = {rank_pattern_key(name): int(v) for name, v in ranks.items() if int(v) != r}
  config.update({"peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False,
                 "rank_pattern": patterns, "alpha_pattern": dict(patterns)})
  return config


# --------------------------------------------------------------------------- Flax NNX


def _leaf_array(x) -> np.ndarray:
  value = x
  if hasattr(x, "get_value"):      # nnx.Variable
    value = x.get_value()
  elif hasattr(x, "value") and not isinstance(x, np.ndarray):
    value = x.value
  return np.asarray(value)


def _lora_nodes(tree, path=()):
  """Yields ``(path, node)`` for every mapping that holds ``lora_a`` and ``lora_b``."""
  if isinstance(tree, Mapping):
    if "lora_a" in tree and "lora_b" in tree:
      yield path, tree
      return
    for key, child in tree.items():
      yield from _lora_nodes(child, path + (key,))


def from_flax_lora_state(state, *, base_model_name_or_path: str | None = None) -> Adapter:
  """PEFT form of Flax NNX LoRA state (``nnx.state(model, nnx.LoRAParam)`` or its
  ``nnx.to_pure_dict``): ``A = lora_a^T``, ``B = lora_b^T``, scaling 1.

  Args:
    state: an ``nnx.State`` or a nested dict whose LoRA nodes hold ``lora_a (in, r)`` and
      ``lora_b (r, out)`` (arrays or ``nnx.Variable``).
    base_model_name_or_path: recorded in the config.

  Returns:
    :class:`Adapter` keyed ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``
    (``<path>`` the dot-joined state path of the LoRA node), config from
    :func:`lora_config` (``lora_alpha = r``).

  Raises:
    ValueError: no LoRA node, or factors whose shapes do not pair up.
  """
  if hasattr(state, "to_pure_dict") and not isinstance(state, dict):  # an nnx.State
    from flax import nnx  # pylint: disable=g-import-not-at-top

    state = nnx.to_pure_dict(state)
  tensors, ranks = {}, {}
  for path, node in _lora_nodes(state):
    name = ".".join(str(p) for p in path)
    lora_a, lora_b = _leaf_array(node["lora_a"]), _leaf_array(node["lora_b"])
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[1] != lora_b.shape[0]:
      raise ValueError(f"Flax LoRA node {name!r}: expected lora_a (in, r) and lora_b "
                       f"(r, out); got {lora_a.shape} and {lora_b.shape}.")
    tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(lora_a.T)
    tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lora_b.T)
    ranks[name] = lora_a.shape[1]
  if not tensors:
    raise ValueError("no Flax LoRA node (a dict with 'lora_a' and 'lora_b') in the state.")
  config = lora_config(ranks)
  config["base_model_name_or_path"] = base_model_name_or_path
  return Adapter(tensors, config, None)


def _path_key(part: str):
  return int(part) if part.isdigit() else part


def to_flax_lora_state(adapter: Adapter) -> dict[str, Any]:
  """Flax NNX LoRA state (a pure dict) of a PEFT adapter, the scaling folded into ``lora_b``.

  ``lora_a = A^T`` ``(in, r)``, ``lora_b = scaling * B^T`` ``(r, out)``, nested by the module
  name's dot-separated parts (digit parts as ints, as ``nnx.List`` keys are), so
  ``nnx.replace_by_pure_dict(nnx.state(model, nnx.LoRAParam), tree)`` loads it into a model
  whose LoRA nodes have those paths. Dtypes are kept.
  """
  tree: dict = {}
  for name, module in lora_modules(adapter).items():
    node = tree
    for part in name.split("."):
      node = node.setdefault(_path_key(part), {})
    dtype = module.lora_b.dtype
    node["lora_a"] = np.ascontiguousarray(module.lora_a.T)
    node["lora_b"] = np.ascontiguousarray(
        (module.scaling * module.lora_b.astype(np.float32)).T.astype(dtype))
  return tree
