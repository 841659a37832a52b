"""Adapters in and out: PEFT / Flax readers and writers, whole-model CLAIR, the CLI.

Every aggregation below uses the same module shape (K = 8 finite clients, updates 12 x 16,
LoRA width 2, 2 modules), so the batched detection and refine compile once for the file.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax
from clair_jax import adapters
from clair_jax import aggregate_cli
from clair_jax import cli

PREFIX = "base_model.model."
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
OUT, IN, WIDTH, RANK, NUM_CLIENTS = 12, 16, 2, 2, 8
BAD = (1, 5)


def peft_config(r=WIDTH, alpha=4.0, **fields):
  config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False,
            "rank_pattern": {}, "alpha_pattern": {}, "target_modules": ["q_proj", "v_proj"],
            "fan_in_fan_out": False, "base_model_name_or_path": "tiny-llama", "bias": "none",
            "task_type": "CAUSAL_LM"}
  config.update(fields)
  return config


def make_clients(num_clients=NUM_CLIENTS, bad=BAD, ranks=None, noise=0.05, seed=0,
                 modules=MODULES, out=OUT, inner=IN):
  """Benign ``B_k = U_j C_k + noise`` (``U_j`` shared per module), contaminated ``B_k``
  random; ``A_k`` random. Returns ``{name: (state dict, config)}``."""
  rng = np.random.default_rng(seed)
  bases = {m: np.linalg.qr(rng.normal(size=(out, RANK)))[0] for m in modules}
  clients = {}
  for k in range(num_clients):
    r_k = WIDTH if ranks is None else ranks[k]
    tensors = {}
    for m in modules:
      if k in bad:
        b = rng.normal(size=(out, r_k)) / np.sqrt(out / RANK)
      else:
        b = bases[m] @ rng.normal(size=(RANK, r_k)) + noise * rng.normal(size=(out, r_k))
      tensors[f"{PREFIX}{m}.lora_A.weight"] = (rng.normal(size=(r_k, inner)) /
                                               np.sqrt(inner)).astype(np.float32)
      tensors[f"{PREFIX}{m}.lora_B.weight"] = b.astype(np.float32)
    clients[f"client{k}"] = (tensors, peft_config(r=r_k))
  return clients


def write_clients(root, clients) -> list[str]:
  paths = []
  for name, (tensors, config) in clients.items():
    path = os.path.join(root, name)
    adapters.write_peft(path, adapters.Adapter(tensors, config))
    paths.append(path)
  return paths


def dense_stack(clients, module, base=None) -> np.ndarray:
  """``(K, out, in)`` updates ``scaling B A`` (minus the base adapter's)."""
  out = []
  for value in clients.values():
    delta = adapters.module_update(adapters.lora_modules(adapters.as_adapter(value))[module])
    if base is not None:
      base_module = adapters.lora_modules(adapters.as_adapter(base))[module]
      delta = delta - adapters.module_update(base_module)
    out.append(delta)
  return np.stack(out)


def written_dense(state_dict, config, module) -> np.ndarray:
  """The update an output adapter applies, read back with its own config's scaling."""
  return adapters.module_update(adapters.lora_modules(adapters.Adapter(state_dict, config))[module])


def expected_refined(dense, benign):
  """Every client's ``U (C_bar + s (C_k - C_bar))`` from the dense core refine."""
  refinement = clair_jax.refine_updates(jnp.asarray(dense), jnp.asarray(benign))
  left, right = clair_jax.refined_factors(refinement)
  return np.einsum("kmw,kwn->kmn", left, right), np.asarray(refinement.consensus)


def relative(a, b) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def planted():
  clients = make_clients()
  return clients, clair_jax.aggregate_adapters(clients, RANK)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_peft_round_trip_dtypes(tmp_path, dtype):
  import ml_dtypes

  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  tensors, config = make_clients(num_clients=1, bad=())["client0"]
  tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
  adapters.write_peft(tmp_path / "a", adapters.Adapter(tensors, config))
  read = adapters.read_peft(tmp_path / "a")
  assert read.config == config
  assert list(read.tensors) == list(tensors)
  for key, value in tensors.items():
    assert read.tensors[key].dtype == np.dtype(np_dtype)
    np.testing.assert_array_equal(read.tensors[key].astype(np.float32), value.astype(np.float32))
  module = adapters.lora_modules(read)[MODULES[0]]
  assert module.scaling == pytest.approx(4.0 / WIDTH)
  expected = (4.0 / WIDTH) * (tensors[module.b_key].astype(np.float32)
                              @ tensors[module.a_key].astype(np.float32))
  np.testing.assert_allclose(adapters.dense_deltas(read)[MODULES[0]], expected, rtol=1e-6)


def test_scaling_rslora_and_patterns():
  a, b = np.ones((4, IN), np.float32), np.ones((OUT, 4), np.float32)
  tensors = {}
  for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
               "model.layers.1.mlp.up_proj"):
    r = 2 if "up_proj" in name else 4
    tensors[f"{PREFIX}{name}.lora_A.weight"] = a[:r]
    tensors[f"{PREFIX}{name}.lora_B.weight"] = b[:, :r]
  config = peft_config(r=2, alpha=8, rank_pattern={"q_proj": 4},
                       alpha_pattern={"layers.1.self_attn.q_proj": 32})
  modules = adapters.lora_modules(adapters.Adapter(tensors, config))
  assert modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 4)
  assert modules["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(32 / 4)
  assert modules["model.layers.1.mlp.up_proj"].scaling == pytest.approx(8 / 2)
  rs = adapters.lora_modules(adapters.Adapter(tensors, {**config, "use_rslora": True}))
  assert rs["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 2.0)
  assert rs["model.layers.1.mlp.up_proj"].scaling == pytest.approx(8 / np.sqrt(2))
  with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.*r=4.*rank 2"):
    adapters.lora_modules(adapters.Adapter(tensors, peft_config(r=4)), client="c")
  # PEFT's get_pattern_key: a key matches a dot-separated suffix; first match wins; the
  # escaped full names that the writer uses match their own module only.
  assert adapters.pattern_value({"q_proj": 1}, "a.b.q_proj", 0) == 1
  assert adapters.pattern_value({"q_proj": 1}, "a.b.xq_proj", 0) == 0
  assert adapters.pattern_value({"layers.1.q": 1, "q": 2}, "m.layers.1.q", 0) == 1
  key = adapters.lora_config({"m.layers.1.q": 3, "m.layers.11.q": 5, "m.x": 5})["rank_pattern"]
  assert adapters.pattern_value(key, "m.layers.1.q", 5) == 3
  assert adapters.pattern_value(key, "m.layers.11.q", 5) == 5


def test_fan_in_fan_out_and_embedding_deltas(tmp_path):
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, IN)).astype(np.float32), rng.normal(size=(OUT, 2)).astype(np.float32)
  emb_a = rng.normal(size=(2, 30)).astype(np.float32)   # (r, num_embeddings)
  emb_b = rng.normal(size=(OUT, 2)).astype(np.float32)  # (embedding_dim, r)
  tensors = {f"{PREFIX}transformer.h.0.attn.c_attn.lora_A.weight": a,
             f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight": b,
             f"{PREFIX}transformer.wte.lora_embedding_A": emb_a,
             f"{PREFIX}transformer.wte.lora_embedding_B": emb_b}
  config = peft_config(alpha=2.0, fan_in_fan_out=True, use_rslora=True)
  adapters.write_peft(tmp_path / "gpt2", adapters.Adapter(tensors, config))
  deltas = adapters.dense_deltas(adapters.read_peft(tmp_path / "gpt2"))
  scaling = 2.0 / np.sqrt(2)
  np.testing.assert_allclose(deltas["transformer.h.0.attn.c_attn"], scaling * (b @ a).T,
                             rtol=1e-5)                    # Conv1D weight is (in, out)
  np.testing.assert_allclose(deltas["transformer.wte"], scaling * (emb_b @ emb_a).T,
                             rtol=1e-5)                    # (num_embeddings, embedding_dim)
  modules = adapters.lora_modules(adapters.read_peft(tmp_path / "gpt2"))
  assert modules["transformer.wte"].kind == "embedding"
  assert modules["transformer.wte"].shape == (OUT, 30)


