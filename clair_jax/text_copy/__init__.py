"""Federated LoRA fine-tuning of a Flax NNX Transformer on the text-copy task.

Modules, in data-flow order:

* ``data``: vocabulary layout, client distributions, contaminated clients.
* ``model``: the decoder-only Transformer with LoRA on every projection.
* ``trainer``: central pre-training and all-clients-at-once local LoRA training (vmapped).
* ``federation``: per-module LoRA updates, poisoned updates, CLAIR + baselines, the joint
  verdict and refined low-rank adapters.
* ``evaluate``: per-client metrics of every method and detection metrics.
* ``checkpoint``: ``.npz`` save / reload of the base model and adapters.
* ``experiment``: presets and the whole pipeline for one seed.
* ``plots``, ``cli``: ``clair-jax text-copy``.

This package depends on the core ``clair_jax`` (``clair``, ``fit_subspace``,
``baselines``); the core never imports it.
"""
