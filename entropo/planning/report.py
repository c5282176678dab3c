"""The tables of docs/scaling.md; `python -m entropo.planning` prints them."""

import argparse

from entropo.planning.catalog import GIB
from entropo.planning.catalog import HARDWARE
from entropo.planning.catalog import QWEN3
from entropo.planning.catalog import qwen3_config
from entropo.planning.memory import memory_estimate
from entropo.planning.mesh_search import affine_peaks
from entropo.planning.mesh_search import max_sequences
from entropo.planning.mesh_search import recommend_mesh
from entropo.planning.params import MeshShape
from entropo.planning.params import param_count

# The setups of docs/scaling.md: model, hardware, chips, slice name.
SETUPS = (
    ("Qwen3-0.6B", "v5e", 8, "v5litepod-8"),
    ("Qwen3-0.6B", "v5p", 4, "v5p-8"),
    ("Qwen3-0.6B", "h100", 1, "1 GPU"),
    ("Qwen3-0.6B", "h100", 8, "1 node"),
    ("Qwen3-8B", "v5e", 32, "v5litepod-32"),
    ("Qwen3-8B", "v5e", 64, "v5litepod-64"),
    ("Qwen3-8B", "v5p", 8, "v5p-16"),
    ("Qwen3-8B", "h100", 8, "1 node"),
    ("Qwen3-8B", "h100", 16, "2 nodes"),
    ("Qwen3-32B", "v5e", 256, "v5litepod-256"),
    ("Qwen3-32B", "v5p", 32, "v5p-64"),
    ("Qwen3-32B", "v5p", 64, "v5p-128"),
    ("Qwen3-32B", "h100", 32, "4 nodes"),
)
PRECISIONS = ("fp32", "bf16_fp32_head")
RECOMMENDED_PRECISION = "bf16_fp32_head"


def _gib(x: float) -> str:
  return f"{x / GIB:.1f}" if x < 100 * GIB else f"{x / GIB:.0f}"


def _table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def _layout(mesh):
  return f"{mesh.data}/{mesh.fsdp}/{mesh.tensor}"


def _parameter_table():
  rows = []
  for name in QWEN3:
    cfg = qwen3_config(name)
    total = param_count(cfg)
    rows.append((name, f"{total / 1e9:.3f} B",
                 f"{param_count(cfg, embeddings=False) / 1e9:.3f} B",
                 "yes" if cfg.tie_word_embeddings else "no",
                 _gib(total * 4), _gib(total * 16), _gib(total * 28)))
  return _table(("model", "parameters", "non-embedding", "tied",
                 "f32 weights GiB", "+ AdamW + grads (16 B/param)",
                 "+ undonated update outputs (28 B/param)"), rows)


def _setup_tables(seq_len):
  """The default table and the recommended flags, one row per setup.

  The default is the trainer's: blockwise attention, no remat. A setup
  that does not fit gets the flags of the smallest remat that makes it fit.
  """
  rows, flags = [], []
  prec = RECOMMENDED_PRECISION
  for model, hw_name, chips, slice_name in SETUPS:
    cfg, hw = qwen3_config(model), HARDWARE[hw_name]
    where = (model, f"{hw.name} {slice_name} ({chips})")
    mesh, capacity = recommend_mesh(cfg, prec, hw, chips, seq_len=seq_len)
    if mesh is None:
      rows.append(where + ("does not fit",) + ("-",) * 4)
      for remat in REMAT_FALLBACKS:
        mesh, capacity = recommend_mesh(cfg, prec, hw, chips,
                                        seq_len=seq_len, remat=remat)
        if mesh is not None:
          flags.append(where + (
              f"`{mesh.flags()} --config.precision={prec} "
              f"--config.model.remat={remat}`", "-", capacity))
          break
      else:
        flags.append(where + ("does not fit, even with remat", "-", 0))
      continue
    est = memory_estimate(cfg, prec, mesh, batch=0, seq_len=seq_len)
    kw = dict(budget=hw.budget, seq_len=seq_len)
    per_seq = [affine_peaks(cfg, p, mesh, seq_len=seq_len,
                             phase="update")[0][1] for p in PRECISIONS]
    update = [max_sequences(cfg, p, mesh, phase="update", **kw)
              for p in PRECISIONS]
    rollout = [max_sequences(cfg, p, mesh, phase="rollout", **kw)
               for p in PRECISIONS]
    rows.append(where + (
        _layout(mesh), f"{_gib(est.resident)} / {_gib(est.backward_end)}",
        " / ".join(map(_gib, per_seq)), " / ".join(map(str, update)),
        " / ".join(map(str, rollout))))
    flags.append(where + (f"`{mesh.flags()} --config.precision={prec}`",
                          rollout[1] * mesh.batch_shards, capacity))
  both = " (`fp32` / `bf16_fp32_head`)"
  return (_table(("model", "hardware (chips)", "data/fsdp/tensor",
                  "resident / optimizer-step GiB per chip",
                  "update GiB per sequence per chip" + both,
                  "update seqs per chip" + both,
                  "rollout seqs per chip" + both), rows),
          _table(("model", "hardware (chips)", "flags",
                  "rollout sequences at most (P x G)",
                  "sequences per minibatch at most"), flags))