def test_flax_nnx_round_trip(tmp_path):
  from flax import nnx

  class Tiny(nnx.Module):

    def __init__(self, rngs):
      self.layers = nnx.List([nnx.LoRALinear(IN, OUT, lora_rank=3, rngs=rngs)
                              for _ in range(2)])
      self.head = nnx.LoRA(OUT, 2, 5, rngs=rngs)

  model = Tiny(nnx.Rngs(0))
  state = nnx.state(model, nnx.LoRAParam)
  rng = np.random.default_rng(0)
  nnx.replace_by_pure_dict(state, {"layers": {i: {"lora": {
      "lora_a": rng.normal(size=(IN, 3)), "lora_b": rng.normal(size=(3, OUT))}}
      for i in range(2)}, "head": {"lora_a": rng.normal(size=(OUT, 2)),
                                   "lora_b": rng.normal(size=(2, 5))}})
  adapter = adapters.from_flax_lora_state(state, base_model_name_or_path="tiny")
  assert adapter.config["r"] == 3 and adapter.config["lora_alpha"] == 3
  adapters.write_peft(tmp_path / "flax", adapter)
  read = adapters.read_peft(tmp_path / "flax")
  pure = nnx.to_pure_dict(state)
  lora = pure["layers"][1]["lora"]
  np.testing.assert_allclose(adapters.dense_deltas(read)["layers.1.lora"],
                             (lora["lora_a"] @ lora["lora_b"]).T, rtol=1e-5, atol=1e-6)
  back = adapters.to_flax_lora_state(read)
  fresh = nnx.state(Tiny(nnx.Rngs(1)), nnx.LoRAParam)
  nnx.replace_by_pure_dict(fresh, back)
  for path in (("layers", 0, "lora", "lora_a"), ("layers", 1, "lora", "lora_b"),
               ("head", "lora_b")):
    x, y = nnx.to_pure_dict(fresh), pure
    for p in path:
      x, y = x[p], y[p]
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_refusals(tmp_path):
  (tmp_path / "pickled").mkdir()
  (tmp_path / "pickled" / adapters.PICKLE_NAME).write_bytes(b"\x80\x04")
  with pytest.raises(ValueError, match=r"safetensors\.torch\.save_file"):
    adapters.read_peft(tmp_path / "pickled", client="c3")
  with pytest.raises(ValueError, match="c3.*no adapter_model.safetensors"):
    adapters.read_peft(tmp_path, client="c3")
  tensors, config = make_clients(num_clients=1, bad=())["client0"]
  with pytest.raises(ValueError, match="DoRA"):
    adapters.as_adapter((tensors, {**config, "use_dora": True}))
  with pytest.raises(ValueError, match="DoRA"):
    adapters.as_adapter({**tensors, f"{PREFIX}{MODULES[0]}.lora_magnitude_vector": np.ones(3)})
  with pytest.raises(ValueError, match="peft_type 'IA3'"):
    adapters.as_adapter((tensors, {**config, "peft_type": "IA3"}))
  with pytest.raises(ValueError, match="modules_to_save"):
    adapters.as_adapter((tensors, {**config, "modules_to_save": ["score"]}))
  adapters.write_peft(tmp_path / "noconfig", adapters.Adapter(tensors, config))
  os.remove(tmp_path / "noconfig" / adapters.CONFIG_NAME)
  with pytest.raises(ValueError, match="no adapter_config.json"):
    adapters.read_peft(tmp_path / "noconfig")


