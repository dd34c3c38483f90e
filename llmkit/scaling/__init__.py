"""Scaling-law fitting (Chinchilla's L(N, D), one-variable power laws, IsoFLOP parabolas): see llmkit.scaling.fit."""
