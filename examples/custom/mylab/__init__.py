"""mylab: a user's own model, data loader, strategy and Flower client for hetfl (docs/extending.md).

Nothing here is part of hetfl: hetfl imports these modules by the import paths a config names
(``mylab.models:SmallResNet``), or, once ``pip install -e examples/custom`` has installed the package, by the
names its entry points give them (``smallresnet``, ``noisy_digits``, ``fedavgm``).
"""
