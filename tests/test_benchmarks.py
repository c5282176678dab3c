"""benchmarks/fused_head.py runs end to end at a small size.

The numbers it exists for are measured by hand (docs/benchmarks.md); this
keeps the script working: both precisions, the per-variant peak-memory
subprocesses, the `--floor` timing, the fused variant alone where the
materialised one does not fit, the JSON and the Markdown table, and its
input checks.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fused_head.py"


def _run(*args):
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        check=False)


@pytest.mark.parametrize("precision, peak", [("fp32", True),
                                             ("bf16_fp32_logits", False)])
def test_fused_head_benchmark_runs(tmp_path, precision, peak):
  out = tmp_path / "fused_head.json"
  args = ["--configs", "256x16x4096", "--chunk_size", "256", "--repeats",
          "1", "--precision", precision, "--out", str(out)]
  # --floor with the peaks, --skip_peak without: both ways in two runs.
  proc = _run(*args, *(["--floor"] if peak else ["--skip_peak"]))
  assert proc.returncode == 0, proc.stderr
  result = json.loads(out.read_text())
  (row,) = result["rows"]
  assert row["precision"] == precision
  for mode in ("fwd", "fwd_bwd"):
    mem = row[f"{mode}/memory"]
    # [256, 4096] float32 logits are 4 MiB; the fused path holds a few
    # [256, 256] chunks.
    assert mem["materialised"]["temp_bytes"] >= 256 * 4096 * 4
    assert mem["fused"]["temp_bytes"] < mem["materialised"]["temp_bytes"] / 4
    timed = {"materialised", "fused"} | ({"floor"} if peak else set())
    assert set(row[f"{mode}/seconds"]) == timed
    assert all(t > 0 for t in row[f"{mode}/seconds"].values())
    if peak:
      assert all(p is not None and p > 0
                 for p in row[f"{mode}/peak"].values())
    else:
      assert f"{mode}/peak" not in row
  table = proc.stdout[proc.stdout.index("| N x D x V"):]
  assert f"| 256x16x4096 | {precision} | fwd_bwd |" in table
  assert ("| s floor | floor ratio |" in table) == peak


def test_fused_head_runs_alone_where_materialised_does_not_fit(tmp_path):
  # 2 MiB: under the materialised path's 4 MiB of logits, over the fused
  # path's chunks.
  out = tmp_path / "fused_head.json"
  proc = _run("--configs", "256x16x4096", "--chunk_size", "256",
              "--repeats", "1", "--max_bytes", str(2 * 2**20), "--out",
              str(out))
  assert proc.returncode == 0, proc.stderr
  (row,) = json.loads(out.read_text())["rows"]
  for mode in ("fwd", "fwd_bwd"):
    assert set(row[f"{mode}/not_run"]) == {"materialised"}
    assert set(row[f"{mode}/seconds"]) == {"fused"}
    assert set(row[f"{mode}/peak"]) == {"fused"}
    assert row[f"{mode}/peak"]["fused"] > 0
  assert "| not run | " in proc.stdout and "| n/a |" in proc.stdout


@pytest.mark.parametrize("args, shown", [
    (["--configs", "4096x1024"], "4096x1024"),
    (["--configs", "0x8x8"], "0x8x8"),
    (["--precision", "int8"], "int8"),
    (["--configs", "64x8x1000", "--chunk_size", "256", "--floor"],
     "64x8x1000"),
])
def test_fused_head_benchmark_rejects_bad_flags(args, shown):
  proc = _run(*args)
  assert proc.returncode == 2
  assert shown in proc.stderr


ATTENTION_SCRIPT = ROOT / "benchmarks" / "attention_memory.py"


def test_attention_memory_benchmark_runs(tmp_path):
  out = tmp_path / "attention_memory.json"
  proc = subprocess.run(
      [sys.executable, str(ATTENTION_SCRIPT), "--tiny", "--lengths", "64",
       "512", "--attention", "reference", "blockwise", "--remat", "none",
       "--chunk_size", "64", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr
  rows = {(r["attention"], r["length"]): r["temp_bytes"]
          for r in json.loads(out.read_text())["rows"]}
  assert len(rows) == 4 and all(v > 0 for v in rows.values())
  # At L = 512 the reference holds [1, 2, 2, 512, 512] float32 scores (4
  # MiB per copy); the blockwise path one [.., 512, 64] chunk at a time.
  assert rows["blockwise", 512] < rows["reference", 512]
  assert "| blockwise | none | 2 unrolled | 512 |" in proc.stdout


def test_attention_memory_benchmark_times_steps(tmp_path):
  # --time runs every compiled variant (the layer scan and remat too) on
  # one random model and reports seconds per step and tokens/s.
  out = tmp_path / "timed.json"
  proc = subprocess.run(
      [sys.executable, str(ATTENTION_SCRIPT), "--tiny", "--lengths", "32",
       "--attention", "blockwise", "--remat", "block", "--loops",
       "unrolled", "scan", "--batch", "2", "--time", "1", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(out.read_text())["rows"]
  assert {(r["remat"], r["loop"]) for r in rows} == {
      ("block", "unrolled"), ("block", "scan")}
  for r in rows:
    assert r["step_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"])
  assert "| blockwise | block | scan | 32 |" in proc.stdout


LORA_SCRIPT = ROOT / "benchmarks" / "lora_memory.py"


def test_lora_memory_benchmark_runs(tmp_path):
  out = tmp_path / "lora_memory.json"
  proc = subprocess.run(
      [sys.executable, str(LORA_SCRIPT), "--tiny", "--layers", "1",
       "--length", "32", "--ranks", "2", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr
  full, lora = json.loads(out.read_text())["rows"]
  assert (full["variant"], lora["variant"]) == ("full", "lora_r2")
  # The tiny width: 7 adapters of rank 2 in one layer, A [in, 2], B [2, out]
  # (d 32, q 32, kv 16, MLP 64).
  assert lora["trainable_params"] == 2 * (64 + 48 + 48 + 64 + 96 + 96 + 96)
  assert full["frozen_params"] == 0
  assert lora["frozen_params"] == full["trainable_params"]
  # AdamW: two float32 moments per trained parameter, plus step counts.
  for row in (full, lora):
    assert 8 * row["trainable_params"] <= row["optimizer_bytes"] <= (
        8 * row["trainable_params"] + 64)
    assert row["temp_bytes"] > 0
  # Full fine-tuning returns new parameters and moments for every weight.
  assert lora["output_bytes"] < full["output_bytes"]
  assert "| lora_r2 |" in proc.stdout


DECODE_SCRIPT = ROOT / "benchmarks" / "decode_step.py"


def test_decode_step_benchmark_runs(tmp_path):
  # Three ways through a cache of 4 chunks: the same tokens; a check per
  # step or per block of 16 (the default EOS id makes a loop over blocks of
  # unknown length), and the every-chunk attention that adds no other.
  out = tmp_path / "decode.json"
  proc = subprocess.run(
      [sys.executable, str(DECODE_SCRIPT), "--model", "tiny", "--layers",
       "1", "--chunk_size", "8", "--new_tokens", "24", "--prompt_len", "8",
       "--batch", "2", "--repeats", "1", "--variants", "fp32:1:filled",
       "fp32:16:filled", "fp32:16:every", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(out.read_text())
  rows = {r["name"]: r for r in result["rows"]}
  assert all(r["same_tokens"] and r["ms_per_step"] > 0 for r in rows.values())
  assert all(len(r["completion_lengths"]) == 2 for r in rows.values())
  assert rows["fp32:16:filled"]["unknown_length_loops"] == 2  # + one layer
  assert rows["fp32:16:every"]["unknown_length_loops"] == 1
  assert "| fp32:16:every |" in proc.stdout


INFLIGHT_SCRIPT = ROOT / "benchmarks" / "inflight.py"


def test_inflight_benchmark_runs(tmp_path):
  # Static, waves and in-flight on both length distributions: the same
  # tokens, the lengths the budgets set, and the loop's counts.
  out = tmp_path / "inflight.json"
  proc = subprocess.run(
      [sys.executable, str(INFLIGHT_SCRIPT), "--runs", "tiny@1:32",
       "--batch", "8", "--slots", "4", "--prompt_len", "8", "--repeats", "1",
       "--steps_per_check", "4", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(out.read_text())["rows"]
  assert [r["dist"] for r in rows] == ["lognormal", "equal"]
  for r in rows:
    assert r["same_tokens"] and r["layers"] == 1
    assert r["inflight@4/stats"]["host_calls"] == 1
    assert r["inflight@4/stats"]["prefill_rows"] == 8
    assert r["inflight@4/tokens_per_s"] > 0
  assert rows[1]["useful_tokens"] == 8 * 4  # equal: N / 8 each
  assert "| inflight@4 |" in proc.stdout


def test_agents_inflight_benchmark_runs(tmp_path):
  # Lock-step and in-flight episodes at a micro size: the same tokens.
  out = tmp_path / "agents_inflight.json"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "agents_inflight.py"),
       "--episodes", "4", "--slots", "2", "--turns", "2", "--action", "4",
       "--obs", "4", "--prompt_len", "12", "--latency_ms", "5",
       "--repeats", "1", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["lock-step", "in-flight S=2"]
  assert all(r["same_tokens_as_lock_step"] for r in rows)
  assert "| in-flight S=2 |" in proc.stdout


def test_packing_benchmark_runs(tmp_path, monkeypatch, capsys):
  """benchmarks/packing.py end to end on a micro case: both layouts timed,
  the packed one on fewer rows, the JSON and the table."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "bench_packing", ROOT / "benchmarks" / "packing.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  micro = dict(vocab_size=16, hidden_size=16, intermediate_size=32,
               num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
  monkeypatch.setattr(bench, "CASES", {
      "micro": (micro, 16, 64, "lognormal", "fp32")})
  out = tmp_path / "packing.json"
  bench.main(["--cases", "micro", "--repeats", "1", "--out", str(out)])
  (row,) = json.loads(out.read_text())["rows"]
  assert row["packed_rows"] < row["B"]
  assert row["padded_s"] > 0 and row["packed_s"] > 0
  assert row["speedup"] == pytest.approx(row["padded_s"] / row["packed_s"])
  assert "| micro | 16 x 64 | lognormal |" in capsys.readouterr().out


@pytest.mark.slow
def test_packing_benchmark_whole_model_options(tmp_path, monkeypatch,
                                              capsys):
  """The options gpu.sh's `packing` part passes (`--cases qwen3_0.6b
  --batch --length --attention auto`: scanned, rematerialised layers,
  bf16_fp32_head) run end to end, on a micro model; a bad size is refused
  naming its option."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "bench_packing", ROOT / "benchmarks" / "packing.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  micro = dict(bench.QWEN3_06B, vocab_size=64, hidden_size=16,
               intermediate_size=32, num_layers=2, num_heads=2,
               num_kv_heads=1, head_dim=8)
  monkeypatch.setitem(bench.CASES, "qwen3_0.6b",
                      (micro,) + bench.CASES["qwen3_0.6b"][1:])
  out = tmp_path / "packing.json"
  bench.main(["--cases", "qwen3_0.6b", "--batch", "8", "--length", "32",
              "--attention", "auto", "--repeats", "1", "--out", str(out)])
  (row,) = json.loads(out.read_text())["rows"]
  assert (row["B"], row["L"], row["precision"], row["attention"]) == (
      8, 32, "bf16_fp32_head", "auto")
  assert row["packed_rows"] < row["B"] and row["packed_s"] > 0
  assert "| qwen3_0.6b | 8 x 32 | lognormal |" in capsys.readouterr().out
  for option, value in (("--length", "4"), ("--batch", "-1"),
                        ("--repeats", "0")):
    with pytest.raises(SystemExit):
      bench.main([option, value, "--out", str(out)])
    assert f"{option} must be" in capsys.readouterr().err


def test_packing_benchmark_plots_the_trainer_runs(tmp_path):
  """`--plot` draws a `--trainer` row (a made-up 2-iteration one: the real
  runs take minutes to compile) into a PNG."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "bench_packing", ROOT / "benchmarks" / "packing.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  row = {"case": "trainer", "iterations": 2}
  for name in ("padded", "packed"):
    row.update({f"{name}_train_s": [3.0, 1.0], f"{name}_reward": [0.1, 0.2],
                f"{name}_entropy": [0.6, 0.5], f"{name}_train_median_s": 1.0})
  path = tmp_path / "plot" / "demo.png"
  bench.plot_trainer(row, path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_options_benchmark_times_each_set(capsys):
  """benchmarks/compile_options.py compiles the step under each option set
  (a new program each time, so no cache answers), and reports an option
  XLA does not know as refused instead of failing; bad arguments are
  refused by name before anything compiles."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "bench_compile_options", ROOT / "benchmarks" / "compile_options.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  cache_on = jax.config.jax_enable_compilation_cache
  bench.main(["{}", '{"no_such_option": 1}', "--repeats", "2",
              "--layers", "1", "--batch", "1", "--length", "8"])
  assert jax.config.jax_enable_compilation_cache == cache_on
  out = capsys.readouterr().out
  (timed,) = [line for line in out.splitlines() if line.startswith("| {}")]
  rounds = [float(x) for x in timed.split("|")[2].split(",")]
  assert len(rounds) == 2 and min(rounds) > 0.01  # compiled, not cached
  assert "refused: INVALID_ARGUMENT" in out and "no_such_option" in out
  for bad, shown in ((["{}", "--repeats", "0"], "--repeats"),
                     (["[1]"], "must be a JSON object"),
                     (["{x"], "are not JSON")):
    with pytest.raises(SystemExit):
      bench.main(bad)
    assert shown in capsys.readouterr().err
