"""A Hugging Face checkpoint (e.g. Qwen3-0.6B) on GSM8K-format data.

Launch (one GPU, or a TPU host; set the mesh to the device count):

    python -m experiments.main --config=experiments/configs/gsm8k_hf.py:dapo+repo_r \\
        --workdir=/tmp/entropo/gsm8k --init_from=/path/to/Qwen3-0.6B \\
        --config.task.path=/path/to/gsm8k_jsonl_dir --config.mesh.data=8

`--init_from` is a local Hugging Face directory (config.json, safetensors,
tokenizer.json); `task.path` a directory with `train.jsonl` and `test.jsonl`
in GSM8K's format (`{"question", "answer": "... #### 72"}` lines). Nothing
is downloaded.

Hardware, estimated by `entropo.planning` (docs/scaling.md, "A worked
example"; not measured): for Qwen3-0.6B at these batch sizes (128
sequences of up to 768 tokens, 4 minibatches of 32) the update needs about
86 GiB on one device, so use 8 devices with `--config.mesh.data=8` (about
17 GiB each), or on a single 80 GB GPU `--config.model.remat=block` (about
22 GiB) or `--config.algo.minibatches=16` (about 27 GiB). The precision
preset `bf16_fp32_head` keeps the head, log-probs and ratios in float32
(the paper's fix, method.md section 5).

Expected run time and result: not measured in this project yet (no
accelerator was available when this config was written); the config is
validated by the test suite. Record what you see in docs/results.md.
"""

from entropo.training import config as config_lib


def get_config(algorithm: str = "dapo+repo_r"):
  c = config_lib.default_config(algorithm or "dapo+repo_r")
  c.precision = "bf16_fp32_head"
  c.task.name = "gsm8k"
  c.task.settings = {}
  c.task.path = ""  # --config.task.path=<dir with train.jsonl, test.jsonl>
  c.model.init_from = ""  # --init_from=<Hugging Face directory>
  c.data.update(max_prompt_len=256, eval_size=256)
  c.sampling.update(prompts_per_batch=16, group_size=8, max_new_tokens=512,
                    temperature=1.0)
  c.optim.update(learning_rate=1e-6, weight_decay=0.01)
  c.algo.update(minibatches=4)
  c.train.update(iterations=200, eval_every=20, eval_samples=16,
                 pass_k=(1, 4, 16), checkpoint_every=10)
  return c
