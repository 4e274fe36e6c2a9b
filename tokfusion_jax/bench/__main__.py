"""python -m tokfusion_jax.bench: see `tokfusion_jax.bench`."""

from tokfusion_jax.bench.cli import main

if __name__ == "__main__":
    main()
