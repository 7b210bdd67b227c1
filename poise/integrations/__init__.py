"""Integrations of poise's objectives with other training libraries.

- :mod:`poise.integrations.trl`: TRL's ``DPOTrainer`` trained with any poise objective
  (``pip install poise[trl]``). Imported on demand: ``import poise`` never imports TRL.
"""
