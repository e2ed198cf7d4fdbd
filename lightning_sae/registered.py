"""Namespace holding one alias class per registered plugin, named by its entry point.

jsonargparse resolves a bare class name by the last component of each subclass's import path,
so `--model.selector=topk` works once `lightning_sae.registry.load_plugins()` has put a subclass
called `topk` here. The aliases add nothing to the classes they stand for; their __name__ is the
real class's, so messages name the class (`BatchTopK`), not the alias (`batch_topk`).
"""
