"""The methods layer: how a model is changed. The method registry (one entry and one loss per
method), the loss functions, the typed condition, the forget/retain/SFT set builders, the
trainer, adapter checkpoints, and the interventions that train a method and score it."""
