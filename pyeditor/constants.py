"""Names the oracle (pyeditor.reference) and the production code share: pure data, importing
nothing of the package, so the oracle may import it. The quant family's format lives in
pyeditor.quant_format for the same reason."""

METRICS = ("l2", "ip", "cosine")  # nearest_prototype / kmeans: squared l2, inner product, cosine
LAYER_RULES = ("sumsq", "sum", "max")  # how edit_norms_layers combines the per-layer norms
KMEANS_INITS = ("k-means++", "random")
