"""Optional integrations with other libraries. Importing this package imports none of them.

- ``glass_fast.integrations.diffusers``: FLUX.1, FLUX.2 and Stable Diffusion 3 pipelines sampled and steered
  with GLASS, ODE and SDE transitions (needs ``pip install "glass_fast[diffusers]"``).
- ``glass_fast.integrations.rewards``: image rewards for steering (decoded images -> scores) and a CLIP
  score adapter for locally available CLIP weights (needs ``transformers``).
"""
