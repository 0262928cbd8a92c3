"""`python -m crate_jax.convert`: see `crate_jax.convert`."""

from crate_jax.convert import run

run()
