"""The core layer: what every chapter measures with. Models and generation, the prompt sets and
their sources, the refusal judges and scorers, metrics, evaluation of a model over items, the
content-addressed cache, chapter results and parameters. Nothing here imports a higher layer."""