def test_mismatches_name_client_and_key():
  clients = make_clients(num_clients=3, bad=())
  missing = dict(clients)
  tensors, config = clients["client2"]
  key = f"{PREFIX}{MODULES[1]}.lora_A.weight"
  missing["client2"] = ({k: v for k, v in tensors.items() if MODULES[1] not in k}, config)
  with pytest.raises(ValueError, match=f"client 'client2' lacks key '{key}'"):
    clair_jax.aggregate_adapters(missing, RANK)
  shaped = dict(clients)
  shaped["client1"] = ({**clients["client1"][0], key: np.ones((WIDTH, IN + 1), np.float32)},
                       config)
  with pytest.raises(ValueError, match=f"client 'client1': key '{key}' has shape"):
    clair_jax.aggregate_adapters(shaped, RANK)
  other = dict(clients)
  other["client2"] = (tensors, {**config, "base_model_name_or_path": "another-model"})
  with pytest.raises(ValueError, match="client 'client2' has base_model_name_or_path"):
    clair_jax.aggregate_adapters(other, RANK)
  with pytest.raises(ValueError, match="at least 3"):
    clair_jax.aggregate_adapters(dict(list(clients.items())[:2]), RANK)


def test_joint_verdict_pools_modules():
  rng = np.random.default_rng(0)
  scores = 0.5 + 0.03 * rng.normal(size=(20, 10))
  scores[:, 3] = 0.9          # below every module's threshold, off in every module
  scores[4, 7] = np.nan       # non-finite in one module
  verdict = adapters.joint_verdict(scores, np.ones(20))
  assert not verdict.module_flags[:, 3].any()
  assert np.flatnonzero(verdict.contaminated).tolist() == [3, 7]
  assert verdict.joint_scores[7] == np.inf and verdict.cut < 1.0


