"""The serving layer: one request's way to a replica and back.

- ``pool``: ``ReplicaPool``: routing, resubmission when a replica dies, background
  restarts, the stall check (``health_timeout``);
- ``pool_adapters``: the pool's LoRA adapters: load on all or none, unload, retire once idle;
- ``policy``: the base of every policy (``Router``, ``ReplicaLoad``; its no-op hooks);
- ``routing``: the routing policies (pure): prefix, least_loaded, round_robin; ``make_router``;
- ``cache_routing``: the ``"cache"`` policy (pure): exact, from the engines' KV-cache events;
- ``adapter_routing``: ``AdapterRouter`` (pure): an adapter's requests where it is resident;
- ``batching``: ``group_by_prefix`` (pure): ``batch_generate``'s cache-friendly order.

May import: ``backends``, ``lora`` (the adapter registry) and the shared modules. Imports
nothing of ``lm`` (``tests/test_layers.py``).
"""
