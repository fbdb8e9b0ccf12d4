"""A Flower app's client, as it would run under Flower's own simulation, unchanged under hetfl's clock.

``client_fn(context)`` is Flower's: it reads its partition from ``context.node_config`` (``partition-id``,
``num-partitions``), builds the model and returns ``NumPyClient(...).to_client()``. hetfl calls ``fit`` with the
task's model and a config holding ``local_steps``, ``batch_size``, ``lr`` and ``seed``, and ``evaluate`` on
every client (docs/extending.md, "A Flower client").
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import Context
from torch import nn

from mylab.data import load_noisy_digits


def partition(partition_id: int, num_partitions: int):
    """This client's share of the training and test digits: every ``num_partitions``-th sample from its offset."""
    data = load_noisy_digits()
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    return ((x_train[partition_id::num_partitions], y_train[partition_id::num_partitions]),
            (x_test[partition_id::num_partitions], y_test[partition_id::num_partitions]))


class DigitsClient(NumPyClient):
    def __init__(self, partition_id: int, num_partitions: int, hidden: int) -> None:
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.train, self.test = partition(partition_id, num_partitions)

    def get_parameters(self, config):
        return [p.detach().numpy().copy() for p in self.model.state_dict().values()]

    def set_parameters(self, arrays) -> None:
        keys = self.model.state_dict().keys()
        self.model.load_state_dict({k: torch.tensor(a) for k, a in zip(keys, arrays)})

    def fit(self, parameters, config):
        self.set_parameters(parameters)
        x, y = (torch.from_numpy(a) for a in self.train)
        y = y.long()
        opt = torch.optim.SGD(self.model.parameters(), lr=float(config.get("lr", 0.1)))
        batch = int(config.get("batch_size", 16))
        gen = torch.Generator().manual_seed(int(config.get("seed", 0)))
        loss = torch.zeros(())
        for _ in range(int(config.get("local_steps", 10))):
            idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=gen)
            loss = nn.functional.cross_entropy(self.model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self.get_parameters({}), len(y), {"loss": float(loss.detach())}

    def evaluate(self, parameters, config):
        self.set_parameters(parameters)
        x, y = self.test
        with torch.no_grad():
            logits = self.model(torch.from_numpy(x))
        loss = nn.functional.cross_entropy(logits, torch.from_numpy(y).long())
        return float(loss), len(y), {"accuracy": float(np.mean(logits.argmax(1).numpy() == y))}


def client_fn(context: Context):
    return DigitsClient(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                        int(context.run_config.get("hidden", 32))).to_client()