# --------------------------------------------------------------------------- aggregation


def test_planted_contamination_flagged_jointly(planted):
  clients, result = planted
  assert result.names == tuple(clients)
  assert np.flatnonzero(result.contaminated).tolist() == list(BAD)
  assert result.module_scores.shape == (len(MODULES), NUM_CLIENTS)
  assert np.all(result.status == 0) and result.status_names[0] == "successful"
  assert np.all(np.isfinite(result.noise_levels)) and result.finite.all()
  for j, module in enumerate(MODULES):
    dense = dense_stack(clients, module)
    refined, consensus = expected_refined(dense, ~result.contaminated)
    got = np.stack([written_dense(result.refined[n], result.config, module)
                    for n in result.names])
    # Every client, flagged or not, refined with the benign statistics.
    assert relative(got, refined) < 1e-4
    assert relative(written_dense(result.consensus, result.config, module), consensus) < 1e-4
    rank = max(int(result.refine_ranks[j]), 1)
    assert result.refined["client0"][f"{PREFIX}{module}.lora_B.weight"].shape == (OUT, rank)


def test_module_scores_match_clair(planted):
  clients, result = planted
  parsed = [adapters.lora_modules(adapters.as_adapter(v))[MODULES[0]] for v in clients.values()]
  factored = clair_jax.FactoredUpdates(
      jnp.asarray(np.stack([m.scaling * m.lora_b for m in parsed])),
      jnp.asarray(np.stack([m.lora_a for m in parsed])))
  reference = clair_jax.clair(factored, RANK)
  np.testing.assert_allclose(result.module_scores[0], reference.scores, rtol=1e-4)
  np.testing.assert_allclose(result.noise_levels[0], reference.noise_level, rtol=1e-4)


def test_nonfinite_client_is_flagged_and_changes_nothing(planted):
  clients, result = planted
  broken = make_clients(num_clients=1, bad=(), seed=9)["client0"]
  tensors = dict(broken[0])
  key = f"{PREFIX}{MODULES[1]}.lora_B.weight"
  tensors[key] = tensors[key].copy()
  tensors[key][0, 0] = np.nan
  with_nan = clair_jax.aggregate_adapters({**clients, "broken": (tensors, broken[1])}, RANK)
  assert with_nan.contaminated[-1] and not with_nan.finite[-1]
  assert with_nan.scores[-1] == np.inf
  np.testing.assert_array_equal(with_nan.contaminated[:-1], result.contaminated)
  np.testing.assert_allclose(with_nan.scores[:-1], result.scores, rtol=1e-6)
  for name in result.names:
    for k, v in result.refined[name].items():
      np.testing.assert_allclose(with_nan.refined[name][k], v, rtol=1e-6, atol=1e-7)
  for k, v in with_nan.refined["broken"].items():
    np.testing.assert_array_equal(v, with_nan.consensus[k])


def test_mixed_ranks_zero_padded():
  ranks = [1, 2, 2, 1, 2, 1, 2, 2]
  clients = make_clients(ranks=ranks, seed=3)
  result = clair_jax.aggregate_adapters(clients, RANK)
  assert np.flatnonzero(result.contaminated).tolist() == list(BAD)
  dense = dense_stack(clients, MODULES[0])
  refined, _ = expected_refined(dense, ~result.contaminated)
  got = np.stack([written_dense(result.refined[n], result.config, MODULES[0])
                  for n in result.names])
  assert relative(got, refined) < 1e-4


def test_base_adapter_delta():
  clients = make_clients(ranks=[1] * NUM_CLIENTS, seed=4)
  base = make_clients(num_clients=1, bad=(), ranks=[1], seed=5)["client0"]
  result = clair_jax.aggregate_adapters(clients, RANK, base_adapter=base)
  dense = dense_stack(clients, MODULES[1], base=base)
  refined, consensus = expected_refined(dense, ~result.contaminated)
  got = np.stack([written_dense(result.refined[n], result.config, MODULES[1])
                  for n in result.names])
  assert relative(got, refined) < 1e-4
  assert relative(written_dense(result.consensus, result.config, MODULES[1]), consensus) < 1e-4


