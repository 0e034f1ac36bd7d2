"""mov-jax's gin files, installed as the package `mov_jax.gin_files`.

`mov_jax.gin_utils` puts this directory on the gin search path, so
`--gin_file=models/t5_1_1_small.gin` works from any working directory.
"""
