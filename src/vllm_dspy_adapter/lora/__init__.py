"""LoRA adapters: the data, the training provider and the training loop.

- ``registry``: adapters as data: the checks before any engine sees one, the registry;
- ``provider``: ``LoRAProvider``: DSPy's training provider (``lm.finetune``, BootstrapFinetune);
- ``training``: PEFT LoRA training on DSPy's chat data (a short PyTorch loop).

May import only the shared modules (``errors``, ``chat_template``, ``config``); the LM
classes and the serving layer import it, never the other way (``tests/test_layers.py``).
"""
