"""Adapter methods, one module per family, all built on one router.

* `routing.Router`: probabilities over experts (soft / top-k, token or
  sequence level, jitter, z-loss and load-balancing statistics).
* `vectors.MixtureOfVectors`: MoV; with one expert and no router, IA3.
* `lora.MixtureOfLoRA`: MoLoRA; with one expert and no router, LoRA.

Methods are attached to network sites by gin (`gin/methods/*.gin`) through
`mov_jax.layers.AdapterSites`; the network never branches on a method name.
"""
