"""Independent float64 NumPy references, written loop-style.

These deliberately avoid vectorised tricks and never import entropo: each
function spells out the definition from docs (method.md) one token, one
sequence, one group at a time, in float64, so that a bug in the library's
vectorised JAX code cannot be mirrored here.
"""