ROUND_TRIP_CASES = {
    "float32": {},
    "bfloat16": {"dtype": "bfloat16"},
    "mixed_ranks": {"ranks": [1, 2, 2, 1, 2, 1, 2, 2]},
    "rslora": {"config": {"use_rslora": True, "lora_alpha": 3.0}},
    "fan_in_fan_out": {"config": {"fan_in_fan_out": True}},
}


def dense_float64(clients, module) -> np.ndarray:
  """``(K, out, in)`` ``scaling B A`` from the clients' factors, in float64."""
  out = []
  for value in clients.values():
    parsed = adapters.lora_modules(adapters.as_adapter(value))[module]
    out.append(parsed.scaling * (parsed.lora_b.astype(np.float64)
                                 @ parsed.lora_a.astype(np.float64)))
  return np.stack(out)


@pytest.mark.slow   # float64 programs: one compile per case
@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_round_trip_matches_dense_clair(tmp_path, case):
  """Files in, files out: every refined adapter's ``scaling B A`` equals the dense core's
  refine of the dense updates to 1e-5 (computed in float64 on both sides: in float32 the
  dense reference itself is off its float64 value by up to ~5e-5 on these problems)."""
  import ml_dtypes

  spec = ROUND_TRIP_CASES[case]
  clients = make_clients(ranks=spec.get("ranks"), seed=7)
  np_dtype = ml_dtypes.bfloat16 if spec.get("dtype") == "bfloat16" else np.float32
  clients = {name: ({k: v.astype(np_dtype) for k, v in tensors.items()},
                    {**config, **spec.get("config", {})})
             for name, (tensors, config) in clients.items()}
  paths = write_clients(tmp_path / "in", clients)
  with jax.enable_x64(True):
    result = clair_jax.aggregate_adapters({os.path.basename(p): p for p in paths}, RANK,
                                          dtype="float64")
    assert np.flatnonzero(result.contaminated).tolist() == list(BAD)
    for module in MODULES:
      dense = dense_float64(clients, module)
      from_dense = clair_jax.clair(jnp.asarray(dense), RANK)
      np.testing.assert_array_equal(np.asarray(from_dense.contaminated), result.contaminated)
      refined, consensus = expected_refined(dense, ~result.contaminated)
      got = np.stack([written_dense(result.refined[n], result.config, module)
                      for n in result.names])
      assert got.dtype == np.float64
      assert relative(got, refined) < 1e-5
      assert relative(written_dense(result.consensus, result.config, module), consensus) < 1e-5
      benign = ~result.contaminated
      assert relative(got[benign], np.asarray(from_dense.refined)[benign]) < 1e-5
  out = tmp_path / "out" / "client0"
  adapters.write_peft(out, adapters.Adapter(result.refined["client0"], result.config))
  read = adapters.read_peft(out)
  assert read.config["fan_in_fan_out"] == clients["client0"][1]["fan_in_fan_out"]
  assert set(read.tensors) == set(clients["client0"][0])


def test_output_dtype_option():
  clients = make_clients()
  kept = clair_jax.aggregate_adapters(clients, RANK)
  assert all(v.dtype == np.float32 for v in kept.refined["client0"].values())
  for name in ("float16", "bfloat16"):
    other = clair_jax.aggregate_adapters(clients, RANK, dtype=name)
    assert all(v.dtype == jnp.dtype(name) for v in other.refined["client0"].values())
    assert all(v.dtype == jnp.dtype(name) for v in other.consensus.values())
  with pytest.raises(ValueError, match="dtype"):
    clair_jax.aggregate_adapters(clients, RANK, dtype="int8")


def test_bad_options():
  clients = make_clients(num_clients=3, bad=())
  with pytest.raises(ValueError, match="rank=9 exceeds"):
    clair_jax.aggregate_adapters(clients, 9)
  with pytest.raises(ValueError, match="side"):
    clair_jax.aggregate_adapters(clients, RANK, side="right")
  with pytest.raises(TypeError, match="unknown option"):
    clair_jax.aggregate_adapters(clients, RANK, no_such_option=1)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(autouse=True)
def keep_test_compilation_cache(monkeypatch):
  """``clair-jax`` points JAX at its own cache unless told not to; keep conftest's."""
  monkeypatch.setenv("CLAIR_JAX_CACHE_DIR", "")