# Remat options tried, cheapest recomputation first, for a setup that does
# not fit without.
REMAT_FALLBACKS = ("block_save_dots", "block")
# The variants of the options table: the model section's fields.
VARIANTS = (
    ("reference attention", dict(attention="reference")),
    ("remat=block_save_dots", dict(remat="block_save_dots")),
    ("remat=block", dict(remat="block")),
)


def _options_table(seq_len):
  rows = []
  for name, variant in VARIANTS:
    for model, hw_name, chips, slice_name in SETUPS:
      hw = HARDWARE[hw_name]
      mesh, capacity = recommend_mesh(qwen3_config(model),
                                      RECOMMENDED_PRECISION, hw, chips,
                                      seq_len=seq_len, **variant)
      rows.append((model, f"{hw.name} {slice_name} ({chips})", name,
                   "does not fit" if mesh is None else _layout(mesh),
                   capacity))
  return _table(("model", "hardware (chips)", "variant", "data/fsdp/tensor",
                 "update seqs per step"), rows)


def _length_table(model="Qwen3-8B", hw_name="h100", mesh=MeshShape(fsdp=8)):
  cfg, hw, prec = qwen3_config(model), HARDWARE[hw_name], RECOMMENDED_PRECISION
  rows = []
  for length in (1024, 2048, 4096, 8192, 16384, 32768):
    slope = lambda **o: affine_peaks(cfg, prec, mesh, seq_len=length,
                                      phase="update", **o)[0][1]
    kv = memory_estimate(cfg, prec, mesh, batch=mesh.batch_shards,
                         seq_len=length).kv_cache
    fit = lambda **o: max_sequences(cfg, prec, mesh, budget=hw.budget,
                                    seq_len=length, phase="update", **o)
    rows.append((length, _gib(slope(attention="reference")), _gib(slope()),
                 _gib(slope(remat="block_save_dots")),
                 _gib(slope(remat="block")),
                 _gib(slope(fused_head=False) - slope()), _gib(kv),
                 f"{fit()} / {fit(remat='block')}"))
  title = (f"{model}, {hw.name} x {mesh.size}, `{prec}`, data/fsdp/tensor = "
           f"{_layout(mesh)}, GiB per sequence per chip")
  return title, _table(("tokens", "update, reference attention",
                        "update (blockwise attention)",
                        "update, remat=block_save_dots",
                        "update, remat=block",
                        "extra without the fused head", "KV cache",
                        "update seqs per chip (no remat / block)"), rows)


def markdown_tables(*, seq_len: int = 2048) -> str:
  """The tables of docs/scaling.md, computed by this module."""
  as_is, flags = _setup_tables(seq_len)
  title, lengths = _length_table()
  return "\n".join([
      "#### Parameters\n", _parameter_table(),
      f"\n#### The trainer's default: blockwise attention, no remat, "
      f"{seq_len}-token sequences (half prompt)\n", as_is,
      f"\n#### Recommended flags ({seq_len}-token sequences)\n", flags,
      f"\n#### Other attention and remat options "
      f"(`{RECOMMENDED_PRECISION}`, {seq_len}-token sequences)\n",
      _options_table(seq_len),
      f"\n#### Sequence length: {title}\n", lengths])


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Prints the memory tables of docs/scaling.md.")
  parser.add_argument("--seq_len", type=int, default=2048,
                      help="tokens per sequence (prompt + completion)")
  args = parser.parse_args(argv)
  print(markdown_tables(seq_len=args.seq_len))


if __name__ == "__main__":
  main()
