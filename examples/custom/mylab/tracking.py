"""A tracker of your own (docs/extending.md, "A tracker"): tracking.callbacks names it by import path."""

import json


class JsonlMirror:
    """Every evaluation's accuracy, one JSON line per record, in a file of its own."""

    def __init__(self, path, out):          # params from the config; out (the run folder) because it asks
        self.path, self.out = path, out

    def on_start(self, run):
        self.name = run.name

    def on_metrics(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps({"run": self.name, "round": record["round"], "accuracy": record["accuracy"]}) + "\n")
