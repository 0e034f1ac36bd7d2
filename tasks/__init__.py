"""SeqIO task and mixture registrations of mov-jax (installed as `mov_jax.tasks`).

P3 / T0 tasks and the shipped mini-P3 data arrive with the [data] issue.
"""
