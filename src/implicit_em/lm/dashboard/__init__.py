"""A component dashboard: what each component means, read one component at a time (``scripts/dashboard.py``).

- :mod:`.stream`: the one bounded streaming pass (top contexts, quantile samples, histograms, density);
- :mod:`.source`: the run (:class:`~.source.LoadedRun`, rebuilt by :func:`implicit_em.run.app.load_run`) and its rows (harvest windows of tokens, or images);
- :mod:`.extras`: token strings, logit effects through a causal LM's unembedding, nearest components;
- :mod:`.build`: the pass and the extras into one record per component, and the files;
- :mod:`.html`: the static pages (an index and a lazily loaded component page), no server;
- :mod:`.neuronpedia`: Neuronpedia-shaped JSON batches;
- :mod:`.wandb_log`: the index as a W&B Table and the pages as HTML and an artifact.
"""
