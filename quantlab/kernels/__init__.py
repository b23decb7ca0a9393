"""Hand-written device kernels (compiled at run time; optional: callers fall back to torch ops)."""
