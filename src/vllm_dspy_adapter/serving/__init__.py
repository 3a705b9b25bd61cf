"""The serving layer: one request's way to a replica and back.

- ``pool``: ``ReplicaPool``: routing, resubmission when a replica dies, background
  restarts, the stall check (``health_timeout``);
- ``pool_adapters``: the pool's LoRA adapters: load on all or none, unload, retire once idle;
- ``routing``: the routing policies (pure): prefix, least_loaded, round_robin;
- ``adapter_routing``: ``AdapterRouter`` (pure): an adapter's requests where it is resident.

May import: ``backends``, ``lora`` (the adapter registry) and the shared modules. Imports
nothing of ``lm`` (``tests/test_layers.py``).
"""
