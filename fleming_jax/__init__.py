"""fleming-jax: the Fleming-R1 medical-reasoning training pipeline in JAX/Flax."""