def test_cli_end_to_end(tmp_path, planted, capsys):
  clients, result = planted
  paths = write_clients(tmp_path / "in", clients)
  out = tmp_path / "out"
  assert cli.main(["aggregate", *paths, "--rank", str(RANK), "--out", str(out),
                   "--no-progress"]) == 0
  assert "2 of 8 clients flagged" in capsys.readouterr().out

  def strict(text):
    raise ValueError(f"non-strict JSON constant {text}")

  with open(out / "report.json", encoding="utf-8") as f:
    report = json.load(f, parse_constant=strict)
  assert [c["name"] for c in report["clients"]] == list(clients)
  assert [c["contaminated"] for c in report["clients"]] == result.contaminated.tolist()
  np.testing.assert_allclose([c["score"] for c in report["clients"]], result.scores, rtol=1e-6)
  assert [m["name"] for m in report["modules"]] == list(MODULES)
  assert len(report["modules"][0]["scores"]) == NUM_CLIENTS
  assert report["modules"][0]["status_name"] == "successful"
  assert report["versions"]["jax"] and report["versions"]["safetensors"]
  assert report["inputs"]["client3"]["sha256"][adapters.WEIGHTS_NAME] == adapters.file_sha256(
      os.path.join(paths[3], adapters.WEIGHTS_NAME))
  assert (out / "report.png").stat().st_size > 0
  first_config = clients["client0"][1]
  for name in [*clients, None]:
    read = adapters.read_peft(out / "consensus" if name is None else out / "clients" / name)
    assert set(read.tensors) == set(clients["client0"][0])
    assert read.config["target_modules"] == first_config["target_modules"]
    assert read.config["base_model_name_or_path"] == "tiny-llama"
    assert read.config["lora_alpha"] == read.config["r"] and not read.config["use_rslora"]
    expected = result.consensus if name is None else result.refined[name]
    for module in MODULES:
      np.testing.assert_allclose(adapters.dense_deltas(read)[module],
                                 written_dense(expected, result.config, module),
                                 rtol=1e-5, atol=1e-6)


def test_cli_failures_leave_no_output(tmp_path, planted, monkeypatch, capsys):
  clients, _ = planted
  paths = write_clients(tmp_path / "in", clients)
  out = tmp_path / "out"

  def boom(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(aggregate_cli, "plot_report", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    cli.main(["aggregate", *paths, "--rank", str(RANK), "--out", str(out), "--no-progress"])
  assert sorted(os.listdir(tmp_path)) == ["in"]      # no OUT, no temporary directory
  for argv, message in (
      ([*paths, "--rank", "0", "--out", str(out)], "positive integer"),
      ([*paths[:2], "--rank", "2", "--out", str(out)], "at least 3"),
      ([*paths, str(tmp_path / "nope"), "--rank", "2", "--out", str(out)], "not a directory"),
      ([*paths, "--rank", "2", "--out", str(tmp_path / "in")], "exists"),
  ):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(["aggregate", *argv, "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
  os.remove(os.path.join(paths[4], adapters.CONFIG_NAME))
  with pytest.raises(SystemExit):
    cli.main(["aggregate", *paths, "--rank", "2", "--out", str(out), "--no-progress"])
  assert "client 'client4'" in capsys.readouterr().err
  assert not out.exists()


def test_output_loads_in_peft(tmp_path, planted):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  _, result = planted
  folder = tmp_path / "client0"
  config = {**result.config, "task_type": None}   # a bare nn.Module, not a causal LM
  adapters.write_peft(folder, adapters.Adapter(result.refined["client0"], config))

  class Attention(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.q_proj = torch.nn.Linear(IN, OUT, bias=False)
      self.v_proj = torch.nn.Linear(IN, OUT, bias=False)

  class Layer(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.self_attn = Attention()

  class Inner(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.layers = torch.nn.ModuleList([Layer()])

  class Model(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.model = Inner()

  base = Model()
  before = {m: dict(base.named_modules())[m].weight.detach().clone() for m in MODULES}
  merged = peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
  for module in MODULES:
    delta = dict(merged.named_modules())[module].weight.detach().numpy() - before[module].numpy()
    np.testing.assert_allclose(delta, written_dense(result.refined["client0"], result.config,
                                                    module), rtol=1e-4, atol=1e-6)
