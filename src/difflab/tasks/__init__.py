"""What the entry points run: ``train(cfg)`` and ``sample(cfg)``, testable without Hydra's CLI."""
