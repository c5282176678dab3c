"""Float64 loop-style reference for masked grouped-query attention.

One query at a time: the allowed keys are those that exist and sit at or
before the query's slot; the softmax runs over them; a query with no allowed
key averages the values of all keys uniformly (what entropo's attention does
for padding queries). Never imports entropo.
"""

import math

import numpy as np


def attention(q, k, v, key_valid, query_slots, segments=None):
  """q: [B, T, KV, G, hd]; k, v: [B, KV, S, hd] -> [B, T, KV, G, hd] f64.

  `segments`: optional `(query_segments [B, T], key_segments [B, S])`: a
  query's allowed keys are then only those of its own segment too.
  """
  q, k, v = (np.asarray(x).astype(np.float64) for x in (q, k, v))
  key_valid = np.asarray(key_valid)
  b_size, t_size, kv_size, g_size, hd = q.shape
  s_size = k.shape[2]
  out = np.zeros(q.shape)
  for b in range(b_size):
    for t in range(t_size):
      keys = [s for s in range(s_size)
              if key_valid[b, s] and s <= int(query_slots[t])
              and (segments is None
                   or int(segments[0][b, t]) == int(segments[1][b, s]))]
      for h in range(kv_size):
        for g in range(g_size):
          if not keys:
            out[b, t, h, g] = v[b, h].mean(axis=0)
            continue
          scores = [q[b, t, h, g] @ k[b, h, s] / math.sqrt(hd) for s in keys]
          top = max(scores)
          weights = [math.exp(x - top) for x in scores]
          total = sum(weights)
          out[b, t, h, g] = sum(w / total * v[b, h, s]
                                for w, s in zip(weights, keys))
  return out
