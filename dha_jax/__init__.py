"""dha_jax: DHA (joint DA, HPO and NAS) in JAX/Flax/Optax."""
