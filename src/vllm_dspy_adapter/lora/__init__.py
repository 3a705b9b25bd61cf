"""LoRA adapters: the data, the training provider and the training loop.

- ``registry``: adapters as data: the checks before any engine sees one, the registry;
- ``provider``: ``LoRAProvider``: DSPy's training provider (``lm.finetune``, BootstrapFinetune);
- ``training``: PEFT LoRA training on DSPy's chat data (a short PyTorch loop);
- ``reinforce``: ``GRPOJob``, DSPy's ``ReinforceJob`` (``lm.reinforce``, ``dspy.GRPO``);
- ``grpo`` (options, advantages, loss), ``grpo_kwargs`` (TRL's and Arbor's ``train_kwargs``
  names in ours) and ``grpo_trainer`` (the PEFT model and its steps);
- ``trainer_device``: where the GRPO trainer runs and whether it fits there.

May import only the shared modules (``errors``, ``chat_template``, ``config``); the LM
classes and the serving layer import it, never the other way (``tests/test_layers.py``).
"""
